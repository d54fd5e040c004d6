"""Adventurer vs ViT vs CRATE: inference and train-step throughput and peak memory as the token count grows.

Three contenders, all fp32, built fresh (seeded) at every token count:

* ``adventurer``: ratelab's Adventurer (Mamba-2 mixer, chunked SSD on CPU; ``set_ssd_backend("auto")``), default
  Adventurer-T (256 wide, 12 deep, heading average, alternating flips).
* ``vit``: timm ``VisionTransformer`` with the *same width and depth* as the Adventurer (256 x 12, 4 heads of 64,
  MLP ratio 4, class token). timm's attention runs ``F.scaled_dot_product_attention`` when its ``fused_attn`` flag is
  on (timm's default); the script checks the flag on every block and refuses to run otherwise, so the quadratic
  baseline is timed on its fast path, not on an explicit softmax.
* ``crate``: ratelab's CRATE-T (``crate_tiny_patch16_224``: 384 wide, 12 deep, 6 heads; SDPA attention, fused ISTA).
* ``adventurer_keep``: the Adventurer with ``memory_efficient=False`` (every activation kept for the backward
  instead of recomputing the mixers: the training-speed / memory trade of the default).
* ``adventurer_opbyop``: the Adventurer with its no-grad fast path off (``Mamba2.fast_inference = False``: the
  op-by-op blocks also under ``inference_mode``); the same function, to show what the fast path gains.
* with ``--compile``: ``adventurer+compile`` and ``vit+compile``, the same models through ``torch.compile``
  (inductor; C++/OpenMP on CPU). Compilation (minutes on 2 cores, once per shape and mode) happens in the warm-up
  calls and is not timed; the ratios of every contender are still to the eager ViT.

Token counts: the patch size stays 16 and the image side grows, N = (side / 16)^2:
224 -> 196, 512 -> 1024, 1024 -> 4096, 2048 -> 16384 (``--quick``: 196, 1024, 4096; ``--sides`` for others). The
batch shrinks as tokens grow so every step sees about ``--batch-tokens`` tokens (default 3136 = 16 images at 196
tokens; one image from 4096 tokens on).

Measured per token count:

* inference: forward under ``torch.inference_mode`` in eval mode; train step: forward, cross-entropy, backward,
  AdamW step. Images per second from the median of the repeats. Protocol (``_machine.py``): for each of
  ``--threads`` (default 1 and 2), ``--warmup`` untimed calls, then ``--repeats`` (default 5) repeats in which every
  model runs once, in rotated order, so a slow spell on a shared machine hits all of them; the ratio to the ViT
  (``x ViT``) is computed per repeat (ViT seconds / model seconds) and its median [IQR] reported.
* peak memory, in a fresh subprocess per (model, token count): on CPU (Linux) the resident-set high-water mark
  (``VmHWM``) is reset to the current RSS through ``/proc/self/clear_refs`` right before the step, and the figure is
  its growth during the step, i.e. the extra memory the step held at its peak (activations, workspace, and for the
  train step gradients and the AdamW state, created at the first step). The subprocess fixes glibc's mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so large tensors are returned to the OS when freed and RSS follows live memory. On
  CUDA, ``torch.cuda.max_memory_allocated`` over the allocated baseline (the caching allocator's reserve is not
  counted). ``tracemalloc`` would be wrong here: it sees Python objects, not torch's tensor storage.

With more OpenMP threads than free cores, every parallel op waits at a barrier for a descheduled thread; the load
line printed after each block shows when other jobs were running.

Contenders are the entries of ``BUILDERS`` (name -> builder); a variant (a compiled model, another SSD backend) is
one more entry and then appears in every table, plot and record.

Examples::

    python benchmarks/adventurer_vs_vit.py --threads 1 2 --plot runs/bench/adv_vs_vit.png --json runs/bench/adv.json
    python benchmarks/adventurer_vs_vit.py --quick --models adventurer,vit
    python benchmarks/adventurer_vs_vit.py --smoke      # tiny models and images: a wiring check, numbers mean nothing
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    PEAK_RSS_ENV,
    LoadMonitor,
    add_protocol_args,
    device_name,
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

# (image side, patch) per token count; patch 16 throughout so the patch embed costs the same per token.
SIDES = {"full": (224, 512, 1024, 2048), "quick": (224, 512, 1024), "smoke": (64, 128)}
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


def _build_adventurer(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
    _import_adventurer()
    m = ratelab.create_model(args.adventurer, heading_avg=True, flip=args.flip, **arch(args), **common)
    m.set_ssd_backend(args.ssd_backend)
    return m


def _build_vit(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    a = arch(args)
    heads = max(1, a["embed_dim"] // 64)
    m = VisionTransformer(patch_size=patch, embed_dim=a["embed_dim"], depth=a["depth"], num_heads=heads, **common)
    slow = [i for i, blk in enumerate(m.blocks) if not getattr(blk.attn, "fused_attn", False)]
    if slow:
        raise SystemExit(
            f"timm ViT blocks {slow} do not use F.scaled_dot_product_attention (fused_attn is off; is "
            "TIMM_FUSED_ATTN=0 set?); the baseline would not be on its fast path"
        )
    return m


def _build_crate(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
    over = {"embed_dim": 32, "depth": 2, "num_heads": 2} if args.smoke else {}
    return ratelab.create_model("crate_tiny_patch16_224", **over, **common)


def _build_adventurer_keep(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
    m = _build_adventurer(side, patch, args, common)
    m.set_memory_efficient(False)
    return m


def _build_adventurer_opbyop(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
    m = _build_adventurer(side, patch, args, common)
    m.set_fast_inference(False)  # the reference path of every block, also without autograd (the fast path's twin)
    return m


def _compiled(build: Callable) -> Callable:
    def builder(side: int, patch: int, args: argparse.Namespace, common: dict) -> nn.Module:
        import torch._inductor.config as inductor_config

        # inductor bakes torch's thread count into its C++ at compile time unless told otherwise; every thread count
        # of the run must run the one compiled graph with its own threads
        inductor_config.cpp.dynamic_threads = True
        m = build(side, patch, args, common)
        m.compile()  # in place (nn.Module.compile); the first calls compile, the warm-up absorbs them
        return m

    return builder


BUILDERS: dict[str, Callable[[int, int, argparse.Namespace, dict], nn.Module]] = {
    "adventurer": _build_adventurer,
    "vit": _build_vit,
    "crate": _build_crate,
    "adventurer_keep": _build_adventurer_keep,
    "adventurer_opbyop": _build_adventurer_opbyop,
    "adventurer+compile": _compiled(_build_adventurer),
    "vit+compile": _compiled(_build_vit),
}
MODELS = tuple(BUILDERS)
COMPILED = tuple(m for m in MODELS if m.endswith("+compile"))


def build_model(name: str, side: int, patch: int, args: argparse.Namespace) -> nn.Module:
    """One contender at input side ``side``, patch ``patch``; 3 input channels, ``args.num_classes`` classes."""
    torch.manual_seed(args.seed)
    if patch != 16:
        raise ValueError(f"the *_patch16_224 entry points are built with patch 16, got {patch}")
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {tuple(BUILDERS)}")
    common = {"img_size": side, "num_classes": args.num_classes, "in_chans": 3}
    return BUILDERS[name](side, patch, args, common).to(args.device)


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


# ---- peak memory (fresh subprocess per config) -----------------------------------------------------------------
def memory_worker(spec: dict, args: argparse.Namespace) -> dict[str, float]:
    """Run one inference step then one train step of one config; peak memory growth of each, in MiB."""
    side, patch, name = spec["side"], spec["patch"], spec["model"]
    model = build_model(name, side, patch, args)
    b = batch_for((side // patch) ** 2, args)
    x = torch.randn(b, 3, side, side, device=args.device)
    y = torch.randint(0, args.num_classes, (b,), device=args.device)
    steps = make_steps(model, x, y)
    if name in COMPILED:  # compile outside the measured steps: a forward per mode and one backward
        steps["infer"]()
        model.train()
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    cuda = str(args.device).startswith("cuda")
    for kind in ("infer", "train"):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            steps[kind]()
            out[kind] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            out[kind] = peak_rss_growth_mib(steps[kind])
    return out


def measure_memory(name: str, side: int, patch: int, args: argparse.Namespace) -> dict[str, float]:
    spec = {"model": name, "side": side, "patch": patch}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec),
           *_forwarded(args)]
    env = dict(os.environ, **PEAK_RSS_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"memory worker for {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--num-classes", str(args.num_classes), "--batch-tokens", str(args.batch_tokens),
           "--width", str(args.width), "--depth", str(args.depth), "--adventurer", args.adventurer,
           "--flip", args.flip, "--ssd-backend", args.ssd_backend, "--seed", str(args.seed)]
    # the probe runs at one thread count: the caller's current one (an int), or the first of the list
    threads = args.threads if isinstance(args.threads, int) else args.threads[0]
    out += ["--threads", str(threads)]
    if args.smoke:
        out.append("--smoke")
    return out


# ---- report --------------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], kinds: list[str], with_mem: bool) -> str:
    """One line per (tokens, model); per thread count the images/s and the per-repeat ratio to the ViT."""
    threads = sorted({r["threads"] for r in rows})
    head = ["tokens", "image/patch", "batch", "model", "params (M)"]
    for k in kinds:
        head += [f"{k} img/s, {t} thr" for t in threads] + [f"{k} x ViT, {t} thr" for t in threads]
    if with_mem:
        head += [f"{k} peak MiB" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["tokens"], r["model"]) for r in rows))
    for tokens, model in keys:
        by_t = {r["threads"]: r for r in rows if r["tokens"] == tokens and r["model"] == model}
        r0 = by_t[threads[0]]
        cells = [str(tokens), f"{r0['side']}/{r0['patch']}", str(r0["batch"]), model, f"{r0['params'] / 1e6:.2f}"]
        for k in kinds:
            cells += [f"{by_t[t][k]['img_per_s']:.2f}" for t in threads]
            cells += ["1.00" if model == "vit" else fmt_ratio(by_t[t][k]["x_vit_summary"]) for t in threads]
        if with_mem:
            cells += [f"{r0['memory_mib'][k]:.0f}" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], kinds: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.6 * (len(kinds) + 1), 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    styles = dict(zip(threads, ("-o", "--s", ":^", "-.v")))

    def series(m: str, t: int) -> list[dict]:
        return [r for r in rows if r["model"] == m and r["threads"] == t]

    for ax, kind in zip(axes, kinds):  # colour = model, line style = thread count
        for i, m in enumerate(models):
            for t in threads:
                rs = series(m, t)
                ax.plot([r["tokens"] for r in rs], [r[kind]["img_per_s"] for r in rs], styles.get(t, "-o"),
                        color=f"C{i}", label=f"{m}, {t} thr")
        ax.set(xscale="log", yscale="log", xlabel="tokens per image", ylabel="images / s",
               title={"infer": "inference", "train": "train step"}[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    pairs = [(m, kind) for m in models if m != "vit" for kind in kinds]
    for i, (m, kind) in enumerate(pairs):
        for t in threads:
            rs = series(m, t)
            ax.plot([r["tokens"] for r in rs], [r[kind]["x_vit"] for r in rs], styles.get(t, "-o"),
                    color=f"C{i + len(models)}", label=f"{m} {kind}, {t} thr")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2.0, color="gray", lw=0.8, ls=":")
    ax.set(xscale="log", xlabel="tokens per image", ylabel="throughput / ViT throughput (per-repeat median)",
           title="ratio to ViT")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    toks = sorted({r["tokens"] for r in rows})
    for a in axes:  # label the measured token counts, not log-axis minor ticks
        a.set_xticks(toks, [str(t) for t in toks])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap, repeats=None)
    ap.add_argument("--adventurer", default="adventurer_tiny_patch16_224", help="registered Adventurer model name")
    ap.add_argument("--width", type=int, default=256, help="width of the Adventurer and the ViT (Adventurer-T: 256)")
    ap.add_argument("--depth", type=int, default=12, help="depth of the Adventurer and the ViT (Adventurer-T: 12)")
    ap.add_argument("--flip", default="alternate", help="Adventurer flip schedule (alternate, pairs, legacy_2_3, none)")
    ap.add_argument("--ssd-backend", default="auto", help="Adventurer SSD backend: auto, chunked or ref")
    ap.add_argument("--models", default="adventurer,vit,crate",
                    help=f"comma-separated subset of {','.join(MODELS)} (default adventurer,vit,crate)")
    ap.add_argument("--compile", action="store_true",
                    help="add the torch.compile variants of the selected adventurer and vit (" + ",".join(COMPILED)
                    + ")")
    ap.add_argument("--sides", default=None,
                    help="comma-separated image sides (default 224,384,512,768,1024; --quick 224,512,1024)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per step; batch = round(this / tokens) (default 3136; --smoke 64)")
    ap.add_argument("--num-classes", type=int, default=1000, help="classifier width")
    ap.add_argument("--skip-train", action="store_true", help="time inference only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-timeout", type=float, default=600.0, help="seconds allowed per memory subprocess")
    ap.add_argument("--quick", action="store_true", help="3 token counts (196, 1024, 4096; full adds 16384)")
    ap.add_argument("--smoke", action="store_true",
                    help="wiring check: 2-block, 32-wide models on 16 and 64 tokens (64 and 128 px), 1 repeat "
                    "(numbers mean nothing)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0, help="weights and data seed")
    ap.add_argument("--plot", type=Path, default=None, help="write the throughput-vs-tokens figure here (png)")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.batch_tokens is None:
        args.batch_tokens = 64 if args.smoke else 3136
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 5
    set_threads(args.threads[0])
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
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.compile:
        models += [f"{m}+compile" for m in ("adventurer", "vit") if m in models and f"{m}+compile" not in models]
    bad = [m for m in models if m not in MODELS]
    if bad or "vit" not in models:
        raise SystemExit(f"--models: choose from {MODELS} and include vit (the reference of the ratios); got {models}")
    for s in sides:
        if s % patch:
            raise SystemExit(f"--sides: {s} is not a multiple of the patch size {patch}")
    kinds = ["infer"] + ([] if args.skip_train else ["train"])
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("timm",))
    print_header(f"{' vs '.join(models)} ({mode}), fp32, {device_name(args.device)}", info, log)
    sync = functools.partial(_sync, args.device)
    rows: list[dict] = []
    loads: list[dict] = []
    for side in sides:
        tokens = (side // patch) ** 2
        b = batch_for(tokens, args)
        built = {m: build_model(m, side, patch, args) for m in models}
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(b, 3, side, side, generator=g).to(args.device)
        y = torch.randint(0, args.num_classes, (b,), generator=g).to(args.device)
        steps = {m: make_steps(built[m], x, y) for m in models}
        log(f"  {tokens} tokens ({side}px / patch {patch}), batch {b}")
        for t in args.threads:
            set_threads(t)
            with LoadMonitor() as mon:
                res = {k: time_interleaved({m: steps[m][k] for m in models}, repeats=args.repeats,
                                           warmup=args.warmup, sync=sync, log=log, label=f"{t} thr {k} ")
                       for k in kinds}
            loads.append({"tokens": tokens, "threads": t, **mon.record})
            log(f"    {tokens} tokens, {t} thread(s): {mon.line()}")
            for m in models:
                row = {"model": m, "tokens": tokens, "side": side, "patch": patch, "batch": b, "threads": t,
                       "params": sum(p.numel() for p in built[m].parameters())}
                for k in kinds:
                    tm, tv = res[k][m], res[k]["vit"]
                    xs = ratio_summary(tv, tm)
                    row[k] = {"seconds_per_round": tm, "summary_s": summary(tm), "img_per_s": b / statistics.median(tm),
                              "x_vit": xs["median"], "x_vit_summary": xs,
                              "x_vit_of_medians": statistics.median(tv) / statistics.median(tm)}
                rows.append(row)
        del steps, x, y, built
        if not args.no_memory:  # thread-count independent up to per-thread scratch: probed once, at the first
            set_threads(args.threads[0])
            for m in models:
                mem = measure_memory(m, side, patch, args)
                for r in rows:
                    if r["model"] == m and r["tokens"] == tokens:
                        r["memory_mib"] = mem
                log(f"    peak memory {m}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in mem.items()))

    mem_how = ("torch.cuda.max_memory_allocated over the allocated baseline" if str(args.device).startswith("cuda")
               else "growth of the RSS high-water mark (reset before the step) during the step, fresh process each, "
               f"{args.threads[0]} thread(s)")
    log("")
    log(f"machine: {machine_line(info)}")
    log(f"fp32; ViT attention: F.scaled_dot_product_attention (timm fused_attn on every block, checked); CRATE "
        f"attention: SDPA; Adventurer SSD backend: {args.ssd_backend}; img/s from the median of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up call(s); x ViT = median [IQR] of the per-repeat ratios "
        f"ViT seconds / model seconds; peak memory: {mem_how}")
    for ld in loads:
        log(f"load, {ld['tokens']} tokens, {ld['threads']} thread(s): 1-min load average "
            f"{ld['loadavg_before'][0]:.2f} -> {ld['loadavg_after'][0]:.2f}, other processes "
            f"{100 * ld.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    log("")
    table = markdown_table(rows, kinds, with_mem=not args.no_memory)
    log(table)
    for t in args.threads:
        adv = [r for r in rows if r["model"] == "adventurer" and r["threads"] == t]
        if adv:
            log(f"Adventurer / ViT inference throughput by tokens, {t} thread(s): "
                + ", ".join(f"{r['tokens']}: {r['infer']['x_vit']:.2f}x" for r in adv))
    if args.plot:
        plot(rows, kinds, args.plot, f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, fp32, "
             f"{'/'.join(map(str, args.threads))} thread(s), median of {args.repeats}")
        log(f"wrote {args.plot}")
    if args.json:
        write_record(args.json, args, argv, machine=info, device=device_name(args.device), memory_method=mem_how,
                     rows=rows, load=loads, table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
