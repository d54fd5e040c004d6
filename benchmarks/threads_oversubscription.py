"""What torch's thread count costs when another process shares the cores (the default of ``--threads``).

Times ``ratelab train --model crate_nano_patch4_16 --dataset digits --max-steps 60`` (the whole command: start-up,
60 steps, final evaluation, checkpoint) with 1 and 2 torch threads and with ``--threads 0`` (automatic,
:mod:`ratelab.core.threads`), once on a quiet machine and once with ``--competitors`` CPU-bound processes running
beside it. Repeats are interleaved (every configuration once per round); the median of ``--repeats`` is reported.

    python benchmarks/threads_oversubscription.py --repeats 5 --json benchmarks/records/<date>/threads.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import LoadMonitor, machine_info, machine_line, write_record  # noqa: E402

SPIN = "while True: pass"


def run_once(threads: int, steps: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "ratelab", "train", "--model", "crate_nano_patch4_16", "--dataset", "digits",
               "--max-steps", str(steps), "--out-dir", d, "--no-progress", "--threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--competitors", type=int, default=1, help="CPU-bound processes beside the busy runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    info = machine_info()
    print(f"machine: {machine_line(info)}")
    configs = [1, 2, 0]
    results, loads = {}, {}
    for cond in ("quiet", "busy"):
        procs = []
        if cond == "busy":
            procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.competitors)]
            time.sleep(1.0)
        try:
            times = {c: [] for c in configs}
            with LoadMonitor() as mon:
                for r in range(args.repeats):
                    for c in configs[r % len(configs):] + configs[:r % len(configs)]:
                        times[c].append(run_once(c, args.steps, env))
        finally:
            for p in procs:
                p.kill()
                p.wait()
        results[cond] = times
        loads[cond] = mon.record
        print(f"{cond}: " + ", ".join(f"{'auto' if c == 0 else f'{c} thr'} {statistics.median(t):.1f} s"
                                      for c, t in times.items()) + f"  ({mon.line()})")
    rows = ["| machine state | 1 thread | 2 threads | --threads 0 (auto) |", "|---|---|---|---|"]
    for cond, times in results.items():
        label = "quiet" if cond == "quiet" else f"{args.competitors} CPU-bound process(es) beside it"
        rows.append(f"| {label} | " + " | ".join(f"{statistics.median(times[c]):.1f} s" for c in configs) + " |")
    table = "\n".join(rows)
    print(table)
    if args.json:
        write_record(args.json, args, sys.argv, info,
                     seconds={k: {str(c): v for c, v in t.items()} for k, t in results.items()}, load=loads,
                     table=table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
