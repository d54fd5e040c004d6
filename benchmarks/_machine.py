"""Machine description shared by the benchmark scripts (recorded beside every figure)."""

from __future__ import annotations

import platform
import subprocess


def cpu_name() -> str:
    """``lscpu``'s model name, else the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """``"GPU <name>"`` for a CUDA device string, else ``"CPU <lscpu model name>"``."""
    import torch

    if str(device).startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU {cpu_name()}"


def write_record(path, args, argv: list[str] | None, **fields) -> None:
    """Write a benchmark's JSON record: the command line, the parsed arguments, torch version, thread count and
    CPU name, then ``fields`` (the script's own results)."""
    import json
    import sys
    from pathlib import Path

    import torch

    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        **fields,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
