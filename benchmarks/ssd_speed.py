"""SSD (Mamba-2 scan) speed on CPU: ratelab's chunked path vs the sequential reference vs mambapy's parallel scan.

Contenders, all fp32, same inputs (``dt`` goes through ``dt_bias`` + softplus in each):

* ``chunked``: ``ratelab.kernels.ssd.ssd_chunked`` (chunk size ``--chunk``), what ``ssd(backend="auto")`` runs on CPU.
* ``ref``: ``ratelab.kernels.ssd.ssd_ref``, the per-token loop (time axis unbound once, so its backward is linear).
* ``pscan``: the same Mamba-2 computation built on ``mambapy.pscan.pscan`` (PyPI ``mambapy``, pure PyTorch Blelloch
  scan; mambapy's own Mamba-2 needs mamba_ssm, so it cannot be used on CPU). mambapy's scan is diagonal,
  ``H_t = A_t * H_{t-1} + X_t`` elementwise on ``(b, L, D, N)``: the scalar head decay ``exp(dt A)`` is broadcast to
  ``D = heads * headdim`` channels and ``N = d_state``, the drive is ``dt x B^T``, and ``y = H C + D x`` is read out
  afterwards. It materializes ``(b, L, heads*headdim, d_state)`` tensors, so its memory grows as ``L * h * p * n``.

Default shapes are Adventurer-T's mixer (research notes §1.3): d_model 256 -> d_inner 512 = 8 heads x headdim 64,
d_state 64, ngroups 1. Timed: the forward under ``torch.no_grad`` ("fwd"), and forward + backward of a random
projection of ``y`` to every input ("fwd+bwd"). Every round times each contender once, in rotated order; the median
over rounds is reported. The slow contenders get ``--slow-rounds`` rounds (default 1) and can be skipped above a
length (``--ref-max-len``, ``--pscan-max-len``); a skipped cell is then extrapolated linearly in ``L`` from the
largest measured length and marked ``~`` (the reference is a loop of identical steps, so its time is linear in
``L``; the scan is O(L) work too, up to its power-of-two padding). Before timing, at each length, chunked and pscan
are compared with the reference on the first ``--check-len`` tokens (outputs, fp32), and the run stops on a mismatch.

Example::

    python benchmarks/ssd_speed.py --threads 1 --batch-size 2 --lengths 256 1024 4096 --json runs/bench/ssd_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import cpu_name, write_record  # benchmarks/ is on sys.path when a script here runs

from ratelab.kernels.ssd import ssd_chunked, ssd_ref

NAMES = ("chunked", "ref", "pscan")


def make_inputs(args: argparse.Namespace, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs at the Mamba-2 init scales: A in -[1, 16], dt ~ softplus(raw + dt_bias) in ~[1e-3, 0.1]."""
    g = torch.Generator().manual_seed(seed)
    b, h, p, n, ng = args.batch_size, args.heads, args.headdim, args.d_state, args.groups
    dt_init = torch.exp(torch.rand(h, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                        + torch.log(torch.tensor(1e-3)))
    return dict(
        x=torch.randn(b, length, h, p, generator=g),
        dt=torch.randn(b, length, h, generator=g) * 0.5,
        A=-(1 + 15 * torch.rand(h, generator=g)),
        B=torch.randn(b, length, ng, n, generator=g),
        C=torch.randn(b, length, ng, n, generator=g),
        D=torch.ones(h),
        dt_bias=dt_init + torch.log(-torch.expm1(-dt_init)),  # softplus^-1
    )


def ssd_pscan(x, dt, A, B, C, D, dt_bias):
    """Mamba-2 on mambapy's diagonal parallel scan (see the module docstring). Shapes as ``ssd``."""
    from mambapy.pscan import pscan

    b, length, h, p = x.shape
    n = B.shape[-1]
    rep = h // B.shape[2]
    dt = F.softplus(dt + dt_bias)
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    decay = torch.exp(dt * A)[..., None, None].expand(b, length, h, p, n).reshape(b, length, h * p, n)
    drive = ((dt[..., None] * x)[..., None] * Bh[:, :, :, None, :]).reshape(b, length, h * p, n)
    states = pscan(decay, drive).view(b, length, h, p, n)
    return (states @ Ch[..., None]).squeeze(-1) + x * D[:, None]


def contenders(chunk: int) -> dict[str, Callable]:
    return {
        "chunked": lambda i: ssd_chunked(**i, dt_softplus=True, chunk_size=chunk),
        "ref": lambda i: ssd_ref(**i, dt_softplus=True),
        "pscan": lambda i: ssd_pscan(**i),
    }


def make_calls(fn: Callable, inputs: dict[str, torch.Tensor]) -> dict[str, Callable]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    cot = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))

    def fwd() -> None:
        with torch.no_grad():
            fn(inputs)

    def fwd_bwd() -> None:
        for t in leaves.values():
            t.grad = None
        (fn(leaves) * cot).sum().backward()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def check(inputs: dict[str, torch.Tensor], fns: dict[str, Callable], names: list[str], n: int, tol: float) -> dict:
    head = {k: (v[:, :n] if v.dim() > 1 else v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = fns["ref"](head)
        out = {}
        for name in names:
            if name != "ref":
                err = ((fns[name](head) - ref).abs().max() / ref.abs().max()).item()
                out[name] = err
                if err > tol:
                    raise SystemExit(f"{name} differs from the reference: max rel err {err:.3g} > {tol}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths L")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per call")
    ap.add_argument("--heads", type=int, default=8, help="heads h (Adventurer-T: 512 / 64 = 8)")
    ap.add_argument("--headdim", type=int, default=64, help="channels per head p")
    ap.add_argument("--d-state", type=int, default=64, help="state size n")
    ap.add_argument("--groups", type=int, default=1, help="B/C groups g")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of the chunked path")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of the chunked path; the median is reported")
    ap.add_argument("--slow-rounds", type=int, default=1, help="timed rounds of ref and pscan")
    ap.add_argument("--ref-max-len", type=int, default=4096, help="longer L: reference extrapolated, not run")
    ap.add_argument("--pscan-max-len", type=int, default=1024,
                    help="longer L: pscan extrapolated, not run (its memory is ~b*L*h*p*n*4 bytes per tensor)")
    ap.add_argument("--no-pscan", action="store_true", help="skip the mambapy baseline entirely")
    ap.add_argument("--check-len", type=int, default=256, help="tokens compared with the reference before timing")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative output difference before aborting")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    names = [n for n in NAMES if not (n == "pscan" and args.no_pscan)]
    if "pscan" in names:
        try:
            import mambapy  # noqa: F401
        except ImportError:
            raise SystemExit("mambapy is not installed (pip install mambapy==1.2.0), or pass --no-pscan") from None
    fns = contenders(args.chunk)
    max_len = {"chunked": None, "ref": args.ref_max_len, "pscan": args.pscan_max_len}
    rounds = {"chunked": args.rounds, "ref": args.slow_rounds, "pscan": args.slow_rounds}
    log(
        f"SSD b={args.batch_size} h={args.heads} p={args.headdim} n={args.d_state} g={args.groups} chunk={args.chunk}, "
        f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU {cpu_name()}"
    )
    warm = make_inputs(args, 64, args.seed)
    for name in names:  # one short untimed call each: first-call setup is not what is measured
        for call in make_calls(fns[name], warm).values():
            call()

    results: dict[int, dict] = {}
    for length in args.lengths:
        inputs = make_inputs(args, length, args.seed)
        check_err = check(inputs, fns, names, min(length, args.check_len), args.tol)
        run = [n for n in names if max_len[n] is None or length <= max_len[n]]
        res: dict[str, dict] = {"check_max_rel_err": check_err}
        for kind in ("fwd", "fwd+bwd"):
            calls = {n: make_calls(fns[n], inputs)[kind] for n in run}
            calls["chunked"]()  # warm the allocator at this size (cheap for the fast path)
            times: dict[str, list[float]] = {n: [] for n in run}
            r = 0
            while any(len(times[n]) < rounds[n] for n in run):
                order = run[r % len(run):] + run[: r % len(run)]
                for n in order:
                    if len(times[n]) < rounds[n]:
                        t0 = time.perf_counter()
                        calls[n]()
                        times[n].append(time.perf_counter() - t0)
                r += 1
            res[kind] = {n: statistics.median(t) for n, t in times.items()}
            res[kind + "_rounds"] = times
            log(f"  L={length} {kind}: " + ", ".join(f"{n} {1e3 * res[kind][n]:.1f} ms" for n in run))
        results[length] = res

    # extrapolate skipped cells linearly in L from the longest measured length
    table: dict[int, dict[str, dict[str, tuple[float, bool]]]] = {}
    for kind in ("fwd", "fwd+bwd"):
        for n in names:
            measured = [length for length in args.lengths if n in results[length][kind]]
            for length in args.lengths:
                if n in results[length][kind]:
                    val = (results[length][kind][n], False)
                elif measured:
                    base = max(measured)
                    val = (results[base][kind][n] * length / base, True)
                else:
                    val = (float("nan"), True)
                table.setdefault(length, {}).setdefault(kind, {})[n] = val

    def fmt(v: tuple[float, bool]) -> str:
        return ("~" if v[1] else "") + f"{1e3 * v[0]:.1f}"

    log("")
    log(f"CPU {cpu_name()}, {torch.get_num_threads()} threads, fp32, b={args.batch_size}, h={args.heads}, "
        f"p={args.headdim}, n={args.d_state}, g={args.groups}, chunk {args.chunk}; times in ms, ~ = extrapolated")
    others = [n for n in names if n != "chunked"]
    head = ["L", "pass", *[f"{n} ms" for n in names], *[f"{n} / chunked" for n in others]]
    log("| " + " | ".join(head) + " |")
    log("|" + "---|" * len(head))
    ratios: dict[str, float] = {}
    for length in args.lengths:
        for kind in ("fwd", "fwd+bwd"):
            row = table[length][kind]
            cells = [str(length), kind, *[fmt(row[n]) for n in names]]
            for n in others:
                ratio = row[n][0] / row["chunked"][0]
                ratios[f"L{length}_{kind}_{n}_over_chunked"] = ratio
                cells.append(("~" if row[n][1] else "") + f"{ratio:.1f}x")
            log("| " + " | ".join(cells) + " |")

    if args.json:
        write_record(
            args.json, args, argv,
            results={str(k): v for k, v in results.items()},
            table_ms={str(k): {kind: {n: {"ms": 1e3 * v[0], "extrapolated": v[1]} for n, v in row.items()}
                               for kind, row in kinds.items()} for k, kinds in table.items()},
            ratios=ratios,
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
