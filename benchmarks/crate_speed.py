"""CRATE speed on CPU: ratelab's fast path vs the straightforward reference vs a timm ViT of the same shape.

Three contenders, all fp32 on CPU:

* ``fast``: the ratelab CRATE as shipped (SDPA attention, fused ISTA).
* ``ref``: the *same* model (a deep copy with the same weights) switched to the readable reference path,
  ``set_attn_backend("ref")`` + ``set_fused_ista(False)``: explicit softmax attention and the three-matmul ISTA
  step, i.e. what the official code computes, written the obvious way.
* ``vit``: timm ``VisionTransformer`` with the same width, depth, heads and patch (CRATE-T/16: ViT-S/16 shape).

Measured: a train step (forward, cross-entropy, backward, AdamW step) and inference (forward under
``torch.inference_mode``), in images per second. Timing is interleaved: every round times each contender once, in
a rotated order, so a slow spell on a shared machine hits all of them; the reported figure is the median over
rounds, warmup excluded. Before timing, the fast and reference logits (fp32) and all gradients (fp64) are compared on
the same weights and the run stops if they differ beyond fp32 rounding.

On a machine shared with other jobs, prefer ``--threads 1``: with more OpenMP threads than free cores, every
parallel op waits at a barrier for a descheduled thread, which adds seconds per step that have nothing to do with
the model and compress the ratios. The AdamW implementation is the same for every contender (``--adamw``).

Example::

    python benchmarks/crate_speed.py --batch-size 32 --rounds 5 --threads 2 --json runs/bench/crate_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _machine import device_name, write_record  # benchmarks/ is on sys.path when a script here runs

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


def time_interleaved(
    steps: dict[str, dict[str, Callable]], kind: str, *, rounds: int, iters: int, warmup: int, log: Callable
) -> dict[str, list[float]]:
    """Seconds per call, one entry per round, each contender timed once per round in rotated order."""
    names = list(steps)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for name in names:
        for _ in range(warmup):
            steps[name][kind]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name][kind]()
            sync()  # CUDA launches are asynchronous: wait for the work before reading the clock
            times[name].append((time.perf_counter() - t0) / iters)
        log(f"  {kind} round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="crate_tiny_patch16_224", help="ratelab CRATE model name")
    ap.add_argument("--img-size", type=int, default=224, help="input resolution")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    ap.add_argument("--batch-size", type=int, default=32, help="images per step")
    ap.add_argument("--iters", type=int, default=1, help="timed calls per contender per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per contender before timing")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
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
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    models = build(args)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, models["fast"].in_chans, args.img_size, args.img_size, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    if x.device.type == "cuda":  # TF32 would make the fp32 equivalence check meaningless
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    log(
        f"{args.model} batch {args.batch_size} at {args.img_size}px, amp {args.amp}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {device_name(args.device)}"
    )
    log("params: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in params.items()))

    eq = check_equal(models["fast"], models["ref"], x[: min(8, args.batch_size)], args.tol)
    log(
        f"fast vs ref: logits max abs diff {eq['logits_max_abs_diff']:.3g} (max |logit| {eq['logits_max_abs']:.3g}), "
        f"fp64 gradients (input and every parameter) max relative diff {eq['fp64_grad_max_rel_diff']:.3g}"
    )

    steps = make_steps(models, x, y, args.adamw, args.amp)
    kinds = ["train"] + ([] if args.skip_infer else ["infer"])
    results: dict[str, dict] = {}
    for kind in kinds:
        times = time_interleaved(steps, kind, rounds=args.rounds, iters=args.iters, warmup=args.warmup, log=log)
        med = {n: statistics.median(t) for n, t in times.items()}
        results[kind] = {
            "seconds_per_step_median": med,
            "img_per_s": {n: args.batch_size / s for n, s in med.items()},
            "seconds_per_round": times,
        }

    log("")
    log(f"{'':6s} " + " ".join(f"{k + ' img/s':>12s}" for k in kinds))
    for n in models:
        log(f"{n:6s} " + " ".join(f"{results[k]['img_per_s'][n]:12.2f}" for k in kinds))
    ratios: dict[str, float] = {}
    for k in kinds:
        per_round = results[k]["seconds_per_round"]
        for other in [n for n in models if n != "fast"]:
            med = results[k]["seconds_per_step_median"]
            ratios[f"{k}_fast_over_{other}"] = med[other] / med["fast"]
            # Same-round pairs are timed back to back, so their ratio is the least disturbed by other load.
            paired = [o / f for o, f in zip(per_round[other], per_round["fast"])]
            ratios[f"{k}_fast_over_{other}_paired_median"] = statistics.median(paired)
    log("speed-ups of the fast path (ratio of medians; median of same-round ratios):")
    for k in kinds:
        for other in [n for n in models if n != "fast"]:
            key = f"{k}_fast_over_{other}"
            log(f"  {k:5s} vs {other}: {ratios[key]:.2f}x; {ratios[key + '_paired_median']:.2f}x")

    if args.json:
        write_record(args.json, args, argv, device=device_name(args.device), params=params, equivalence=eq,
                     results=results, ratios=ratios)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
