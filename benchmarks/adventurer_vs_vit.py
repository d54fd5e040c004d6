"""Adventurer vs ViT vs CRATE: inference and train-step throughput and peak memory as the token count grows.

Three contenders, all fp32, built fresh (seeded) at every token count:

* ``adventurer``: ratelab's Adventurer (Mamba-2 mixer, chunked SSD on CPU; ``set_ssd_backend("auto")``), default
  Adventurer-T (256 wide, 12 deep, heading average, alternating flips).
* ``vit``: timm ``VisionTransformer`` with the *same width and depth* as the Adventurer (256 x 12, 4 heads of 64,
  MLP ratio 4, class token). timm's attention runs ``F.scaled_dot_product_attention`` when its ``fused_attn`` flag is
  on (timm's default); the script checks the flag on every block and refuses to run otherwise, so the quadratic
  baseline is timed on its fast path, not on an explicit softmax.
* ``crate``: ratelab's CRATE-T (``crate_tiny_patch16_224``: 384 wide, 12 deep, 6 heads; SDPA attention, fused ISTA).

Token counts: the patch size stays 16 and the image side grows, N = (side / 16)^2:
224 -> 196, 384 -> 576, 512 -> 1024, 768 -> 2304, 1024 -> 4096 (``--quick``: 196, 1024, 4096). The batch shrinks
as tokens grow so every step sees about ``--batch-tokens`` tokens (default 3136 = 16 images at 196 tokens; one
image at 2304 and 4096).

Measured per token count:

* inference: forward under ``torch.inference_mode`` in eval mode; train step: forward, cross-entropy, backward,
  AdamW step. Images per second, the median over ``--rounds`` interleaved rounds (each round times each model once,
  in a rotated order, so a slow spell on a shared machine hits all of them), warmup excluded. The ratio to the ViT
  is given both as a ratio of medians and as the median of same-round ratios.
* peak memory, in a fresh subprocess per (model, token count): on CPU (Linux) the resident-set high-water mark
  (``VmHWM``) is reset to the current RSS through ``/proc/self/clear_refs`` right before the step, and the figure is
  its growth during the step, i.e. the extra memory the step held at its peak (activations, workspace, and for the
  train step gradients and the AdamW state, created at the first step). The subprocess fixes glibc's mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so large tensors are returned to the OS when freed and RSS follows live memory. On
  CUDA, ``torch.cuda.max_memory_allocated`` over the allocated baseline (the caching allocator's reserve is not
  counted). ``tracemalloc`` would be wrong here: it sees Python objects, not torch's tensor storage.

On a machine shared with other jobs, prefer ``--threads`` no larger than the free cores (see crate_speed.py).

Examples::

    python benchmarks/adventurer_vs_vit.py --threads 2 --plot runs/bench/adv_vs_vit.png --json runs/bench/adv.json
    python benchmarks/adventurer_vs_vit.py --quick --threads 2
    python benchmarks/adventurer_vs_vit.py --smoke      # tiny models and images: a wiring check, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _machine import device_name, write_record  # benchmarks/ is on sys.path when a script here runs

import ratelab

MODELS = ("adventurer", "vit", "crate")
# (image side, patch) per token count; patch 16 throughout so the patch embed costs the same per token.
SIDES = {"full": (224, 384, 512, 768, 1024), "quick": (224, 512, 1024), "smoke": (64, 128)}
PATCH = 16
# Architecture overrides of --smoke: 2 blocks, 32 wide (numbers meaningless, runs in seconds).
SMOKE_ARCH = {"embed_dim": 32, "depth": 2}


def _import_adventurer() -> None:
    # Registers the adventurer_* entry points even where ratelab.models does not import the family yet.
    import ratelab.models.adventurer  # noqa: F401


def arch(args: argparse.Namespace) -> dict[str, int]:
    """Width and depth shared by the Adventurer and the ViT."""
    if args.smoke:
        return dict(SMOKE_ARCH)
    return {"embed_dim": args.width, "depth": args.depth}


def build_model(name: str, side: int, patch: int, args: argparse.Namespace) -> nn.Module:
    """One contender at input side ``side``, patch ``patch``; 3 input channels, ``args.num_classes`` classes."""
    torch.manual_seed(args.seed)
    a = arch(args)
    common = {"img_size": side, "num_classes": args.num_classes, "in_chans": 3}
    if patch != 16:
        raise ValueError(f"the *_patch16_224 entry points are built with patch 16, got {patch}")
    if name == "adventurer":
        _import_adventurer()
        m = ratelab.create_model(args.adventurer, heading_avg=True, flip=args.flip, **a, **common)
        m.set_ssd_backend(args.ssd_backend)
    elif name == "vit":
        from timm.models.vision_transformer import VisionTransformer

        heads = max(1, a["embed_dim"] // 64)
        m = VisionTransformer(patch_size=patch, embed_dim=a["embed_dim"], depth=a["depth"], num_heads=heads, **common)
        slow = [i for i, blk in enumerate(m.blocks) if not getattr(blk.attn, "fused_attn", False)]
        if slow:
            raise SystemExit(
                f"timm ViT blocks {slow} do not use F.scaled_dot_product_attention (fused_attn is off; is "
                "TIMM_FUSED_ATTN=0 set?); the baseline would not be on its fast path"
            )
    elif name == "crate":
        over = {"embed_dim": 32, "depth": 2, "num_heads": 2} if args.smoke else {}
        m = ratelab.create_model("crate_tiny_patch16_224", **over, **common)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return m.to(args.device)


def batch_for(tokens: int, args: argparse.Namespace) -> int:
    return max(1, round(args.batch_tokens / tokens))


def make_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def train() -> None:
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "infer": infer}


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()  # launches are asynchronous: wait for the work before reading the clock


def time_interleaved(steps: dict[str, dict[str, Callable]], kind: str, args: argparse.Namespace, log: Callable
                     ) -> dict[str, list[float]]:
    """Seconds per call, one entry per round; every contender timed once per round, in rotated order."""
    names = list(steps)
    for name in names:
        for _ in range(args.warmup):
            steps[name][kind]()
    _sync(args.device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name][kind]()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
        log(f"    {kind} round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times


# ---- peak memory (fresh subprocess per config) -----------------------------------------------------------------
def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0, /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise SystemExit(f"peak memory needs Linux's /proc/self/clear_refs ({e}); run with --no-memory") from e


def memory_worker(spec: dict, args: argparse.Namespace) -> dict[str, float]:
    """Run one inference step then one train step of one config; peak memory growth of each, in MiB."""
    side, patch, name = spec["side"], spec["patch"], spec["model"]
    model = build_model(name, side, patch, args)
    b = batch_for((side // patch) ** 2, args)
    x = torch.randn(b, 3, side, side, device=args.device)
    y = torch.randint(0, args.num_classes, (b,), device=args.device)
    steps = make_steps(model, x, y)
    out: dict[str, float] = {}
    cuda = str(args.device).startswith("cuda")
    for kind in ("infer", "train"):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
            base = _proc_status_bytes("VmRSS")
        steps[kind]()
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes("VmHWM")
        out[kind] = (peak - base) / 2**20
    return out


def measure_memory(name: str, side: int, patch: int, args: argparse.Namespace) -> dict[str, float]:
    spec = {"model": name, "side": side, "patch": patch}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec),
           *_forwarded(args)]
    # A fixed glibc mmap threshold: every large tensor is its own mapping, returned to the OS when freed, so RSS
    # tracks live tensor memory instead of heap pages freed earlier and silently reused.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory worker for {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--num-classes", str(args.num_classes), "--batch-tokens", str(args.batch_tokens),
           "--width", str(args.width), "--depth", str(args.depth), "--adventurer", args.adventurer,
           "--flip", args.flip, "--ssd-backend", args.ssd_backend, "--seed", str(args.seed)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    if args.smoke:
        out.append("--smoke")
    return out


# ---- report --------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], kinds: list[str], with_mem: bool) -> str:
    head = ["tokens", "image/patch", "batch", "model", "params (M)"]
    for k in kinds:
        head += [f"{k} img/s", f"{k} x ViT", f"{k} x ViT (paired)"]
    if with_mem:
        head += [f"{k} peak MiB" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["tokens"]), f"{r['side']}/{r['patch']}", str(r["batch"]), r["model"], f"{r['params'] / 1e6:.2f}"]
        for k in kinds:
            cells += [f"{r[k]['img_per_s']:.2f}", f"{r[k]['x_vit']:.2f}", f"{r[k]['x_vit_paired']:.2f}"]
        if with_mem:
            cells += [f"{r['memory_mib'][k]:.0f}" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], kinds: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.6 * (len(kinds) + 1), 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for ax, kind in zip(axes, kinds):
        for m in models:
            rs = [r for r in rows if r["model"] == m]
            ax.plot([r["tokens"] for r in rs], [r[kind]["img_per_s"] for r in rs], "-o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="tokens per image", ylabel="images / s",
               title={"infer": "inference", "train": "train step"}[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    for m in [m for m in models if m != "vit"]:
        rs = [r for r in rows if r["model"] == m]
        for kind, style in zip(kinds, ("-o", "--s")):
            ax.plot([r["tokens"] for r in rs], [r[kind]["x_vit"] for r in rs], style, label=f"{m} {kind}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="gray", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="tokens per image", ylabel="throughput / ViT throughput", title="ratio to ViT")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    toks = sorted({r["tokens"] for r in rows})
    for a in axes:  # label the measured token counts, not log-axis minor ticks
        a.set_xticks(toks, [str(t) for t in toks])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adventurer", default="adventurer_tiny_patch16_224", help="registered Adventurer model name")
    ap.add_argument("--width", type=int, default=256, help="width of the Adventurer and the ViT (Adventurer-T: 256)")
    ap.add_argument("--depth", type=int, default=12, help="depth of the Adventurer and the ViT (Adventurer-T: 12)")
    ap.add_argument("--flip", default="alternate", help="Adventurer flip schedule (alternate, pairs, legacy_2_3, none)")
    ap.add_argument("--ssd-backend", default="auto", help="Adventurer SSD backend: auto, chunked or ref")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of adventurer,vit,crate")
    ap.add_argument("--sides", default=None,
                    help="comma-separated image sides (default 224,384,512,768,1024; --quick 224,512,1024)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per step; batch = round(this / tokens) (default 3136; --smoke 64)")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per model before timing")
    ap.add_argument("--skip-train", action="store_true", help="time inference only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-timeout", type=float, default=600.0, help="seconds allowed per memory subprocess")
    ap.add_argument("--quick", action="store_true", help="3 token counts (196, 1024, 4096) and 2 rounds")
    ap.add_argument("--smoke", action="store_true",
                    help="wiring check: 2-block, 32-wide models on 16 and 64 tokens (64 and 128 px), 1 round "
                    "(numbers mean nothing)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="weights and data seed")
    ap.add_argument("--plot", type=Path, default=None, help="write the throughput-vs-tokens figure here (png)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.batch_tokens is None:
        args.batch_tokens = 64 if args.smoke else 3136
    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available on this machine")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for every contender
        torch.backends.cudnn.allow_tf32 = False
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker), args)))
        return 0

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sides = [int(s) for s in args.sides.split(",")] if args.sides else list(SIDES[mode])
    patch = PATCH
    rounds = args.rounds or (1 if args.smoke else 2 if args.quick else 3)
    args.rounds = rounds
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or "vit" not in models:
        raise SystemExit(f"--models: choose from {MODELS} and include vit (the reference of the ratios); got {models}")
    for s in sides:
        if s % patch:
            raise SystemExit(f"--sides: {s} is not a multiple of the patch size {patch}")
    kinds = ["infer"] + ([] if args.skip_train else ["train"])
    log = lambda s: print(s, flush=True)  # noqa: E731

    log(f"adventurer vs vit vs crate ({mode}): {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{device_name(args.device)}, fp32")
    rows: list[dict] = []
    for side in sides:
        tokens = (side // patch) ** 2
        b = batch_for(tokens, args)
        built = {m: build_model(m, side, patch, args) for m in models}
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(b, 3, side, side, generator=g).to(args.device)
        y = torch.randint(0, args.num_classes, (b,), generator=g).to(args.device)
        steps = {m: make_steps(built[m], x, y) for m in models}
        log(f"  {tokens} tokens ({side}px / patch {patch}), batch {b}")
        res: dict[str, dict[str, list[float]]] = {k: time_interleaved(steps, k, args, log) for k in kinds}
        del steps, x, y
        for m in models:
            row = {"model": m, "tokens": tokens, "side": side, "patch": patch, "batch": b,
                   "params": sum(p.numel() for p in built[m].parameters())}
            for k in kinds:
                t, tv = res[k][m], res[k]["vit"]
                row[k] = {"seconds_per_round": t, "img_per_s": b / statistics.median(t),
                          "x_vit": statistics.median(tv) / statistics.median(t),
                          "x_vit_paired": statistics.median([v / s for v, s in zip(tv, t)])}
            rows.append(row)
        del built
        if not args.no_memory:
            for m in models:
                mem = measure_memory(m, side, patch, args)
                next(r for r in rows if r["model"] == m and r["tokens"] == tokens)["memory_mib"] = mem
                log(f"    peak memory {m}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))

    mem_how = ("torch.cuda.max_memory_allocated over the allocated baseline" if str(args.device).startswith("cuda")
               else "growth of the RSS high-water mark (reset before the step) during the step, fresh process each")
    log("")
    log(f"{device_name(args.device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32; ViT "
        "attention: F.scaled_dot_product_attention (timm fused_attn on every block, checked); CRATE attention: SDPA; "
        f"Adventurer SSD backend: {args.ssd_backend}; x ViT = ViT seconds / model seconds (ratio of medians; "
        f"median of same-round ratios in 'paired'); peak memory: {mem_how}")
    log("")
    table = markdown_table(rows, kinds, with_mem=not args.no_memory)
    log(table)
    adv = [r for r in rows if r["model"] == "adventurer"]
    if adv:
        log("")
        log("Adventurer / ViT inference throughput by tokens: "
            + ", ".join(f"{r['tokens']}: {r['infer']['x_vit']:.2f}x" for r in adv))
    if args.plot:
        plot(rows, kinds, args.plot, f"{device_name(args.device)}, {torch.get_num_threads()} threads, fp32")
        log(f"wrote {args.plot}")
    if args.json:
        write_record(args.json, args, argv, device=device_name(args.device), memory_method=mem_how, rows=rows,
                     table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
