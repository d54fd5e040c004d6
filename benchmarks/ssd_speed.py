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
projection of ``y`` to every input ("fwd+bwd"). Protocol (``_machine.py``): for each of ``--threads`` (default 1
and 2) and each length, ``--warmup`` untimed calls, then ``--repeats`` (default 5) repeats in which every contender
runs once, in rotated order; medians, IQRs, and the speed-up of the chunked path as the median of per-repeat ratios.
A slow contender can be skipped above a length (``--ref-max-len``, ``--pscan-max-len``: pscan's memory grows as
``L * h * p * n``); its cell is then extrapolated linearly in ``L`` from the longest measured length and marked
``~`` (the reference is a loop of identical steps, so its time is linear in ``L``; the scan is O(L) work too, up to
its power-of-two padding). Before timing, at each length, chunked and pscan are compared with the reference on the
first ``--check-len`` tokens (outputs, fp32), and the run stops on a mismatch.

Example::

    python benchmarks/ssd_speed.py --threads 1 2 --lengths 256 1024 4096 --json runs/bench/ssd_speed.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    LoadMonitor,
    add_protocol_args,
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


def extrapolate(results: dict[int, dict], lengths: list[int], names: list[str], kind: str
                ) -> dict[int, dict[str, tuple[float, bool]]]:
    """Median seconds per (length, contender); a contender not run at a length is scaled linearly in L from the
    longest length it ran at and flagged ``True`` (extrapolated)."""
    out: dict[int, dict[str, tuple[float, bool]]] = {}
    for n in names:
        measured = [length for length in lengths if n in results[length][kind]["summary_s"]]
        for length in lengths:
            s = results[length][kind]["summary_s"]
            if n in s:
                val = (s[n]["median"], False)
            elif measured:
                base = max(measured)
                val = (results[base][kind]["summary_s"][n]["median"] * length / base, True)
            else:
                val = (float("nan"), True)
            out.setdefault(length, {})[n] = val
    return out


def markdown(runs: dict[int, dict], lengths: list[int], names: list[str], threads: list[int]) -> str:
    """Chunked medians and the per-repeat speed-up over each other contender, 1- and 2-thread columns."""
    others = [n for n in names if n != "chunked"]
    head = ["L", "pass", *[f"chunked ms, {t} thr" for t in threads]]
    for n in others:
        head += [f"{n} / chunked, {t} thr" for t in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length in lengths:
        for kind in ("fwd", "fwd+bwd"):
            cells = [str(length), kind]
            cells += [fmt_range(runs[t][length][kind]["summary_s"]["chunked"], 1e3) for t in threads]
            for n in others:
                for t in threads:
                    r = runs[t][length][kind]["speedup_of_chunked"].get(n)
                    if r is not None:
                        cells.append(fmt_ratio(r, 1))
                    else:  # not run at this length: ratio of the extrapolated median, marked ~
                        ext = extrapolate(runs[t], lengths, names, kind)[length]
                        cells.append(f"~{ext[n][0] / ext['chunked'][0]:.1f}x (extrapolated)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail(runs: dict[int, dict], lengths: list[int], names: list[str], t: int) -> str:
    """Median ms of every contender at one thread count (~ = extrapolated linearly in L)."""
    head = ["L", "pass", *[f"{n} ms" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length in lengths:
        for kind in ("fwd", "fwd+bwd"):
            ext = extrapolate(runs[t], lengths, names, kind)[length]
            lines.append("| " + " | ".join([str(length), kind, *[("~" if ext[n][1] else "") + f"{1e3 * ext[n][0]:.1f}"
                                                                  for n in names]]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="sequence lengths L")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per call")
    ap.add_argument("--heads", type=int, default=8, help="heads h (Adventurer-T: 512 / 64 = 8)")
    ap.add_argument("--headdim", type=int, default=64, help="channels per head p")
    ap.add_argument("--d-state", type=int, default=64, help="state size n")
    ap.add_argument("--groups", type=int, default=1, help="B/C groups g")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of the chunked path")
    ap.add_argument("--ref-max-len", type=int, default=4096, help="longer L: reference extrapolated, not run")
    ap.add_argument("--pscan-max-len", type=int, default=1024,
                    help="longer L: pscan extrapolated, not run (its memory is ~b*L*h*p*n*4 bytes per tensor)")
    ap.add_argument("--no-pscan", action="store_true", help="skip the mambapy baseline entirely")
    ap.add_argument("--check-len", type=int, default=256, help="tokens compared with the reference before timing")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative output difference before aborting")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    args = ap.parse_args(argv)

    log = lambda s: print(s, flush=True)  # noqa: E731
    names = [n for n in NAMES if not (n == "pscan" and args.no_pscan)]
    if "pscan" in names:
        try:
            import mambapy  # noqa: F401
        except ImportError:
            raise SystemExit("mambapy is not installed (pip install mambapy==1.2.0), or pass --no-pscan") from None
    info = machine_info(packages=("mambapy",))
    shape = (f"b={args.batch_size} h={args.heads} p={args.headdim} n={args.d_state} g={args.groups} "
             f"chunk={args.chunk}")
    print_header(f"SSD {shape}, fp32", info, log)
    fns = contenders(args.chunk)
    max_len = {"chunked": None, "ref": args.ref_max_len, "pscan": args.pscan_max_len}
    warm = make_inputs(args, 64, args.seed)
    for name in names:  # one short untimed call each: first-call setup is not what is measured
        for call in make_calls(fns[name], warm).values():
            call()

    checks: dict[int, dict] = {}
    runs: dict[int, dict] = {}
    loads: dict[int, dict] = {}
    for t in args.threads:
        set_threads(t)
        runs[t] = {}
        with LoadMonitor() as mon:
            for length in args.lengths:
                inputs = make_inputs(args, length, args.seed)
                if length not in checks:
                    checks[length] = check(inputs, fns, names, min(length, args.check_len), args.tol)
                run = [n for n in names if max_len[n] is None or length <= max_len[n]]
                res: dict[str, dict] = {}
                for kind in ("fwd", "fwd+bwd"):
                    calls = {n: make_calls(fns[n], inputs)[kind] for n in run}
                    times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, log=log,
                                             label=f"{t} thr L={length} {kind} ")
                    res[kind] = {"times_s": times, "summary_s": {n: summary(v) for n, v in times.items()},
                                 "speedup_of_chunked": {n: ratio_summary(v, times["chunked"])
                                                        for n, v in times.items() if n != "chunked"}}
                runs[t][length] = res
        loads[t] = mon.record
        log(f"  {t} thread(s): {mon.line()}")

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"SSD {shape}, fp32; median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up "
        "call(s); 'x / chunked' = median [IQR] of the per-repeat ratios; ~ = extrapolated linearly in L")
    for t in args.threads:
        r = loads[t]
        log(f"load, {t} thread(s): 1-min load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
            f"other processes {100 * r.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(runs, args.lengths, names, args.threads)
    log(table)
    details = {}
    for t in args.threads:
        details[t] = detail(runs, args.lengths, names, t)
        log("")
        log(f"all medians, {t} thread(s):")
        log(details[t])
    if args.json:
        write_record(args.json, args, argv, machine=info, checks=checks,
                     runs={str(t): {str(k): v for k, v in r.items()} for t, r in runs.items()},
                     load={str(t): v for t, v in loads.items()}, table=table,
                     detail={str(t): v for t, v in details.items()})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
