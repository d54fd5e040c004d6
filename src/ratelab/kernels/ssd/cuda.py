"""Optional dispatch to mamba_ssm's fused Triton SSD kernel (``mamba_chunk_scan_combined``).

Nothing here imports ``mamba_ssm`` (and with it Triton) until a CUDA call asks for it, so CPU installs never pay for
or warn about it.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs

INSTALL_HINT = "install the optional package with `pip install mamba-ssm` (Linux, CUDA)"


def mamba_ssm_installed() -> bool:
    """Whether ``mamba_ssm`` is on the path, without importing it."""
    return importlib.util.find_spec("mamba_ssm") is not None


@functools.lru_cache(maxsize=1)
def _load_kernel() -> Callable | ImportError:
    """The fused kernel, or the ImportError that loading it raised (cached: the import is slow)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as e:
        return e
    return mamba_chunk_scan_combined


def cuda_kernel_available() -> bool:
    """Whether the fused kernel can run here: CUDA present and ``mamba_ssm`` imports (imports it on first call)."""
    return torch.cuda.is_available() and mamba_ssm_installed() and not isinstance(_load_kernel(), ImportError)


def ssd_cuda(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused mamba_ssm kernel; same contract as :func:`ratelab.kernels.ssd.ssd`.

    Raises:
        RuntimeError: the tensors are not on CUDA, or ``mamba_ssm`` is not installed / fails to import.
    """
    check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not x.is_cuda:
        raise RuntimeError(f"ssd backend='cuda' needs CUDA tensors, got x on {x.device}; use backend='chunked'")
    if not mamba_ssm_installed():
        raise RuntimeError(f"ssd backend='cuda' needs mamba_ssm, which is not installed: {INSTALL_HINT}")
    kernel = _load_kernel()
    if isinstance(kernel, ImportError):
        raise RuntimeError(f"ssd backend='cuda': mamba_ssm is installed but failed to import: {kernel}") from kernel
    out = kernel(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        dt_bias=dt_bias,
        initial_states=initial_state,
        dt_softplus=dt_softplus,
        dt_limit=tuple(dt_limit),
        return_final_states=return_final_state,
    )
    return out
