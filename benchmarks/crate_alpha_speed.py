"""CRATE-alpha speed on CPU: the ODL block's fast path vs its four-product reference, and a CRATE-alpha-B/16 train
step vs a timm ViT-B/16 of the same width, depth, heads and patch.

Two measurements, fp32 on CPU:

* **ODL block** (width 768, C = 4, the B/16 block; tokens = ``--odl-batch`` images x 197): ``fast`` is
  :func:`ratelab.models.crate_alpha.odl_fast` (scalars folded into the GEMMs, in-place activations, hand-written
  backward) and ``ref`` is :func:`ratelab.models.crate_alpha.odl_ref` (the four products as written, autograd).
  Timed: forward alone, and forward + backward (gradients of the input and both dictionaries).
* **Train step** (forward, cross-entropy, backward, AdamW step; ``fused=True`` for every contender) at 224 px,
  1000 classes: ``fast`` = ``crate_alpha_base_patch16_224`` as shipped (SDPA attention, fused ODL), ``ref`` = the
  same weights (a deep copy) on the reference paths (explicit softmax, four-product ODL), ``vit`` = timm
  ``VisionTransformer`` (embed 768, depth 12, heads 12, patch 16: ViT-B/16).

Before timing, fast and ref are compared on the same inputs and weights: outputs in fp32, all gradients in fp64; the
run stops if they differ beyond rounding. Protocol (``_machine.py``): per ``--threads`` (default 1 and 2), ``--warmup``
untimed calls, then ``--repeats`` (default 5) interleaved repeats; medians, IQRs and the median of the per-repeat
ratios. ``--quick`` shrinks both batches (a smoke run, not a figure to quote).

Example::

    python benchmarks/crate_alpha_speed.py --threads 1 2 --json benchmarks/records/2026-12-01/crate_alpha_speed.json
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    LoadMonitor,
    add_protocol_args,
    device_name,
    fmt_range,
    fmt_ratio,
    machine_info,
    machine_line,
    print_header,
    ratio_summary,
    set_threads,
    summary,
    time_interleaved,
    write_record,
)

import ratelab
from ratelab.models.crate_alpha import odl_fast, odl_ref

ODL_FNS = {"fast": odl_fast, "ref": odl_ref}


# ---- ODL block -------------------------------------------------------------------------------------------------
def odl_inputs(tokens: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.layer_norm(torch.randn(tokens, d, generator=g), (d,))  # what LN2 hands the block
    bound = (6 / d) ** 0.5  # the model's kaiming-uniform init
    D = (torch.rand(d, 4 * d, generator=g) * 2 - 1) * bound
    D_hat = (torch.rand(d, 4 * d, generator=g) * 2 - 1) * bound
    cot = torch.randn(tokens, d, generator=g)
    return x, D, D_hat, cot


def check_odl(x: torch.Tensor, D: torch.Tensor, D_hat: torch.Tensor, cot: torch.Tensor, tol: float) -> dict:
    """fp32 outputs on the timed inputs; fp64 gradients of x, D, D_hat on the first 256 tokens."""
    out: dict[str, float] = {}
    with torch.no_grad():
        yf, yr = odl_fast(x, D, D_hat, 0.1, 0.1), odl_ref(x, D, D_hat, 0.1, 0.1)
    out["fp32_out_max_abs_diff"] = (yf - yr).abs().max().item()
    out["fp32_out_max_abs"] = yr.abs().max().item()
    grads = []
    for fn in (odl_fast, odl_ref):
        leaves = [t[:256].double().requires_grad_() if t is x else t.double().requires_grad_() for t in (x, D, D_hat)]
        y = fn(*leaves, 0.1, 0.1)
        grads.append(torch.autograd.grad(y, leaves, cot[:256].double()))
    out["fp64_grad_max_rel_diff"] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))
    if out["fp32_out_max_abs_diff"] / out["fp32_out_max_abs"] > tol or out["fp64_grad_max_rel_diff"] > 1e-10:
        raise SystemExit(f"ODL fast and reference differ: {out}")
    return out


def odl_calls(x, D, D_hat, cot, *, compiled: bool = False) -> dict[str, dict[str, Callable]]:
    calls: dict[str, dict[str, Callable]] = {"fwd": {}, "fwd+bwd": {}}
    leaves = [t.clone().requires_grad_() for t in (x, D, D_hat)]
    fns = dict(ODL_FNS)
    if compiled:
        # Inductor fuses the reference's elementwise ops around the GEMMs: the bound for any fusion of this block.
        fns["ref (torch.compile)"] = torch.compile(odl_ref, dynamic=False)
    for name, fn in fns.items():

        def fwd(fn=fn) -> None:
            with torch.no_grad():
                fn(x, D, D_hat, 0.1, 0.1)

        def fwd_bwd(fn=fn) -> None:
            for t in leaves:
                t.grad = None
            fn(*leaves, 0.1, 0.1).backward(cot)

        calls["fwd"][name] = fwd
        calls["fwd+bwd"][name] = fwd_bwd
    return calls


# ---- train step ------------------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(args.seed)
    fast = ratelab.create_model("crate_alpha_base_patch16_224")
    models = {"fast": fast}
    if not args.no_ref_model:
        ref = copy.deepcopy(fast)
        ref.set_attn_backend("ref")
        ref.set_fused_odl(False)
        models["ref"] = ref
    from timm.models.vision_transformer import VisionTransformer

    cfg = fast.cfg
    models["vit"] = VisionTransformer(img_size=224, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                      depth=cfg.depth, num_heads=cfg.num_heads, num_classes=1000)
    return models


def check_models(fast: nn.Module, x: torch.Tensor, tol: float) -> dict[str, float]:
    """fp32 logits of fast vs reference paths on ``x``; fp64 gradients (input, every parameter) on one image."""
    ref = copy.deepcopy(fast)
    ref.set_attn_backend("ref")
    ref.set_fused_odl(False)
    out: dict[str, float] = {}
    with torch.no_grad():
        lf, lr = fast(x), ref(x)
    out["logits_max_abs_diff"] = (lf - lr).abs().max().item()
    out["logits_max_abs"] = lr.abs().max().item()
    grads = []
    cot = torch.randn(1, lf.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for m in (fast, ref):
        m64 = copy.deepcopy(m).double()
        xi = x[:1].double().requires_grad_()
        logits = m64(xi)
        grads.append(torch.autograd.grad(logits, [xi, *m64.parameters()], cot))
    out["fp64_grad_max_rel_diff"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*grads)
    )
    if out["logits_max_abs_diff"] / max(out["logits_max_abs"], 1e-12) > tol or out["fp64_grad_max_rel_diff"] > 1e-9:
        raise SystemExit(f"model fast and reference paths differ: {out}")
    return out


def train_calls(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable]:
    calls = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model.train()

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        calls[name] = step
    return calls


# ---- protocol --------------------------------------------------------------------------------------------------
def timed(calls: dict[str, Callable], args: argparse.Namespace, label: str, log) -> dict:
    times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, log=log, label=label)
    return {
        "seconds_per_repeat": times,
        "summary_s": {n: summary(v) for n, v in times.items()},
        "speedup_of_fast": {n: ratio_summary(v, times["fast"]) for n, v in times.items() if n != "fast"},
    }


def markdown(runs: dict[int, dict], threads: list[int], units: dict[str, tuple[str, int]]) -> str:
    head = ["measurement", "contender", *[f"{t} thr s" for t in threads], *[f"{t} thr throughput" for t in threads],
            *[f"fast faster, {t} thr" for t in threads]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, (unit, per_call) in units.items():
        for name in runs[threads[0]][kind]["summary_s"]:
            cells = [kind, name]
            cells += [fmt_range(runs[t][kind]["summary_s"][name], digits=3) for t in threads]
            cells += [f"{per_call / runs[t][kind]['summary_s'][name]['median']:.1f} {unit}" for t in threads]
            cells += [fmt_ratio(runs[t][kind]["speedup_of_fast"].get(name)) for t in threads]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--odl-batch", type=int, default=8, help="images of 197 tokens per ODL-block call (default 8)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per train step (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run: ODL batch 2, train batch 2")
    ap.add_argument("--no-ref-model", action="store_true", help="train step: skip the reference-path CRATE-alpha")
    ap.add_argument("--skip-train", action="store_true", help="time the ODL block only")
    ap.add_argument("--compile", action="store_true",
                    help="also time the reference ODL block under torch.compile (inductor; compiles in the warm-up)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative fp32 fast-vs-ref difference before aborting")
    ap.add_argument("--seed", type=int, default=0, help="weights and data seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.odl_batch, args.batch_size = 2, 2

    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("timm",))
    print_header(f"CRATE-alpha speed: ODL block (d 768, {args.odl_batch} x 197 tokens) and B/16 train step (batch "
                 f"{args.batch_size} at 224px), fp32, {device_name('cpu')}", info, log)
    set_threads(args.threads[0])
    tokens = args.odl_batch * 197
    x, D, D_hat, cot = odl_inputs(tokens, 768, args.seed)
    eq = {"odl": check_odl(x, D, D_hat, cot, args.tol)}
    log(f"ODL fast vs ref: fp32 output max abs diff {eq['odl']['fp32_out_max_abs_diff']:.3g} (max |out| "
        f"{eq['odl']['fp32_out_max_abs']:.3g}); fp64 gradients of x, D, D_hat max relative diff "
        f"{eq['odl']['fp64_grad_max_rel_diff']:.3g}")
    calls = odl_calls(x, D, D_hat, cot, compiled=args.compile)
    units = {"ODL fwd": ("ktok/s", tokens / 1e3), "ODL fwd+bwd": ("ktok/s", tokens / 1e3)}

    params: dict[str, int] = {}
    if not args.skip_train:
        models = build_models(args)
        params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
        log("params: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in params.items()))
        g = torch.Generator().manual_seed(args.seed)
        xb = torch.randn(args.batch_size, 3, 224, 224, generator=g)
        yb = torch.randint(0, 1000, (args.batch_size,), generator=g)
        eq["model"] = check_models(models["fast"], xb[: min(4, args.batch_size)], args.tol)
        log(f"model fast vs ref: logits max abs diff {eq['model']['logits_max_abs_diff']:.3g} (max |logit| "
            f"{eq['model']['logits_max_abs']:.3g}); fp64 gradients max relative diff "
            f"{eq['model']['fp64_grad_max_rel_diff']:.3g}")
        steps = train_calls(models, xb, yb)
        units["B/16 train step"] = ("img/s", args.batch_size)

    runs: dict[int, dict] = {}
    loads: dict[int, dict] = {}
    for t in args.threads:
        set_threads(t)
        with LoadMonitor() as mon:
            runs[t] = {"ODL fwd": timed(calls["fwd"], args, f"{t} thr ODL fwd ", log),
                       "ODL fwd+bwd": timed(calls["fwd+bwd"], args, f"{t} thr ODL fwd+bwd ", log)}
            if not args.skip_train:
                runs[t]["B/16 train step"] = timed(steps, args, f"{t} thr train ", log)
        loads[t] = mon.record
        log(f"  {t} thread(s): {mon.line()}")

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up call(s); 'fast faster' = "
        "median [IQR] of the per-repeat ratios contender / fast")
    for t in args.threads:
        r = loads[t]
        log(f"load, {t} thread(s): 1-min load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
            f"other processes {100 * r.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(runs, args.threads, units)
    log(table)
    if args.json:
        write_record(args.json, args, argv, machine=info, device=device_name("cpu"), params=params, equivalence=eq,
                     odl_tokens=tokens, runs={str(t): r for t, r in runs.items()},
                     load={str(t): v for t, v in loads.items()}, table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
