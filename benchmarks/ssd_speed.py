"""SSD (Mamba-2 scan) speed and memory on CPU: ratelab's chunked paths vs the sequential reference vs mambapy's scan.

Contenders, all fp32, same inputs (``dt`` goes through ``dt_bias`` + softplus in each):

* ``recompute``: ``ratelab.kernels.ssd.ssd_recompute`` (chunk size ``--chunk``), what ``ssd(backend="auto")`` runs
  on CPU: the chunked algorithm segment by segment without autograd (``D`` included) and a hand-written backward
  that rebuilds the chunk tensors segment by segment (it keeps only the inputs and the segment states); without
  autograd (the "fwd" rows) the same segment forward. The contender every ratio is taken against (``--main`` to
  change it).
* ``chunked``: ``ratelab.kernels.ssd.ssd_chunked``, the same forward differentiated op by op by autograd (it keeps
  every chunk-level intermediate).
* ``compiled`` (``--compile``): ``ssd(backend="compiled")``, ``ssd_chunked`` through ``torch.compile`` (inductor
  C++/OpenMP, ``cpp.dynamic_threads`` on so that one compiled graph follows ``--threads``); compilation happens in
  the warm-up calls (one per length and pass), untimed.
* ``ref``: ``ratelab.kernels.ssd.ssd_ref``, the per-token loop (time axis unbound once, so its backward is linear).
* ``pscan``: the same Mamba-2 computation built on ``mambapy.pscan.pscan`` (PyPI ``mambapy``, pure PyTorch Blelloch
  scan; mambapy's own Mamba-2 needs mamba_ssm, so it cannot be used on CPU). mambapy's scan is diagonal,
  ``H_t = A_t * H_{t-1} + X_t`` elementwise on ``(b, L, D, N)``: the scalar head decay ``exp(dt A)`` is broadcast to
  ``D = heads * headdim`` channels and ``N = d_state``, the drive is ``dt x B^T``, and ``y = H C + D x`` is read out
  afterwards. It materializes ``(b, L, heads*headdim, d_state)`` tensors, so its memory grows as ``L * h * p * n``.

Default shapes are Adventurer-T's mixer (research notes §1.3): d_model 256 -> d_inner 512 = 8 heads x headdim 64,
d_state 64, ngroups 1, at L = 196, 1024, 4096 and 16384. Timed: the forward under ``torch.no_grad`` ("fwd"), and
forward + backward to every input ("fwd+bwd"): ``y.backward(cot)``, the vector-Jacobian product with a fixed random
cotangent ``cot`` -- the kernel's own forward and backward (until 2026-12-01 the script timed
``(y * cot).sum().backward()``, whose two full-size multiplies belong to no kernel: about 15 ms of the 160 ms of
``recompute`` at L = 4096, 1 thread; ``--loss-projection`` times that again). Protocol (``_machine.py``): for each
of ``--threads`` (default 1 and 2) and each length, ``--warmup`` untimed calls, then ``--repeats`` (default 5)
repeats in which every contender runs once, in rotated order; medians, IQRs, and the speed-up of the main contender
as the median of per-repeat ratios. A slow contender can be skipped above a length (``--ref-max-len``,
``--pscan-max-len``: pscan's memory grows as ``L * h * p * n``); its cell is then extrapolated linearly in ``L`` from
the longest measured length and marked ``~`` (the reference is a loop of identical steps, so its time is linear in
``L``; the scan is O(L) work too, up to its power-of-two padding). Before timing, at each length, every contender is
compared with the reference on the first ``--check-len`` tokens (outputs, fp32), and the run stops on a mismatch.

Peak memory of one forward + backward (``--no-memory`` skips it): a fresh subprocess per (contender, length) at the
first thread count, of ``(y * cot).sum().backward()`` (``y`` freed before the backward, as in the recorded tables),
the growth of the resident set's high-water mark during the call (``_machine.peak_rss_growth_mib``;
the inputs exist before it starts, their gradients are counted), after one untimed call for ``compiled``.

Examples::

    python benchmarks/ssd_speed.py --threads 1 2 --compile --json runs/bench/ssd_speed.json
    python benchmarks/ssd_speed.py --quick        # L = 196 and 1024, 3 repeats
    python benchmarks/ssd_speed.py --smoke        # tiny shapes, 1 repeat: a wiring check, numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import (  # benchmarks/ is on sys.path when a script here runs
    PEAK_RSS_ENV,
    LoadMonitor,
    add_protocol_args,
    fmt_range,
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

from ratelab.kernels.ssd import ssd, ssd_chunked, ssd_recompute, ssd_ref

NAMES = ("recompute", "chunked", "compiled", "ref", "pscan")
SMOKE = dict(batch_size=1, heads=2, headdim=8, d_state=8, chunk=16, lengths=[40, 100], repeats=1)


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
        "recompute": lambda i: ssd_recompute(**i, dt_softplus=True, chunk_size=chunk),
        "chunked": lambda i: ssd_chunked(**i, dt_softplus=True, chunk_size=chunk),
        "compiled": lambda i: ssd(**i, dt_softplus=True, chunk_size=chunk, backend="compiled"),
        "ref": lambda i: ssd_ref(**i, dt_softplus=True),
        "pscan": lambda i: ssd_pscan(**i),
    }


def _enable_compile() -> None:
    import torch._inductor.config as inductor_config

    inductor_config.cpp.dynamic_threads = True  # one compiled graph runs with every --threads count


def memory_worker(spec: dict, args: argparse.Namespace) -> float:
    """Peak RSS growth (MiB) of one forward + backward of one contender at one length (run in a fresh process)."""
    if spec["name"] == "compiled":
        _enable_compile()
    inputs = make_inputs(args, spec["length"], args.seed)
    # as in the recorded tables: y is dropped before the backward (the loss projection), so the peak is the kernel's
    call = make_calls(contenders(args.chunk)[spec["name"]], inputs, loss_projection=True)["fwd+bwd"]
    if spec["name"] == "compiled":
        call()  # compile outside the measurement
    return peak_rss_growth_mib(call)


def measure_memory(name: str, length: int, args: argparse.Namespace) -> float:
    spec = json.dumps({"name": name, "length": length})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", spec, "--threads", str(args.threads[0]),
           "--batch-size", str(args.batch_size), "--heads", str(args.heads), "--headdim", str(args.headdim),
           "--d-state", str(args.d_state), "--groups", str(args.groups), "--chunk", str(args.chunk),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.memory_timeout,
                          env=dict(os.environ, **PEAK_RSS_ENV))
    if proc.returncode != 0:
        raise SystemExit(f"memory worker for {spec} failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def make_calls(fn: Callable, inputs: dict[str, torch.Tensor], loss_projection: bool = False) -> dict[str, Callable]:
    """The timed calls: "fwd" under no_grad, "fwd+bwd" the forward and the backward with a random cotangent (as
    ``(y * cot).sum().backward()`` with ``loss_projection``)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    cot = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1))

    def fwd() -> None:
        with torch.no_grad():
            fn(inputs)

    def fwd_bwd() -> None:
        for t in leaves.values():
            t.grad = None
        if loss_projection:
            (fn(leaves) * cot).sum().backward()
        else:
            fn(leaves).backward(cot)

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


def markdown(runs: dict[int, dict], lengths: list[int], names: list[str], threads: list[int], main: str,
             memory: dict | None = None) -> str:
    """The main contender's medians, the per-repeat speed-up of it over each other contender (1- and 2-thread
    columns), and the peak memory of every contender's forward + backward."""
    others = [n for n in names if n != main]
    head = ["L", "pass", *[f"{main} ms, {t} thr" for t in threads]]
    for n in others:
        head += [f"{n} / {main}, {t} thr" for t in threads]
    if memory:
        head += [f"{n} peak MiB" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for length in lengths:
        for kind in ("fwd", "fwd+bwd"):
            cells = [str(length), kind]
            cells += [fmt_range(runs[t][length][kind]["summary_s"][main], 1e3) for t in threads]
            for n in others:
                for t in threads:
                    r = runs[t][length][kind]["speedup"].get(n)
                    if r is not None:
                        cells.append(fmt_ratio(r, 1))
                    else:  # not run at this length: ratio of the extrapolated median, marked ~
                        ext = extrapolate(runs[t], lengths, names, kind)[length]
                        cells.append(f"~{ext[n][0] / ext[main][0]:.1f}x (extrapolated)")
            if memory:
                cells += [(f"{memory[length][n]:.0f}" if kind == "fwd+bwd" and n in memory.get(length, {}) else "")
                          for n in names]
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
    add_protocol_args(ap, repeats=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="sequence lengths L (default 196 1024 4096 16384; --quick 196 1024)")
    ap.add_argument("--batch-size", type=int, default=2, help="sequences per call")
    ap.add_argument("--heads", type=int, default=8, help="heads h (Adventurer-T: 512 / 64 = 8)")
    ap.add_argument("--headdim", type=int, default=64, help="channels per head p")
    ap.add_argument("--d-state", type=int, default=64, help="state size n")
    ap.add_argument("--groups", type=int, default=1, help="B/C groups g")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of the chunked paths")
    ap.add_argument("--main", default="recompute", choices=("recompute", "chunked", "compiled"),
                    help="the contender the speed-ups are taken of (default: recompute, what auto runs on CPU)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile contender ('compiled')")
    ap.add_argument("--ref-max-len", type=int, default=4096, help="longer L: reference extrapolated, not run")
    ap.add_argument("--pscan-max-len", type=int, default=1024,
                    help="longer L: pscan extrapolated, not run (its memory is ~b*L*h*p*n*4 bytes per tensor)")
    ap.add_argument("--no-pscan", action="store_true", help="skip the mambapy baseline entirely")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--loss-projection", action="store_true",
                    help="time fwd+bwd as (y * cot).sum().backward() (the protocol of the records before 2026-12-01) "
                         "instead of y.backward(cot)")
    ap.add_argument("--memory-timeout", type=float, default=900.0, help="seconds allowed per memory subprocess")
    ap.add_argument("--quick", action="store_true", help="L = 196 and 1024, 3 repeats")
    ap.add_argument("--smoke", action="store_true",
                    help="wiring check: tiny shapes (b=1, h=2, p=8, n=8, chunk 16), L = 40 and 100, 1 repeat")
    ap.add_argument("--check-len", type=int, default=256, help="tokens compared with the reference before timing")
    ap.add_argument("--tol", type=float, default=1e-4, help="max relative output difference before aborting")
    ap.add_argument("--seed", type=int, default=0, help="data seed")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.smoke:
        for k, v in SMOKE.items():
            if k != "lengths" and k != "repeats":
                setattr(args, k, v)
    if args.memory_worker is not None:
        set_threads(args.threads[0])
        print(memory_worker(json.loads(args.memory_worker), args))
        return 0
    if args.lengths is None:
        args.lengths = SMOKE["lengths"] if args.smoke else [196, 1024] if args.quick else [196, 1024, 4096, 16384]
    if args.repeats is None:
        args.repeats = 1 if args.smoke else 3 if args.quick else 5
    log = lambda s: print(s, flush=True)  # noqa: E731
    names = [n for n in NAMES if not (n == "pscan" and args.no_pscan) and not (n == "compiled" and not args.compile)]
    if args.main not in names:
        raise SystemExit(f"--main {args.main}: not among the contenders {names} (add --compile?)")
    names.remove(args.main)
    names.insert(0, args.main)
    if "pscan" in names:
        try:
            import mambapy  # noqa: F401
        except ImportError:
            raise SystemExit("mambapy is not installed (pip install mambapy==1.2.0), or pass --no-pscan") from None
    if args.compile:
        _enable_compile()
    info = machine_info(packages=("mambapy",))
    shape = (f"b={args.batch_size} h={args.heads} p={args.headdim} n={args.d_state} g={args.groups} "
             f"chunk={args.chunk}")
    print_header(f"SSD {shape}, fp32", info, log)
    fns = contenders(args.chunk)
    max_len = {"recompute": None, "chunked": None, "compiled": None, "ref": args.ref_max_len,
               "pscan": args.pscan_max_len}
    warm = make_inputs(args, 64, args.seed)
    for name in names:  # one short untimed call each: first-call setup is not what is measured
        if name != "compiled":  # (compiled: one compilation per shape, done by the warm-up of each length)
            for call in make_calls(fns[name], warm, args.loss_projection).values():
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
                    calls = {n: make_calls(fns[n], inputs, args.loss_projection)[kind] for n in run}
                    times = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, log=log,
                                             label=f"{t} thr L={length} {kind} ")
                    res[kind] = {"times_s": times, "summary_s": {n: summary(v) for n, v in times.items()},
                                 "speedup": {n: ratio_summary(v, times[args.main])
                                             for n, v in times.items() if n != args.main}}
                runs[t][length] = res
        loads[t] = mon.record
        log(f"  {t} thread(s): {mon.line()}")
    memory: dict[int, dict[str, float]] = {}
    if not args.no_memory:
        for length in args.lengths:
            memory[length] = {n: measure_memory(n, length, args) for n in names
                              if max_len[n] is None or length <= max_len[n]}
            log(f"  peak memory, fwd+bwd, L={length}: "
                + ", ".join(f"{n} {v:.0f} MiB" for n, v in memory[length].items()))

    log("")
    log(f"machine: {machine_line(info)}")
    log(f"SSD {shape}, fp32; median [IQR] of {args.repeats} interleaved repeats after {args.warmup} warm-up "
        f"call(s); 'x / {args.main}' = median [IQR] of the per-repeat ratios; ~ = extrapolated linearly in L; peak "
        f"MiB: growth of the RSS high-water mark during one forward + backward, fresh process, {args.threads[0]} "
        "thread(s)")
    for t in args.threads:
        r = loads[t]
        log(f"load, {t} thread(s): 1-min load average {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f}, "
            f"other processes {100 * r.get('other_cpu_frac', float('nan')):.0f}% of the CPU time")
    table = markdown(runs, args.lengths, names, args.threads, args.main, memory or None)
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
                     load={str(t): v for t, v in loads.items()}, table=table, memory_mib=memory,
                     detail={str(t): v for t, v in details.items()})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
