"""CRATE speed on CPU: ratelab's fast path vs the straightforward reference vs a timm ViT of the same shape.

Three contenders, all fp32 on CPU:

* ``fast``: the ratelab CRATE as shipped (SDPA attention, fused ISTA).
* ``ref``: the *same* model (a deep copy with the same weights) switched to the readable reference path,
  ``set_attn_backend("ref")`` + ``set_fused_ista(False)``: explicit softmax attention and the three-matmul ISTA
  step, i.e. what the official code computes, written the obvious way.
* ``vit``: timm ``VisionTransformer`` with the same width, depth, heads and patch (CRATE-T/16: ViT-S/16 shape).

Measured: a train step (forward, cross-entropy, backward, AdamW step) and inference (forward under
``torch.inference_mode``), seconds per step and images per second. Protocol (``_machine.py``): for each of
``--threads`` (default 1 and 2), ``--warmup`` untimed calls, then ``--repeats`` (default 5) repeats in which every
contender runs once, in rotated order, so a slow spell on a shared machine hits all of them; medians and IQRs, and
the speed-up of the fast path as the median of per-repeat ratios. Before timing, the fast and reference logits
(fp32) and all gradients (fp64) are compared on the same weights and the run stops if they differ beyond fp32
rounding. The AdamW implementation is the same for every contender (``--adamw``).

With more OpenMP threads than free cores (2 threads on a 2-core machine that other jobs use), every parallel op
waits at a barrier for a descheduled thread; the load line printed after each thread count shows when that
happened.

Example::

    python benchmarks/crate_speed.py --batch-size 32 --threads 1 2 --json runs/bench/crate_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
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


def build(args: argparse.Namespace) -> dict[str, nn.Module]:
    torch.manual_seed(args.seed)
    fast = ratelab.create_model(args.model, img_size=args.img_size, num_classes=args.num_classes)
    ref = copy.deepcopy(fast)
    ref.set_attn_backend("ref")
    ref.set_fused_ista(False)
    models = {"fast": fast, "ref": ref}
    if not args.no_vit:
        from timm.models.vision_transformer import VisionTransformer

        cfg = fast.cfg
        models["vit"] = VisionTransformer(
            img_size=args.img_size,
            patch_size=cfg.patch_size,
            in_chans=fast.in_chans,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_classes=args.num_classes,
        )
    return {n: m.to(args.device) for n, m in models.items()}


def check_equal(fast: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float) -> dict[str, float]:
    """Compare the two paths on the same weights; abort the benchmark if they differ.

    Logits are compared in fp32 on ``x``. Gradients are compared in fp64 on two images: in fp32 a ReLU
    pre-activation within rounding of zero can flip its gate between the two op orders, which changes that unit's
    gradient by a discrete amount (a real but harmless difference); fp64 makes such flips vanishingly rare.
    """
    out: dict[str, float] = {}
    with torch.no_grad():
        lf, lr = fast(x), ref(x)
    out["logits_max_abs_diff"] = (lf - lr).abs().max().item()
    out["logits_max_abs"] = lr.abs().max().item()
    f64, r64 = copy.deepcopy(fast).double(), copy.deepcopy(ref).double()
    xs = [x[:2].double().requires_grad_(), x[:2].double().requires_grad_()]
    logits = [m(xi) for m, xi in zip((f64, r64), xs)]
    cot = torch.randn_like(logits[0])
    for lg in logits:
        lg.backward(cot)
    grads = [[xi.grad, *(p.grad for p in m.parameters())] for m, xi in zip((f64, r64), xs)]
    out["fp64_grad_max_rel_diff"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*grads)
    )
    rel = out["logits_max_abs_diff"] / max(out["logits_max_abs"], 1e-12)
    if rel > tol or out["fp64_grad_max_rel_diff"] > 1e-9:
        raise SystemExit(f"fast and reference paths differ: {out}")
    return out


def make_steps(
    models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, adamw_impl: str, amp: str
) -> dict[str, dict[str, Callable]]:
    steps: dict[str, dict[str, Callable]] = {}

    def autocast() -> contextlib.AbstractContextManager:
        if amp == "bf16":
            return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[adamw_impl]
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **impl)

        def train(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            model.train()
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer(model: nn.Module = model) -> None:
            model.eval()
            with torch.inference_mode(), autocast():
                model(x)

        steps[name] = {"train": train, "infer": infer}
    return steps


def markdown(runs: dict[int, dict], kinds: list[str], names: list[str], batch: int, threads: list[int]) -> str:
    head = ["pass", "contender", *[f"{t} thr s/step" for t in threads], *[f"{t} thr img/s" for t in threads],
            *[f"fast faster, {t} thr" for t in threads]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in kinds:
        for n in names:
            cells = [k, n]
            cells += [fmt_range(runs[t][k]["summary_s"][n], digits=3) for t in threads]
            cells += [f"{batch / runs[t][k]['summary_s'][n]['median']:.2f}" for t in threads]
            cells += [fmt_ratio(runs[t][k]["speedup_of_fast"].get(n)) for t in threads]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--model", default="crate_tiny_patch16_224", help="ratelab CRATE model name")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--iters", type=int, default=1, help="calls per contender per timed repeat (GPU: several)")
    ap.add_argument(
        "--adamw",
        choices=["fused", "foreach", "loop"],
        default="fused",
        help="AdamW implementation, the same for every contender (fused: one kernel per tensor)",
    )
    ap.add_argument("--no-vit", action="store_true", help="skip the timm ViT baseline")
    ap.add_argument("--skip-infer", action="store_true", help="time the train step only")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative fast-vs-ref difference before aborting")
    ap.add_argument("--seed", type=int, default=0, help="weights and data seed")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU rows of docs/benchmarks.md)")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none",
                    help="bf16 autocast for the timed steps (the equivalence check always runs in fp32/fp64)")
    args = ap.parse_args(argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("timm",))
    print_header(f"CRATE speed: {args.model} batch {args.batch_size} at {args.img_size}px, amp {args.amp}, "
                 f"{device_name(args.device)}", info, log)
    set_threads(args.threads[0])
    models = build(args)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, models["fast"].in_chans, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    if x.device.type == "cuda":  # TF32 would make the fp32 equivalence check meaningless
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    log("params: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in params.items()))

    eq = check_equal(models["fast"], models["ref"], x[: min(8, args.batch_size)], args.tol)
    log(
        f"fast vs ref: logits max abs diff {eq['logits_max_abs_diff']:.3g} (max |logit| {eq['logits_max_abs']:.3g}), "
        f"fp64 gradients (input and every parameter) max relative diff {eq['fp64_grad_max_rel_diff']:.3g}"
    )

    steps = make_steps(models, x, y, args.adamw, args.amp)
    kinds = ["train"] + ([] if args.skip_infer else ["infer"])
    sync = torch.cuda.synchronize if x.device.type == "cuda" else None
    runs: dict[int, dict] = {}
    loads: dict[int, dict] = {}
    for t in args.threads:
        set_threads(t)
        runs[t] = {}
        with LoadMonitor() as mon:
            for kind in kinds:
                calls = {n: (lambda f=steps[n][kind]: [f() for _ in range(args.iters)]) for n in models}
                times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, sync=sync, log=log,
                                         label=f"{t} thr {kind} ")
                times = {n: [s / args.iters for s in v] for n, v in times.items()}
                runs[t][kind] = {
                    "seconds_per_repeat": times,
                    "summary_s": {n: summary(v) for n, v in times.items()},
                    "speedup_of_fast": {n: ratio_summary(v, times["fast"]) for n, v in times.items() if n != "fast"},
                }
        loads[t] = mon.record
        log(f"  {t} thread(s): {mon.line()}")

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"{args.model}, batch {args.batch_size} at {args.img_size}px, amp {args.amp}, AdamW {args.adamw}; median "
        f"[IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up call(s); 'fast faster' = median "
        "[IQR] of the per-repeat ratios contender / fast")
    for t in args.threads:
        r = loads[t]
        log(f"load, {t} thread(s): 1-min load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
            f"other processes {100 * r.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(runs, kinds, list(models), args.batch_size, args.threads)
    log(table)
    if args.json:
        write_record(args.json, args, argv, machine=info, device=device_name(args.device), params=params,
                     equivalence=eq, runs={str(t): r for t, r in runs.items()},
                     load={str(t): v for t, v in loads.items()}, table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
