"""Launching test scripts under torchrun (gloo on CPU), shared by the data-parallel tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, *args: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script args...`` as ``nproc`` local processes; assert success and show both streams' tails if not."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *map(str, args),
    ]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res
