"""Scratch buffers reused within a scope, for the no-grad fast paths.

On CPU a fresh large tensor costs first-touch page faults whenever glibc hands out memory it had returned to the
OS (megabyte buffers are mmapped, or trimmed back after use): measured here, an 8 MiB GEMM output written for the
first time took about 4.5 ms against 1.3 ms into a buffer already touched. A deep model runs the same shapes block
after block, so a scope around its forward lets every block after the first write into the buffers the first one
faulted in::

    with workspace():
        for blk in blocks:
            buf = scratch("ssd.T", shape, dtype, device)  # the same tensor in every block

Outside a scope :func:`scratch` is ``torch.empty`` (nothing is held). Inside, one buffer per name is held until the
outermost scope exits, so a forward's peak memory does not grow (the buffers are those a block allocates anyway).
Rules for callers: a scratch tensor never escapes the function that asked for it (results are fresh tensors or
copies), and a name serves one purpose and is finished with before the next :func:`scratch` of that name. The
state is per thread. Used by the SSD kernel's no-grad forward (:mod:`ratelab.kernels.ssd.recompute`); holding the
blocks' GEMM outputs as well was measured and not kept (no gain, sometimes a loss: ``docs/benchmarks.md``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["in_workspace", "scratch", "workspace"]


class _State(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.bufs: dict[str, torch.Tensor] = {}


_STATE = _State()


@contextmanager
def workspace() -> Iterator[None]:
    """Hold :func:`scratch` buffers until the outermost ``workspace()`` exits (nestable, per thread)."""
    _STATE.depth += 1
    try:
        yield
    finally:
        _STATE.depth -= 1
        if _STATE.depth == 0:
            _STATE.bufs.clear()


def in_workspace() -> bool:
    """Whether a :func:`workspace` scope is open on this thread."""
    return _STATE.depth > 0


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialized ``shape`` tensor: the one held under ``name`` if it matches, else a new one (then held,
    inside a scope)."""
    if _STATE.depth == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    t = _STATE.bufs.get(name)
    shape = tuple(shape)
    if t is None or tuple(t.shape) != shape or t.dtype != dtype or t.device != torch.device(device):
        _STATE.bufs.pop(name, None)  # the old buffer goes first: the new one may reuse its memory
        t = torch.empty(shape, dtype=dtype, device=device)
        _STATE.bufs[name] = t
    return t
