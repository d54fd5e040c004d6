"""Mamba-2 / SSD selective state-space recurrence with scalar decay per head.

Per head ``i`` of ``h``, with ``B``/``C`` shared by groups of ``h // g`` heads (head ``i`` uses group
``i // (h // g)``) and a state ``S (p, n)``::

    S_t = exp(dt_t A_i) S_{t-1} + dt_t x_t B_t^T
    y_t = S_t C_t + D_i x_t

Backends, one contract (that of mamba_ssm's ``mamba_chunk_scan_combined`` without ``z``):

* ``"ref"``: :func:`ssd_ref`, a readable per-token loop (the twin every other path is tested against);
* ``"chunked"``: :func:`ssd_chunked`, the chunked SSD algorithm in pure PyTorch (CPU and GPU), differentiated op by
  op by autograd (which keeps every chunk-level intermediate for the backward);
* ``"recompute"``: :func:`ssd_recompute`, the same algorithm run segment by segment (512 tokens at the default
  chunk) with a hand-written backward that keeps only the inputs and the segment states and recomputes the chunk
  tensors (about 1/5 of ``"chunked"``'s saved memory); its layouts put the per-head ``(Q, Q)`` products and the
  all-heads state products each in one bmm without permute copies. Without autograd it runs a leaner
  chunk-major forward (nothing kept; segments of >= 8192 rows; chunk buffers reused inside a
  ``ratelab.core.workspace`` scope);
* ``"compiled"``: :func:`ssd_chunked` through ``torch.compile`` (inductor fuses the elementwise work of the forward
  and the backward; compiled once per shape, slow first call);
* ``"cuda"``: mamba_ssm's fused Triton kernel (optional dependency; raises if missing or not on CUDA);
* ``"auto"``: ``"recompute"`` while ``torch.compile`` traces the caller, on any device; else ``"cuda"`` when the
  tensors are on CUDA and mamba_ssm imports, else ``"recompute"``. The choice is logged once per backend at INFO
  level (``ratelab.kernels.ssd``) and can be queried with :func:`resolve_backend`.

Traced by ``torch.compile``, ``"recompute"`` runs as two opaque custom ops (:mod:`ratelab.kernels.ssd.library`:
``ratelab::ssd_scan`` and its backward), so the compiler fuses the work around the scan and the graph does not grow
with the sequence length. The op-by-op ``"chunked"`` path, traced, unrolls into a graph per chunk that inductor
fuses for short sequences and did not finish compiling at 4096 tokens; measured for Adventurer-T training at 1024
tokens, 2 threads, the compiled model with the ops was 1.28x eager, with ``"chunked"`` traced 1.03x
(``docs/benchmarks.md``).

:func:`ssd_step` advances the recurrence one token at a time (generation).
"""

from __future__ import annotations

import functools
import logging

import torch

from ratelab.kernels.ssd import library as _library  # noqa: F401  (registers the ratelab::ssd_scan ops)
from ratelab.kernels.ssd.chunked import ssd_chunked
from ratelab.kernels.ssd.cuda import cuda_kernel_available, mamba_ssm_installed, ssd_cuda
from ratelab.kernels.ssd.recompute import ssd_recompute
from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, ssd_ref, ssd_step

BACKENDS = ("auto", "chunked", "recompute", "compiled", "ref", "cuda")
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The concrete backend (any of :data:`BACKENDS` but ``"auto"``) that :func:`ssd` runs for ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"ssd backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if torch.compiler.is_compiling():
        return "recompute"
    # mamba_ssm is only imported when a CUDA tensor arrives and the package is installed
    return "cuda" if x.is_cuda and cuda_kernel_available() else "recompute"


@functools.lru_cache(maxsize=1)
def _compiled_chunked():
    # built on first use: torch.compile imports dynamo/inductor (seconds), which a CPU user of "auto" never pays
    return torch.compile(ssd_chunked, dynamic=False)


def ssd(
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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the SSD recurrence over a whole sequence.

    Args:
        x: ``(b, l, h, p)`` inputs.
        dt: ``(b, l, h)`` raw step sizes: ``dt_bias`` is added, then softplus if ``dt_softplus``, then the result is
            clamped to ``dt_limit`` (skipped at the default ``(0, inf)``, as in mamba_ssm).
        A: ``(h,)`` negative decay rates; the per-step decay is ``exp(dt A)``.
        B: ``(b, l, g, n)`` input projections, ``h % g == 0``.
        C: ``(b, l, g, n)`` output projections.
        D: optional ``(h,)`` or ``(h, p)`` skip connection.
        dt_bias: optional ``(h,)`` added to ``dt``.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        dt_limit: ``(min, max)`` clamp for the final step size.
        chunk_size: chunk length of the chunked / fused paths (64 suits CPUs, 256 is mamba_ssm's GPU default);
            results do not depend on it beyond rounding.
        initial_state: optional ``(b, h, p, n)`` state before the first token (zeros otherwise).
        return_final_state: also return the state after the last token.
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        ``y (b, l, h, p)`` in ``x``'s dtype, and with ``return_final_state`` the final state ``(b, h, p, n)`` in the
        compute dtype (fp32 for half inputs on the pure-PyTorch paths).

    Raises:
        ValueError: an unknown backend or an inconsistent shape (the message names the argument).
        RuntimeError: ``backend="cuda"`` without CUDA tensors or without an importable mamba_ssm.
    """
    name = resolve_backend(backend, x)
    # (not while dynamo traces: a logging call is a graph break, one per mixer)
    if backend == "auto" and name not in _logged and not torch.compiler.is_compiling():
        _logged.add(name)
        _log.info("ssd: backend 'auto' runs %r", name)
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_state=initial_state,
              return_final_state=return_final_state)
    if name == "ref":
        return ssd_ref(x, dt, A, B, C, D, **kw)
    if name == "cuda":
        return ssd_cuda(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)
    if name == "recompute":
        return ssd_recompute(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)
    if name == "compiled":
        return _compiled_chunked()(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size, **kw)


__all__ = [
    "BACKENDS",
    "DEFAULT_DT_LIMIT",
    "cuda_kernel_available",
    "mamba_ssm_installed",
    "resolve_backend",
    "ssd",
    "ssd_chunked",
    "ssd_cuda",
    "ssd_recompute",
    "ssd_ref",
    "ssd_step",
]
