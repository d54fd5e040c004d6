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
