"""DP-SGD step cost: time and peak memory of one private step against the non-private step, per clipping mode.

Models (DP-Cap captioners, ``ratelab.models.dpcap``): ``dpcap_pico_patch4_32`` (ratelab's size for the 32 px shapes
captions, the recipe's captioner) and ``dpcap_tiny_patch16_224`` (384-d ViT-Ti encoder, 6-layer decoder, 30,522
tokens); ``--models`` picks others (``test_dpcap`` in the smoke run). Inputs: random images and captions of
``--text-len`` tokens with a random number of pad tokens at the end (so every example's loss is its own mean over
its non-pad targets).

Contenders, all fp32 on CPU (CUDA with ``--device cuda``), each on its own copy of the same weights:

* ``non-DP``: forward, mean caption loss, backward, AdamW step;
* ``ghost`` / ``hooks`` / ``functorch``: forward through the opacus wrapper, per-example losses,
  :func:`ratelab.privacy.clipped_backward` (ghost: one backward pass to the layers' outputs, per-sample norms from
  the hooks, the clipped sum contracted from what they kept; hooks/functorch: per-sample gradients, B x P memory),
  then :func:`ratelab.privacy.noise.make_dp_optimizer` (opacus' ``DPOptimizerFastGradientClipping`` with the noise
  added in place: one draw per parameter, division by B) around the same AdamW: exactly the ``privacy`` plugin's
  step without the trainer around it.

Before timing, the three clipped sums are compared on the timed batch (noise off): they must agree to float
rounding. Memory: the peak during one step above what was in use before it with no gradient held (weights and
optimizer state: every contender's gradients are released first, so that one keeping an extra copy between steps
does not hide it) (CUDA: ``max_memory_allocated`` minus
``memory_allocated``; CPU: growth of the resident set's high-water mark, ``_machine.peak_rss_growth_mib``; run with
``MALLOC_MMAP_THRESHOLD_=131072`` (``_machine.PEAK_RSS_ENV``) so that freed large blocks leave the resident set),
measured once per contender outside the timing. Protocol
(``_machine.py``): per ``--threads`` (default 1 and 2), ``--warmup`` untimed calls, ``--repeats`` interleaved
repeats; medians, IQRs and the median of the per-repeat ratios DP / non-DP. Target (issue 14): ghost <= 1.5x
non-DP. ``--quick``: test_dpcap, batch 2, a smoke run (not a figure to quote).

Example::

    python benchmarks/dp_step.py --threads 1 2 --json benchmarks/records/2026-12-01/dp_step.json
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    LoadMonitor,
    add_protocol_args,
    device_name,
    fmt_range,
    fmt_ratio,
    machine_info,
    machine_line,
    peak_rss_growth_mib,
    print_header,
    ratio_summary,
    set_threads,
    summary,
    time_interleaved,
    write_record,
)

import ratelab
from ratelab.models.dpcap.dpcap import caption_loss
from ratelab.privacy import clipped_backward, make_per_sample_module
from ratelab.privacy.noise import make_dp_optimizer

MODES = ("ghost", "hooks", "functorch")
DEFAULT_MODELS = {"dpcap_pico_patch4_32": 32, "dpcap_tiny_patch16_224": 8}  # name -> default batch


def make_batch(model: nn.Module, batch: int, text_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.img_size
    img = torch.randn(batch, model.in_chans, s, s, generator=g)
    vocab = model.cfg.vocab_size
    low = max(model.pad_id, model.bos_id, model.eos_id) + 1
    tok = torch.randint(low, vocab, (batch, text_len), generator=g)
    tok[:, 0] = model.bos_id
    for i in range(batch):
        keep = int(torch.randint(2, text_len + 1, (1,), generator=g))
        tok[i, keep - 1] = model.eos_id
        tok[i, keep:] = model.pad_id
    return img, tok


def step_fn(name: str, base: nn.Module, img: torch.Tensor, tok: torch.Tensor, max_grad_norm: float,
            sigma: float) -> Callable[[], None]:
    """One optimizer step of contender ``name`` on its own copy of ``base``."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if name == "non-DP":

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            caption_loss(model(img, tok), tok).mean().backward()
            opt.step()

        step.release = lambda: opt.zero_grad(set_to_none=True)
        return step
    private = make_per_sample_module(model, name)
    dp_opt = make_dp_optimizer(opt, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                               expected_batch_size=img.shape[0], loss_reduction="mean")

    def dp_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        clipped_backward(private, caption_loss(private(img, tok), tok), max_grad_norm=max_grad_norm)
        dp_opt.step()

    dp_step.release = lambda: dp_opt.zero_grad(set_to_none=True)
    return dp_step


def check_modes(base: nn.Module, img: torch.Tensor, tok: torch.Tensor, max_grad_norm: float) -> dict[str, float]:
    """Max difference of the hooks / functorch clipped sums from ghost's, relative to its largest entry."""
    sums = {}
    for mode in MODES:
        m = copy.deepcopy(base).train()
        private = make_per_sample_module(m, mode)
        clipped_backward(private, caption_loss(private(img, tok), tok), max_grad_norm=max_grad_norm)
        sums[mode] = [p.grad.clone() for p in m.parameters() if p.requires_grad]
    scale = max(g.abs().max().item() for g in sums["ghost"])
    out = {f"{mode}_vs_ghost_max_rel_diff": max((a - b).abs().max().item() for a, b in zip(sums[mode], sums["ghost"]))
           / scale for mode in MODES[1:]}
    # fp32 rounding: on dpcap_tiny (batch 4) ghost's per-sample norms agree with an fp64 run to 6e-7 and opacus'
    # hooks/functorch ones to 2e-4, so the clipped sums differ by up to ~2e-4 of their largest entry.
    if max(out.values()) > 1e-3:
        raise SystemExit(f"clipping modes disagree: {out}")
    return out


def _cpu_timed(fn: Callable[[], None], out: list[float]) -> Callable[[], None]:
    """``fn`` that appends the process CPU seconds of each call to ``out``."""

    def call() -> None:
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)

    return call


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes in use during ``fn()`` above those in use before it (CPU: the resident set)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return int(peak_rss_growth_mib(fn) * 2**20)


def markdown(rows: list[dict], threads: list[int]) -> str:
    head = ["model", "batch", "contender", *[f"{t} thr s/step" for t in threads],
            *[f"x non-DP, {t} thr" for t in threads], "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["batch"]), r["contender"]]
        cells += [fmt_range(r["summary_s"][str(t)], digits=3) for t in threads]
        cells += [fmt_ratio(r["x_nondp"].get(str(t))) for t in threads]
        cells.append(f"{r['peak_bytes'] / 2**20:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help=f"dpcap model names (default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch per model, in --models order (default: 32 for pico, 8 for tiny)")
    ap.add_argument("--text-len", type=int, default=16, help="caption tokens incl. BOS/EOS/pad (default 16)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="clipping modes to time")
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=0.728, help="noise multiplier (DP-Cap's, default 0.728)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: test_dpcap, batch 2, text length 6")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.text_len = ["test_dpcap"], [2], 6
    batches = args.batch or [DEFAULT_MODELS.get(m, 8) for m in args.models]
    if len(batches) != len(args.models):
        raise SystemExit(f"--batch: {len(batches)} values for {len(args.models)} models")
    device = torch.device(args.device)

    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("opacus", "timm"))
    print_header(f"DP-SGD step vs non-DP step (DP-Cap captioners), fp32, {device_name(args.device)}", info, log)
    set_threads(args.threads[0])
    rows, checks, loads, params = [], {}, {}, {}
    for model_name, batch in zip(args.models, batches):
        torch.manual_seed(args.seed)
        base = ratelab.create_model(model_name).to(device)
        params[model_name] = sum(p.numel() for p in base.parameters() if p.requires_grad)
        img, tok = (t.to(device) for t in make_batch(base, batch, min(args.text_len, base.cfg.max_text_len),
                                                     args.seed))
        checks[model_name] = check_modes(base, img, tok, args.max_grad_norm)
        log(f"{model_name} ({params[model_name] / 1e6:.2f}M trainable), batch {batch}: clipped sums agree "
            + ", ".join(f"{k} {v:.2g}" for k, v in checks[model_name].items()))
        names = ["non-DP", *args.modes]
        calls = {n: step_fn(n, base, img, tok, args.max_grad_norm, args.sigma) for n in names}
        mem = {}
        for n, fn in calls.items():
            fn()  # allocator and optimizer state exist before the measured step
            fn.release()
            mem[n] = peak_bytes(fn, device)
        sync = torch.cuda.synchronize if device.type == "cuda" else None
        per_thread, cpu_thread = {}, {}
        for t in args.threads:
            set_threads(t)
            cpu: dict[str, list[float]] = {n: [] for n in names}
            with LoadMonitor() as mon:
                per_thread[t] = time_interleaved({n: _cpu_timed(fn, cpu[n]) for n, fn in calls.items()},
                                                 repeats=args.repeats, warmup=args.warmup, sync=sync, log=log,
                                                 label=f"{model_name} {t} thr ")
            cpu_thread[t] = {n: v[args.warmup:] for n, v in cpu.items()}
            loads[f"{model_name} {t}"] = mon.record
            log(f"  {model_name}, {t} thread(s): {mon.line()}")
        for n in names:
            rows.append({
                "model": model_name, "batch": batch, "contender": n, "peak_bytes": mem[n],
                "seconds_per_repeat": {str(t): per_thread[t][n] for t in args.threads},
                "summary_s": {str(t): summary(per_thread[t][n]) for t in args.threads},
                # process CPU seconds of the same calls: at 1 thread, what other processes on a shared machine
                # inflate least (they still share caches and memory bandwidth)
                "cpu_seconds_per_repeat": {str(t): cpu_thread[t][n] for t in args.threads},
                # DP seconds / non-DP seconds in the same repeat: how many non-DP steps one DP step costs
                "x_nondp": {} if n == "non-DP" else {
                    str(t): ratio_summary(per_thread[t][n], per_thread[t]["non-DP"]) for t in args.threads},
                "x_nondp_cpu": {} if n == "non-DP" else {
                    str(t): ratio_summary(cpu_thread[t][n], cpu_thread[t]["non-DP"]) for t in args.threads},
            })

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up call(s); 'x non-DP' = median "
        "[IQR] of the per-repeat ratios DP step / non-DP step; peak = memory in use during one step above that "
        "before it (CPU: resident set)")
    for key, r in loads.items():
        log(f"load, {key} thread(s): 1-min load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
            f"other processes {100 * r.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(rows, args.threads)
    log(table)
    for r in rows:
        if r["contender"] == "ghost":
            for t in args.threads:
                x, xc = r["x_nondp"][str(t)]["median"], r["x_nondp_cpu"][str(t)]["median"]
                log(f"target ghost <= 1.5x non-DP, {r['model']} at {t} thread(s): {x:.2f}x wall "
                    f"({xc:.2f}x process CPU time) -> {'met' if x <= 1.5 else 'NOT met'}")
    if args.json:
        write_record(args.json, args, argv, machine=info, device=device_name(args.device), params=params,
                     equivalence=checks, rows=rows, load=loads, table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
