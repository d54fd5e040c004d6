"""Forward + backward time of the coding rate reduction DeltaR: ratelab vs the PyPI package ``mcr2`` vs the official
dense formulation, CPU, fp32 by default.

Contenders (all compute DeltaR of row-normalized features with eps = sqrt(0.5), i.e. the official eps^2 = 0.5):

* ``ours``: :func:`ratelab.objectives.rate_reduction` (padded class gather, one batched Cholesky).
* ``mcr2-opt``: ``mcr2.primitives.coding_rate.DeltaR`` (PyPI ``mcr2`` 1.0.2) with ``opt_einsum`` installed, which
  torch's ``einsum`` then uses to order the package's 3-operand contraction ``ni,nj,nk->kij``: one-hot times Z
  first, an (n, K, d) intermediate, then one batched GEMM. Timed only where ``opt_einsum`` is importable
  (``pip install opt_einsum``); it is the package at its fastest, and the baseline the headline ratio uses.
* ``mcr2``: the same call with ``torch.backends.opt_einsum.enabled = False``, i.e. what the package costs where
  ``opt_einsum`` is absent: torch contracts left to right, materializing the (n, d, d) outer product Z_ni Z_nj
  (65 MB at n=1000, d=128; 10.5 GB at n=10000, d=512). This is the configuration the first recorded ratio (38.9x)
  was measured in; docs/benchmarks.md and ``benchmarks/mcr2_gap.py`` show the two side by side.
* ``dense``: a dense (K, n, n) membership tensor and a per-class loop of W Pi_j W^T with LU logdet (written here,
  following the official ryanchankh/mcr2 loss). Needs 4 K n^2 bytes.
* ``mcr2-lowmem``: the package's DeltaR formula and its own ``logdet_I_plus`` with the class moments contracted in
  opt_einsum's order by hand; timed only where opt_einsum is absent and plain ``mcr2`` exceeds ``--max-gb``.

A contender whose working memory exceeds ``--max-gb``, or whose forward exceeds ``--max-gflop``, is skipped with a
note. Before timing, every contender's value must agree with ours to 1e-5 relative (asserted) and the gradient
differences are recorded.

Protocol (``_machine.py``): per thread count, one warm-up call each, then ``--repeats`` interleaved repeats;
medians, IQRs and the median of the per-repeat ratios baseline / ours.

Usage: ``python benchmarks/rate_speed.py [--threads 1 2] [--repeats 5] [--sizes 1000,128,10 5000,512,50]
[--json F]``
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    LoadMonitor,
    add_protocol_args,
    fmt_range,
    machine_info,
    machine_line,
    print_header,
    ratio_summary,
    set_threads,
    summary,
    time_interleaved,
    write_record,
)

from ratelab.objectives import rate_reduction

EPS = math.sqrt(0.5)
ORDER = ("ours", "mcr2-opt", "mcr2", "dense", "mcr2-lowmem")


def dense_delta_r(Z: torch.Tensor, y: torch.Tensor, K: int, eps: float) -> torch.Tensor:
    """Official-style DeltaR: columns as samples, dense (K, n, n) diagonal memberships, one logdet per class."""
    n, d = Z.shape
    W = Z.T
    Pi = torch.zeros(K, n, n, dtype=Z.dtype)
    Pi[y, torch.arange(n), torch.arange(n)] = 1.0
    eye = torch.eye(d, dtype=Z.dtype)
    R = 0.5 * torch.logdet(eye + d / (n * eps**2) * W @ W.T)
    Rc = Z.new_zeros(())
    for j in range(K):
        tr = torch.trace(Pi[j]) + 1e-8
        Rc = Rc + tr / (2 * n) * torch.logdet(eye + d / (tr * eps**2) * W @ Pi[j] @ W.T)
    return R - Rc


def mcr2_lowmem_delta_r(Z: torch.Tensor, Y: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``mcr2`` package's DeltaR (same formula, its logdet_I_plus) with the class moments contracted without the
    (n, d, d) intermediate (the order opt_einsum picks)."""
    from mcr2.primitives.logdet import logdet_I_plus

    n, d = Z.shape
    Nc = Y.sum(0)
    P = (Y.T[:, :, None] * Z[None]).transpose(1, 2) @ Z / Nc.clamp_min(1.0)[:, None, None]
    pi = Nc / n
    P_all = torch.cat([P, (pi[:, None, None] * P).sum(0, keepdim=True)])
    ld = logdet_I_plus(d / eps**2 * P_all)
    return 0.5 * (ld[-1] - (pi * ld[:-1]).sum())


@contextlib.contextmanager
def opt_einsum_enabled(on: bool):
    """Switch torch's use of opt_einsum (a no-op switch where opt_einsum is not installed)."""
    prev = torch.backends.opt_einsum.enabled
    torch.backends.opt_einsum.enabled = on
    try:
        yield
    finally:
        torch.backends.opt_einsum.enabled = prev


def have_opt_einsum() -> bool:
    return torch.backends.opt_einsum.is_available()


def make_problem(n: int, d: int, K: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Unit-norm rows Z0 (n, d), labels y (n,) and their one-hot Y (n, K)."""
    g = torch.Generator().manual_seed(seed)
    Z0 = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    y = torch.randint(0, K, (n,), generator=g)
    return Z0, y, F.one_hot(y, K).to(dtype)


def contenders(n: int, d: int, K: int, y: torch.Tensor, Y: torch.Tensor, max_gb: float = 8.0,
               max_gflop: float = 200.0, only: list[str] | None = None) -> tuple[dict[str, Callable], list[str]]:
    """The DeltaR callables to time at this size (``Z -> scalar``) and notes on any left out."""
    try:
        from mcr2.primitives.coding_rate import DeltaR
    except ImportError as e:
        raise SystemExit("benchmarks/rate_speed.py needs the PyPI package mcr2: pip install mcr2==1.0.2") from e

    def mcr2_with(opt: bool) -> Callable:
        def fn(Z):
            with opt_einsum_enabled(opt):
                return DeltaR(Z, Y, EPS)
        return fn

    # (working memory in GB: the largest intermediate, kept for backward, plus its gradient and slack, x3;
    #  forward GFLOP), estimated per contender; above --max-gb / --max-gflop a contender is skipped with a note.
    el = 4 / 1e9  # GB per fp32 element
    cost = {
        "mcr2-opt": (3 * n * K * d * el, 2 * K * n * d * d / 1e9,
                     f"its (n, K, d) intermediate is {n * K * d * el:.1f} GB"),
        "mcr2": (3 * n * d * d * el, 2 * K * n * d * d / 1e9,
                 f"without opt_einsum its (n, d, d) einsum intermediate alone is {n * d * d * el:.1f} GB"),
        "dense": (K * n * n * el, 2 * K * d * n * n / 1e9,
                  f"the (K, n, n) membership tensor is {K * n * n * el:.1f} GB"),
    }
    cost["mcr2-lowmem"] = cost["mcr2-opt"]
    fns: dict[str, Callable] = {"ours": lambda Z: rate_reduction(Z, y, EPS)[0]}
    notes: list[str] = []

    def fits(name: str) -> bool:
        gbs, gflop, what = cost[name]
        if gbs > max_gb or gflop > max_gflop:
            notes.append(f"{name} not run: {what}, about {gflop:.0f} GFLOP forward "
                         f"(limits --max-gb {max_gb:g}, --max-gflop {max_gflop:g})")
            return False
        return True

    if not have_opt_einsum():
        notes.append("mcr2-opt not run: opt_einsum is not installed (pip install opt_einsum; it is the faster "
                     "configuration of the mcr2 baseline, so the ratio to mcr2 overstates our advantage)")
    elif fits("mcr2-opt"):
        fns["mcr2-opt"] = mcr2_with(True)
    if fits("mcr2"):
        fns["mcr2"] = mcr2_with(False)
    if fits("dense"):
        fns["dense"] = lambda Z: dense_delta_r(Z, y, K, EPS)
    if not have_opt_einsum() and "mcr2" not in fns and fits("mcr2-lowmem"):
        fns["mcr2-lowmem"] = lambda Z: mcr2_lowmem_delta_r(Z, Y, EPS)
        notes.append("timed mcr2-lowmem (the package's formula, contracted in opt_einsum's order by hand) instead")
    if only:
        fns = {k: v for k, v in fns.items() if k in only or k == "ours"}
    return fns, notes


def check(fns: dict[str, Callable], Z0: torch.Tensor, tol: float = 1e-5) -> dict:
    """Value and gradient of each contender vs ours; stops the run if a value differs by more than ``tol``."""
    vals, grads = {}, {}
    for name, fn in fns.items():
        Z = Z0.clone().requires_grad_(True)
        v = fn(Z)
        v.backward()
        vals[name], grads[name] = float(v.detach()), Z.grad
    out = {"values": vals, "grad_rel_diff_vs_ours": {}}
    for name in fns:
        if name == "ours":
            continue
        rel = abs(vals[name] - vals["ours"]) / abs(vals[name])
        if rel > tol:
            raise SystemExit(f"{name} DeltaR {vals[name]} differs from ours {vals['ours']} (rel {rel:.2g} > {tol})")
        out["grad_rel_diff_vs_ours"][name] = float((grads[name] - grads["ours"]).norm() / grads[name].norm())
    return out


def fwd_bwd(fn: Callable, Z0: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        Z = Z0.clone().requires_grad_(True)
        fn(Z).backward()
    return call


def bench_size(n: int, d: int, K: int, fns: dict[str, Callable], Z0: torch.Tensor, repeats: int, warmup: int,
               log: Callable | None = None) -> dict:
    """Interleaved forward+backward times of ``fns`` at one size; summaries and per-repeat ratios to ours."""
    times = time_interleaved({k: fwd_bwd(f, Z0) for k, f in fns.items()}, repeats=repeats, warmup=warmup, log=log,
                             label=f"n={n} d={d} K={K} ")
    return {
        "times_s": times,
        "summary_s": {k: summary(v) for k, v in times.items()},
        "speedup_of_ours": {k: ratio_summary(v, times["ours"]) for k, v in times.items() if k != "ours"},
    }


def markdown(sizes: list[tuple[int, int, int]], runs: dict[int, dict], threads: list[int]) -> str:
    head = ["n, d, K", "contender", *[f"{t} thr ms" for t in threads], *[f"ours faster, {t} thr" for t in threads]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, d, K in sizes:
        key = f"{n},{d},{K}"
        names = [c for c in ORDER if c in runs[threads[0]][key]["summary_s"]]
        for c in names:
            cells = [f"{n}, {d}, {K}", c]
            for t in threads:
                cells.append(fmt_range(runs[t][key]["summary_s"][c], 1e3, 2 if n <= 2000 else 0))
            for t in threads:
                r = runs[t][key]["speedup_of_ours"].get(c)
                cells.append("" if r is None else f"**{r['median']:.1f}x** [{r['q1']:.1f}-{r['q3']:.1f}]")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_protocol_args(p)
    p.add_argument("--sizes", nargs="+", default=["1000,128,10", "5000,512,50"], help="n,d,K triples")
    p.add_argument("--contenders", default=None,
                   help="comma-separated subset of mcr2-opt,mcr2,dense,mcr2-lowmem (ours always runs)")
    p.add_argument("--max-gb", type=float, default=8.0, help="skip contenders needing more memory than this")
    p.add_argument("--max-gflop", type=float, default=200.0,
                   help="skip contenders whose forward needs more GFLOP than this (the dense loop at large n)")
    args = p.parse_args(argv)
    log = lambda s: print(s, flush=True)  # noqa: E731
    info = machine_info(packages=("mcr2", "opt_einsum"))
    print_header("DeltaR forward + backward, fp32, eps^2 = 0.5", info, log)
    sizes = [tuple(int(x) for x in s.split(",")) for s in args.sizes]
    only = args.contenders.split(",") if args.contenders else None

    runs: dict[int, dict] = {}
    loads: dict[int, dict] = {}
    checks: dict[str, dict] = {}
    notes: dict[str, list[str]] = {}
    for t in args.threads:
        set_threads(t)
        runs[t] = {}
        with LoadMonitor() as mon:
            for n, d, K in sizes:
                key = f"{n},{d},{K}"
                Z0, y, Y = make_problem(n, d, K)
                fns, notes[key] = contenders(n, d, K, y, Y, args.max_gb, args.max_gflop, only)
                if key not in checks:  # values do not depend on the thread count beyond rounding: check once
                    checks[key] = check(fns, Z0)
                    log(f"  n={n} d={d} K={K}: DeltaR " + ", ".join(f"{k} {v:.6f}" for k, v in
                                                                  checks[key]["values"].items()))
                runs[t][key] = bench_size(n, d, K, fns, Z0, args.repeats, args.warmup, log)
                s = runs[t][key]
                log(f"  {t} thread(s) n={n} d={d} K={K}: " + ", ".join(
                    f"{k} {1e3 * v['median']:.2f} ms" + (f" (ours {s['speedup_of_ours'][k]['median']:.1f}x)"
                                                         if k != "ours" else "")
                    for k, v in s["summary_s"].items()))
        loads[t] = mon.record
        log(f"  {t} thread(s): {mon.line()}")

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up call(s); 'ours faster' = "
        "median [IQR] of the per-repeat ratios baseline / ours")
    for t in args.threads:
        lb, la = loads[t]["loadavg_before"][0], loads[t]["loadavg_after"][0]
        log(f"load, {t} thread(s): 1-min load average {lb:.2f} -> {la:.2f}, other processes "
            f"{100 * loads[t].get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(sizes, runs, args.threads)
    log(table)
    for key, ns in notes.items():
        for note in ns:
            log(f"note ({key}): {note}")
    if args.json:
        write_record(args.json, args, argv, machine=info, dtype="float32", eps=EPS, checks=checks, notes=notes,
                     runs={str(t): r for t, r in runs.items()}, load={str(t): v for t, v in loads.items()},
                     table=table)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
