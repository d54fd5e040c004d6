"""Forward + backward time of the coding rate reduction DeltaR: ratelab vs the PyPI package ``mcr2`` vs a dense
membership implementation (the official ryanchankh/mcr2 formulation), CPU fp32.

Contenders (all compute DeltaR of row-normalized features with eps = sqrt(0.5), i.e. the official eps^2 = 0.5):

* ``ours``: :func:`ratelab.objectives.rate_reduction` (padded class gather, one batched Cholesky).
* ``mcr2``: ``mcr2.primitives.coding_rate.DeltaR`` (PyPI ``mcr2`` 1.0.2; one-hot einsum + batched eigvalsh).
  Its 3-operand einsum materializes an (n, d, d) intermediate when opt_einsum is absent (10.5 GB at n=10000,
  d=512), so above ``--max-gb`` it is replaced by ``mcr2-lowmem``: the package's own ``logdet_I_plus`` and DeltaR
  formula with the class moments contracted in the memory-feasible order (one-hot-weighted (K, d, n) @ (n, d)).
* ``dense``: a dense (K, n, n) membership tensor and a per-class loop of W Pi_j W^T with LU logdet (written here,
  following the official loss). Needs 4 K n^2 bytes; skipped above ``--max-gb`` (40 GB at n=10000, K=100).

Each round times every contender once in rotated order; medians over rounds and medians of same-round ratios are
printed. Values must agree to 1e-5 relative (asserted).

Usage: ``python benchmarks/rate_speed.py [--rounds 5] [--threads 1] [--sizes 1000,128,10 10000,512,100] [--json F]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs

from ratelab.objectives import rate_reduction

EPS = math.sqrt(0.5)


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
    (n, d, d) intermediate."""
    from mcr2.primitives.logdet import logdet_I_plus

    n, d = Z.shape
    Nc = Y.sum(0)
    P = (Y.T[:, :, None] * Z[None]).transpose(1, 2) @ Z / Nc.clamp_min(1.0)[:, None, None]
    pi = Nc / n
    P_all = torch.cat([P, (pi[:, None, None] * P).sum(0, keepdim=True)])
    ld = logdet_I_plus(d / eps**2 * P_all)
    return 0.5 * (ld[-1] - (pi * ld[:-1]).sum())


def bench_size(n: int, d: int, K: int, rounds: int, max_gb: float) -> dict:
    g = torch.Generator().manual_seed(0)
    Z0 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = torch.randint(0, K, (n,), generator=g)
    Y = F.one_hot(y, K).float()
    fns = {"ours": lambda Z: rate_reduction(Z, y, EPS)[0]}
    notes = []
    try:
        from mcr2.primitives.coding_rate import DeltaR
    except ImportError as e:
        raise SystemExit("benchmarks/rate_speed.py needs the PyPI package mcr2: pip install mcr2==1.0.2") from e
    if 3 * 4 * n * d * d / 1e9 <= max_gb:  # einsum intermediate (n, d, d), kept for backward, plus its gradient
        fns["mcr2"] = lambda Z: DeltaR(Z, Y, EPS)
    else:
        fns["mcr2-lowmem"] = lambda Z: mcr2_lowmem_delta_r(Z, Y, EPS)
        notes.append(
            f"mcr2 as installed not run: its (n, d, d) einsum intermediate alone is {4 * n * d * d / 1e9:.1f} GB"
            " (more in backward); timed mcr2-lowmem instead"
        )
    if 4 * K * n * n / 1e9 <= max_gb:
        fns["dense"] = lambda Z: dense_delta_r(Z, y, K, EPS)
    else:
        notes.append(f"dense (K, n, n) baseline not run: the membership tensor alone is {4 * K * n * n / 1e9:.0f} GB")

    def run(name: str) -> tuple[float, float, torch.Tensor]:
        Z = Z0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        v = fns[name](Z)
        v.backward()
        return time.perf_counter() - t0, float(v.detach()), Z.grad

    names = list(fns)
    values, grads = {}, {}
    for name in names:  # warm-up and correctness
        _, values[name], grads[name] = run(name)
    for name in names[1:]:
        rel = abs(values[name] - values["ours"]) / abs(values[name])
        assert rel < 1e-5, (name, values[name], values["ours"], rel)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(name)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k: statistics.median([b / a for a, b in zip(times["ours"], times[k])]) for k in names[1:]}
    grad_rel = {k: float((grads[k] - grads["ours"]).norm() / grads[k].norm()) for k in names[1:]}
    return {
        "n": n,
        "d": d,
        "K": K,
        "values": values,
        "median_s": med,
        "ratio_vs_ours_median_of_rounds": ratios,
        "grad_rel_diff_vs_ours": grad_rel,
        "times_s": times,
        "notes": notes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (after one warm-up call)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--sizes", nargs="+", default=["1000,128,10", "10000,512,100"], help="n,d,K triples")
    p.add_argument("--max-gb", type=float, default=8.0, help="skip/replace contenders needing more memory than this")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for s in args.sizes:
        n, d, K = (int(x) for x in s.split(","))
        res = bench_size(n, d, K, args.rounds, args.max_gb)
        results.append(res)
        print(f"n={n} d={d} K={K}  DeltaR={res['values']['ours']:.6f}")
        for k, t in res["median_s"].items():
            extra = f"  ours is {res['ratio_vs_ours_median_of_rounds'][k]:.1f}x faster" if k != "ours" else ""
            print(f"  {k:12s} {t * 1e3:10.2f} ms{extra}")
        for note in res["notes"]:
            print("  note:", note)
    meta = {
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "dtype": "float32",
        "eps": EPS,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
