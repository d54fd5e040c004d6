"""The measurement protocol every script in ``benchmarks/`` follows, and the machine description it records.

Protocol (docs/benchmarks.md repeats it beside the tables):

* ``--threads 1 2`` (the default) runs the whole measurement once per torch intra-op thread count, in one process.
* ``--warmup`` untimed calls per contender, then ``--repeats`` (default 5) timed repeats. In every repeat each
  contender is called once, baseline and ours back to back in a rotated order (:func:`time_interleaved`), so a slow
  spell of a shared machine hits all of them alike.
* Reported: per contender the median and interquartile range of the repeats; per baseline the speed-up of ours
  computed *per repeat* (baseline seconds / our seconds in the same repeat) and the median of those ratios
  (:func:`ratio_summary`), which is the figure the docs quote.
* A header with the CPU model (``/proc/cpuinfo``), core count, torch version and build, the BLAS torch was built
  with (``torch.__config__.show()``), numpy's BLAS (``threadpoolctl``) and the optional packages that change a
  baseline (e.g. ``opt_einsum``); around every thread count the load average (``os.getloadavg``) and the share of
  the machine's CPU time that *other* processes used while it ran (``/proc/stat`` minus this process tree), so a
  noisy run is visible in the record itself (:class:`LoadMonitor`).
* ``--json PATH`` writes all of it, every raw repeat included, next to the printed table (:func:`write_record`).

A new benchmark extends this by calling :func:`add_protocol_args`, :func:`print_header`, then per thread count
:func:`set_threads` + :class:`LoadMonitor` around :func:`time_interleaved`; variants of a contender (compiled vs
eager, another backend) are just more entries of the dict it times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# Environment variables that change what a benchmark measures (thread pools, BLAS kernels, allocator); recorded
# when set so that two records can be told apart.
ENV_KEYS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_DEBUG_CPU_TYPE",
    "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY", "OMP_PROC_BIND", "MALLOC_MMAP_THRESHOLD_", "TIMM_FUSED_ATTN", "CUDA_VISIBLE_DEVICES",
)


# ---- machine -------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model: ``/proc/cpuinfo``'s ``model name``, else ``lscpu``'s, else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """``"GPU <name>"`` for a CUDA device string, else ``"CPU <model name>"``."""
    import torch

    if str(device).startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU {cpu_name()}"


def _torch_blas() -> dict:
    """What ``torch.__config__.show()`` says about BLAS/LAPACK, oneDNN and OpenMP (MKL is linked statically into
    torch's wheels, so threadpoolctl cannot see it; this text is the only source)."""
    import torch

    text = torch.__config__.show()
    out: dict = {}
    for key in ("BLAS_INFO", "LAPACK_INFO"):
        m = re.search(rf"{key}=([^,\s]+)", text)
        if m:
            out[key.lower()] = m.group(1)
    m = re.search(r"Math Kernel Library Version ([0-9.]+)", text)
    if m:
        out["mkl"] = m.group(1)
    m = re.search(r"MKL-DNN v([0-9.]+)", text)
    if m:
        out["onednn"] = m.group(1)
    m = re.search(r"OpenMP (\d+)", text)
    if m:
        out["openmp"] = m.group(1)
    if "OpenBLAS" in text:
        out["openblas"] = True
    try:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        pass
    return out


def _threadpools() -> list[dict]:
    """threadpoolctl's view of the loaded thread pools and BLAS libraries (numpy's OpenBLAS, torch's libgomp)."""
    try:
        import numpy  # noqa: F401  (loads numpy's BLAS so threadpoolctl can see it)
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "version", "num_threads", "architecture", "threading_layer")
    return [{k: p[k] for k in keep if k in p} | {"library": Path(p.get("filepath", "")).name}
            for p in threadpool_info()]


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(packages: Iterable[str] = ()) -> dict:
    """Everything a figure depends on besides the code: CPU, cores, memory, torch build and BLAS, numpy's BLAS,
    the versions of ``packages`` (``None`` = not installed), and the relevant environment variables."""
    import numpy
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,  # None for a CPU-only wheel
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch_blas": _torch_blas(),
        "numpy": numpy.__version__,
        "threadpools": _threadpools(),
        "packages": {p: _package_version(p) for p in packages},
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def machine_line(info: dict) -> str:
    """One line for a table caption: CPU, cores, torch build, BLAS, numpy BLAS, packages."""
    tb = info["torch_blas"]
    blas = tb.get("blas_info", "?")
    parts = [f"MKL {tb['mkl']}" if "mkl" in tb else None, f"oneDNN {tb['onednn']}" if "onednn" in tb else None,
             f"CPU capability {tb['cpu_capability']}" if "cpu_capability" in tb else None]
    build = f"CUDA {info['torch_cuda_build']} build" if info["torch_cuda_build"] else "CPU-only build"
    np_blas = [p for p in info["threadpools"] if p.get("user_api") == "blas"]
    np_txt = ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture', '')}".strip()
                       for p in np_blas) or "BLAS not seen"
    line = (f"{info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), {info['mem_gib']} GiB; "
            f"torch {info['torch']} ({build}; BLAS {blas}: {', '.join(p for p in parts if p)}); "
            f"numpy {info['numpy']} ({np_txt})")
    pk = info.get("packages") or {}
    if pk:
        line += "; " + ", ".join(f"{k} {v or 'not installed'}" for k, v in pk.items())
    if info["env"]:
        line += "; env " + " ".join(f"{k}={v}" for k, v in info["env"].items())
    return line


def print_header(title: str, info: dict, log: Callable[[str], None] = print) -> None:
    log(f"{title}")
    log(f"machine: {machine_line(info)}")
    log(f"date (UTC): {info['date_utc']}; command: {command_line()}")


def command_line(argv: Sequence[str] | None = None) -> str:
    return " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}",
                     *(argv if argv is not None else sys.argv[1:])])


# ---- arguments and threads -----------------------------------------------------------------------------------
def add_protocol_args(ap: argparse.ArgumentParser, *, repeats: int | None = 5, warmup: int = 1,
                      threads: Sequence[int] = (1, 2)) -> None:
    """``--threads``, ``--repeats`` (alias ``--rounds``), ``--warmup`` and ``--json``, the same in every script."""
    ap.add_argument("--threads", type=int, nargs="+", default=list(threads),
                    help=f"torch intra-op thread counts, each run in turn (default: {' '.join(map(str, threads))})")
    ap.add_argument("--repeats", "--rounds", dest="repeats", type=int, default=repeats,
                    help=f"timed repeats per contender, interleaved (default: {repeats})")
    ap.add_argument("--warmup", type=int, default=warmup,
                    help=f"untimed calls per contender before timing (default: {warmup})")
    ap.add_argument("--json", type=Path, default=None, help="write the full record (every repeat) here as JSON")


def set_threads(n: int) -> int:
    """Set torch's intra-op thread count (numpy's BLAS too, through threadpoolctl, where installed); returns it."""
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n, user_api="blas")
    except ImportError:
        pass
    return torch.get_num_threads()


# ---- load ----------------------------------------------------------------------------------------------------
def _proc_stat() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from ``/proc/stat``'s ``cpu`` line."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / hz, steal / hz, (busy + idle + iowait + steal) / hz


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # this process and its finished children


class LoadMonitor:
    """Load around a measured block: load averages before and after, and the share of the machine's CPU time
    that other processes used meanwhile (``other_cpu_frac``; 0 on a quiet machine, 1 when others kept every core
    busy), from ``/proc/stat`` minus this process's own CPU time. ``steal_frac``: time the hypervisor gave to
    other guests."""

    def __enter__(self) -> LoadMonitor:
        self.load_before = os.getloadavg()
        self._stat0, self._own0, self._t0 = _proc_stat(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.load_after = os.getloadavg()
        wall = time.perf_counter() - self._t0
        own = _own_cpu_s() - self._own0
        stat1 = _proc_stat()
        self.record = {"loadavg_before": [round(x, 2) for x in self.load_before],
                       "loadavg_after": [round(x, 2) for x in self.load_after],
                       "wall_s": round(wall, 2), "own_cpu_s": round(own, 2)}
        if self._stat0 and stat1:
            busy, steal, total = (b - a for a, b in zip(self._stat0, stat1))
            self.record["other_cpu_frac"] = round(max(0.0, busy - own) / max(total, 1e-9), 3)
            self.record["steal_frac"] = round(steal / max(total, 1e-9), 3)
        self.record["quiet"] = self.quiet()

    def line(self) -> str:
        r = self.record
        s = (f"load average {r['loadavg_before'][0]:.2f} before, {r['loadavg_after'][0]:.2f} after "
             f"(1-min; {os.cpu_count()} cores)")
        if "other_cpu_frac" in r:
            s += f"; other processes used {100 * r['other_cpu_frac']:.0f}% of the machine's CPU time meanwhile"
            if r["steal_frac"] > 0.01:
                s += f", hypervisor steal {100 * r['steal_frac']:.0f}%"
        if not self.quiet():
            s += " -- NOT QUIET: absolute times are inflated; the per-repeat ratios are the usable figures"
        return s

    def quiet(self, max_other: float = 0.1) -> bool:
        """Whether other processes used at most ``max_other`` of the machine's CPU time during the block. (The
        load average is no verdict: it counts this benchmark's own threads and lags by a minute.)"""
        r = self.record
        if "other_cpu_frac" in r:
            return r["other_cpu_frac"] <= max_other
        return r["loadavg_before"][0] <= 0.5 * (os.cpu_count() or 1)


# ---- timing --------------------------------------------------------------------------------------------------
def time_interleaved(calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
                     sync: Callable[[], None] | None = None, log: Callable[[str], None] | None = None,
                     label: str = "") -> dict[str, list[float]]:
    """Seconds per call of every contender, one entry per repeat.

    ``warmup`` untimed calls each first (first-call setup, allocator growth and lazy initialization are not what
    is measured). Repeat ``r`` calls every contender once, the order rotated by ``r`` so that none is always first
    after a context switch; baseline and ours thus run seconds apart and share the machine's state. ``sync`` is
    called before each clock read (``torch.cuda.synchronize`` on a GPU: launches are asynchronous).
    """
    names = list(calls)
    sync = sync or (lambda: None)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
        if log:
            log(f"    {label}repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {_fmt_s(times[n][-1])}" for n in names))
    return times


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def summary(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method), min, max and count of a list of repeats."""
    xs = list(xs)
    q1, q3 = statistics.quantiles(xs, n=4, method="inclusive")[::2] if len(xs) > 1 else (xs[0], xs[0])
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio_summary(baseline: Sequence[float], ours: Sequence[float]) -> dict[str, float]:
    """Speed-up of ours per repeat (baseline seconds / our seconds in the same repeat), summarized."""
    if len(baseline) != len(ours):
        raise ValueError(f"ratio_summary: {len(baseline)} baseline repeats vs {len(ours)} of ours")
    return summary([b / o for b, o in zip(baseline, ours)])


def fmt_range(s: dict[str, float], scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """``"median [q1-q3]"``, e.g. ``"6.0 [5.9-6.3] ms"`` -- the cell format of every table."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(s['median'] * scale)} [{f.format(s['q1'] * scale)}-{f.format(s['q3'] * scale)}]{unit}"


def fmt_ratio(r: dict[str, float] | None, digits: int = 2) -> str:
    """``"**1.70x** [1.62-1.75]"``: median [IQR] of per-repeat ratios (empty for ``None``)."""
    if r is None:
        return ""
    f = f"{{:.{digits}f}}"
    return f"**{f.format(r['median'])}x** [{f.format(r['q1'])}-{f.format(r['q3'])}]"


# ---- peak memory (CPU, Linux) --------------------------------------------------------------------------------
# A fixed glibc mmap threshold for the measuring subprocess: every large tensor is its own mapping, returned to the
# OS when freed, so the resident set tracks live tensor memory instead of heap pages freed earlier and reused.
PEAK_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def proc_status_bytes(key: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0, /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise SystemExit(f"peak memory needs Linux's /proc/self/clear_refs ({e}); run with --no-memory") from e


def peak_rss_growth_mib(fn: Callable[[], object]) -> float:
    """MiB by which the resident set's high-water mark grew while ``fn()`` ran: the extra memory it held at its
    peak. Run it in a fresh process started with :data:`PEAK_RSS_ENV` (``tracemalloc`` would be wrong: it sees
    Python objects, not torch's tensor storage)."""
    reset_peak_rss()
    base = proc_status_bytes("VmRSS")
    fn()
    return (proc_status_bytes("VmHWM") - base) / 2**20


# ---- record --------------------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_record(path, args, argv: list[str] | None, machine: dict | None = None, **fields) -> None:
    """Write a benchmark's JSON record: the command line, the parsed arguments, the machine description
    (:func:`machine_info`), then ``fields`` (the script's results, load records included)."""
    import torch

    record = {
        "command": command_line(argv),
        "args": _jsonable(vars(args)),
        "machine": machine if machine is not None else machine_info(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        **_jsonable(fields),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
