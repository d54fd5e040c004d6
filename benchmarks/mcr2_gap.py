"""Why ours vs the PyPI ``mcr2`` package measured 38.9x in one record and 3.3x in another: every hypothesis measured.

At n=1000, d=128, K=10 (the size of both reports) this times ratelab's ``rate_reduction`` against
``mcr2.primitives.coding_rate.DeltaR`` (forward + backward) under each setting that could explain the gap, one at
a time from a base setting (fp32, 1 thread, warm, the given size):

* ``opt_einsum`` absent vs installed -- torch's ``einsum`` uses opt_einsum, when importable, to order a contraction
  of three or more operands; toggled in-process with ``torch.backends.opt_einsum.enabled``;
* 1 vs 2 threads;
* float32 vs float64;
* a cold first call (a fresh process per contender and call, no warm-up) vs warm repeats;
* ``OPENBLAS_CORETYPE`` set (it selects kernels of OpenBLAS, which is numpy's BLAS here, not torch's);
* other n, d, K;
* the official per-class loop (the ``dense`` contender of rate_speed.py), which uses no einsum.

Needs ``opt_einsum`` importable (``pip install opt_einsum``); without it only the "absent" column can be measured.
Same protocol as the other scripts (``_machine.py``): warm-up, interleaved repeats, median of per-repeat ratios.

Usage: ``python benchmarks/mcr2_gap.py [--repeats 5] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    LoadMonitor,
    add_protocol_args,
    machine_info,
    machine_line,
    print_header,
    ratio_summary,
    set_threads,
    summary,
    time_interleaved,
    write_record,
)
from rate_speed import EPS, dense_delta_r, fwd_bwd, have_opt_einsum, make_problem, opt_einsum_enabled

from ratelab.objectives import rate_reduction

BASE = (1000, 128, 10)
OTHER_SIZES = ((500, 128, 10), (2000, 128, 10), (1000, 64, 10), (1000, 256, 10), (1000, 128, 2), (1000, 128, 50))


def calls(n: int, d: int, K: int, dtype: torch.dtype, opt: bool, with_dense: bool = False) -> dict:
    from mcr2.primitives.coding_rate import DeltaR

    Z0, y, Y = make_problem(n, d, K, dtype)

    def mcr2(Z):
        with opt_einsum_enabled(opt):
            return DeltaR(Z, Y, EPS)

    fns = {"ours": lambda Z: rate_reduction(Z, y, EPS)[0], "mcr2": mcr2}
    if with_dense:
        fns["dense"] = lambda Z: dense_delta_r(Z, y, K, EPS)
    return {k: fwd_bwd(f, Z0) for k, f in fns.items()}


def warm(n: int, d: int, K: int, dtype: torch.dtype, opt: bool, repeats: int, warmup: int,
         with_dense: bool = False) -> dict:
    """Interleaved warm repeats of ours vs mcr2 (and dense); the error text if a contender fails."""
    try:
        times = time_interleaved(calls(n, d, K, dtype, opt, with_dense), repeats=repeats, warmup=warmup)
    except RuntimeError as e:  # e.g. mcr2's float one-hot meeting float64 features in torch's plain einsum
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    out = {"summary_s": {k: summary(v) for k, v in times.items()}, "times_s": times}
    out["speedup_of_ours"] = {k: ratio_summary(v, times["ours"]) for k, v in times.items() if k != "ours"}
    return out


def child(spec: dict) -> dict:
    """Run in a fresh process: a cold first call of one contender, or a warm measurement under a changed env."""
    set_threads(spec["threads"])
    if spec["mode"] == "cold":
        c = calls(*spec["size"], torch.float32, spec["opt"])[spec["name"]]
        t0 = time.perf_counter()
        c()
        return {"first_call_s": time.perf_counter() - t0}
    return warm(*spec["size"], torch.float32, spec["opt"], spec["repeats"], spec["warmup"])


def run_child(spec: dict, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(res: dict, key: str = "mcr2") -> tuple[str, str, str]:
    """(ours ms, baseline ms, ratio) cells of one measurement."""
    if "error" in res:
        return "", "fails", res["error"][:90]
    s, r = res["summary_s"], res["speedup_of_ours"][key]
    return (f"{1e3 * s['ours']['median']:.2f}", f"{1e3 * s[key]['median']:.2f}",
            f"**{r['median']:.1f}x** [{r['q1']:.1f}-{r['q3']:.1f}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(ap)
    ap.add_argument("--cold-repeats", type=int, default=5, help="fresh processes per cold-call measurement")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("mcr2", "opt_einsum"))
    print_header("ours vs mcr2 1.0.2, DeltaR forward + backward: the settings behind the recorded ratios", info, log)
    if not have_opt_einsum():
        raise SystemExit("opt_einsum is not importable: pip install opt_einsum (the gap is about it)")
    t1, r, w = args.threads[0], args.repeats, args.warmup
    opts = (False, True)
    rows: list[tuple[str, str, dict]] = []  # (hypothesis, setting, result)

    def add(hyp: str, setting: str, res: dict) -> None:
        rows.append((hyp, setting, res))
        log(f"  {hyp} | {setting} | " + " | ".join(cell(res)))

    with LoadMonitor() as mon:
        set_threads(t1)
        for opt in opts:
            add("opt_einsum", f"{'installed' if opt else 'absent'} (fp32, {t1} thread, warm)",
                warm(*BASE, torch.float32, opt, r, w))
        for t in args.threads[1:]:
            set_threads(t)
            for opt in opts:
                add("threads", f"{t} threads, opt_einsum {'installed' if opt else 'absent'}",
                    warm(*BASE, torch.float32, opt, r, w))
            set_threads(t1)
        for opt in opts:
            add("dtype", f"float64, opt_einsum {'installed' if opt else 'absent'}",
                warm(*BASE, torch.float64, opt, r, w))
        for opt in opts:  # one fresh process per call: the first call pays lazy initialization (LAPACK, autograd)
            first = {name: [run_child({"mode": "cold", "name": name, "size": BASE, "opt": opt, "threads": t1}
                                      )["first_call_s"] for _ in range(args.cold_repeats)]
                     for name in ("ours", "mcr2")}
            res = {"summary_s": {k: summary(v) for k, v in first.items()}, "times_s": first,
                   "speedup_of_ours": {"mcr2": ratio_summary(first["mcr2"], first["ours"])}}
            add("cold first call", f"fresh process each, opt_einsum {'installed' if opt else 'absent'}", res)
        for core in ("Haswell", "SkylakeX"):
            add("OPENBLAS_CORETYPE", f"={core}, opt_einsum absent",
                run_child({"mode": "warm", "size": BASE, "opt": False, "threads": t1, "repeats": r, "warmup": w},
                          env={"OPENBLAS_CORETYPE": core}))
        for size in OTHER_SIZES:
            for opt in opts:
                add("n, d, K", f"{size[0]}, {size[1]}, {size[2]}, opt_einsum {'installed' if opt else 'absent'}",
                    warm(*size, torch.float32, opt, r, w))
        dense = warm(*BASE, torch.float32, False, r, w, with_dense=True)
        rows.append(("per-class loop", "official dense formulation (no einsum), vs ours", dense))
        log("  per-class loop | dense | " + " | ".join(cell(dense, "dense")))

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"{mon.line()}")
    log(f"base setting: n, d, K = {BASE}, fp32, {t1} thread, 1 warm-up call, median of {r} interleaved repeats; "
        "ratio = median [IQR] of per-repeat mcr2 / ours")
    head = ["hypothesis", "setting", "ours ms", "mcr2 ms", "ours faster"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for hyp, setting, res in rows:
        key = "dense" if hyp == "per-class loop" else "mcr2"
        o, b, ratio = cell(res, key)
        lines.append(f"| {hyp} | {setting} | {o} | {'dense ' if key == 'dense' else ''}{b} | {ratio} |")
    table = "\n".join(lines)
    log(table)
    if args.json:
        write_record(args.json, args, argv, machine=info, base=BASE, load=mon.record, table=table,
                     rows=[{"hypothesis": h, "setting": s, "result": res} for h, s, res in rows])
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
