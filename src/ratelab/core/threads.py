"""How many CPU threads torch should use, chosen once per command.

torch starts one intra-op thread per physical core. When other processes keep some of those cores busy, the
OpenMP threads of every parallel region wait for the slowest one, and a small model's step gets many times slower
(measured on this project's 2-core machine with one CPU-bound process beside it: ``ratelab train`` of
``crate_nano_patch4_16`` for 60 steps took 39.9 s with 2 threads and 5.4 s with 1; docs/benchmarks.md "Threads").
:func:`choose_threads` therefore counts the cores other processes are using, over a short sample of
``/proc/stat``, and leaves only the idle ones to torch.

Explicit choices win: a ``--threads N`` argument, then ``OMP_NUM_THREADS`` (which torch already honours).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

__all__ = ["ThreadChoice", "apply_threads", "busy_cpus", "choose_threads", "usable_cpus"]


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = vals[3] + vals[4]
    return sum(vals), idle


def busy_cpus(interval: float = 0.3) -> float | None:
    """How many CPUs (machine-wide, in CPU units) were busy during ``interval`` seconds, or None where
    ``/proc/stat`` is not available. The caller sleeps meanwhile, so this is other processes' load."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(interval)
    b = _cpu_times()
    if b is None or b[0] <= a[0]:
        return None
    total, idle = b[0] - a[0], b[1] - a[1]
    return (os.cpu_count() or 1) * (total - idle) / total


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen and why (printed by the CLI when it is not torch's own default)."""

    threads: int
    reason: str
    changed: bool


def choose_threads(requested: int | None = None, *, interval: float = 0.3) -> ThreadChoice:
    """The thread count for torch's intra-op pool.

    Args:
        requested: an explicit count (``--threads``); 0 or None = decide.
        interval: seconds of ``/proc/stat`` sampling when deciding.

    Returns:
        ``requested`` if given; torch's current count if ``OMP_NUM_THREADS`` is set; otherwise torch's default
        lowered to the CPUs other processes leave idle (at least 1).
    """
    import torch

    current = torch.get_num_threads()
    if requested:
        if requested < 0:
            raise ValueError(f"threads: must be >= 0 (0 = automatic), got {requested}")
        return ThreadChoice(requested, "--threads", requested != current)
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(current, "OMP_NUM_THREADS", False)
    busy = busy_cpus(interval)
    if busy is None:
        return ThreadChoice(current, "torch default (no /proc/stat)", False)
    # Half a core of background noise (shells, editors) is not worth giving a thread up for.
    idle = usable_cpus() - busy
    n = max(1, min(current, int(idle + 0.5)))
    reason = f"{busy:.1f} of {os.cpu_count()} CPUs busy with other processes" if n < current else "torch default"
    return ThreadChoice(n, reason, n != current)


def apply_threads(requested: int | None = None, *, log=print) -> ThreadChoice:
    """:func:`choose_threads` and set it; logs a line when the count differs from torch's default."""
    import torch

    choice = choose_threads(requested)
    if choice.changed:
        torch.set_num_threads(choice.threads)
        if choice.reason != "--threads":
            log(f"[threads] using {choice.threads} thread(s): {choice.reason} (choose with --threads N or "
                "OMP_NUM_THREADS)")
    return choice
