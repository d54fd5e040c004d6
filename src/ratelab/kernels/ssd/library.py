"""The recomputing SSD kernel as ``torch.library`` custom ops: what ``torch.compile`` runs for the scan.

Traced by dynamo, :func:`~ratelab.kernels.ssd.recompute.ssd_recompute` would be unrolled into its per-chunk and
per-segment Python loops, and inductor would then generate (and slowly tile) one loop nest per chunk op; the
op-by-op :func:`~ratelab.kernels.ssd.chunked.ssd_chunked` traces into a graph whose size grows with the number of
chunks (at 4096 tokens inductor 2.14 did not finish compiling Adventurer-T in 20 minutes, ``docs/benchmarks.md``).
Here the scan is two opaque ops, ``ratelab::ssd_scan`` (the forward) and ``ratelab::ssd_scan_backward``, joined by
``torch.library.register_autograd``: the compiler fuses everything around them (projections, conv, gates, norms),
the graph does not grow with the length, and the scan itself runs the eager kernel (the lean no-grad forward
when nothing needs a gradient, the segment forward that keeps the entering states otherwise).

The ops take prepared operands (compute dtype, ``dt`` after bias / softplus / clamp: elementwise work the compiler
fuses) and return fixed-structure tensors: unused outputs are empty tensors, not None.
:func:`~ratelab.kernels.ssd.recompute.ssd_recompute` calls them (:func:`scan`) while dynamo traces, or always with
``custom_op=True``; ``tests/test_ssd_kernel.py`` compares that path with the sequential reference (values and every
gradient), ``tests/test_compile.py`` runs ``torch.library.opcheck`` on both ops and compares compiled with eager.
"""

from __future__ import annotations

import torch

from ratelab.kernels.ssd.recompute import _backward, _forward, _segments, balanced_chunk

__all__ = ["scan"]

_EMPTY = (0,)


def _state_shape(x: torch.Tensor, B: torch.Tensor) -> tuple[int, ...]:
    b, _, h, p = x.shape
    g, n = B.shape[-2:]
    return (b, g, n, h // g, p)  # the kernel layout of recompute._to_states


@torch.library.custom_op("ratelab::ssd_scan", mutates_args=())
def _scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    initial_state: torch.Tensor | None, chunk_size: int, segment_chunks: int, return_final: bool, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, final (b, h, p, n) or empty, entering states (segments, b, g, n, hg, p) or empty)``; ``keep``: run the
    segment forward that records the states entering each segment (for the backward), else the lean forward."""
    y, final, entering, _, _ = _forward(chunk_size, segment_chunks, x, dt, A, B, C, D, initial_state,
                                        final=return_final, lean=not keep)
    final = final if return_final else x.new_empty(_EMPTY)
    if not keep:
        return y, final, x.new_empty(_EMPTY)
    shape = _state_shape(x, B)
    ent = torch.stack([x.new_zeros(shape) if s is None else s for s in entering])
    return y, final, ent


@_scan.register_fake
def _(x, dt, A, B, C, D, initial_state, chunk_size, segment_chunks, return_final, keep):
    b, _, h, p = x.shape
    n = B.shape[-1]
    final = x.new_empty((b, h, p, n)) if return_final else x.new_empty(_EMPTY)
    if not keep:
        return torch.empty_like(x), final, x.new_empty(_EMPTY)
    nseg = len(_segments(x.shape[1], balanced_chunk(x.shape[1], chunk_size), segment_chunks))
    return torch.empty_like(x), final, x.new_empty((nseg, *_state_shape(x, B)))


@torch.library.custom_op("ratelab::ssd_scan_backward", mutates_args=())
def _scan_backward(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
    entering: torch.Tensor, has_initial: bool, gy: torch.Tensor | None, g_final: torch.Tensor | None, chunk_size: int,
    segment_chunks: int, need_x: bool, need_initial: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gx, gdt, gA, gB, gC, gD or empty, g_initial (b, h, p, n) or empty)`` from the saved inputs and the
    entering states of :func:`_scan` (``has_initial``: its first row is a real initial state, not zeros)."""
    q = balanced_chunk(x.shape[1], chunk_size)
    states = [entering[i] if i > 0 or has_initial else None for i in range(entering.shape[0])]
    outs, gA, gD, g_init = _backward(q, _segments(x.shape[1], q, segment_chunks), x, dt, A, B, C, D, states, gy,
                                     g_final, need_x=need_x, need_D=D is not None, need_init=need_initial)
    # (unused outputs are distinct empty tensors: outputs of a custom op must not alias each other)
    return (outs["x"], outs["dt"], gA, outs["B"], outs["C"], x.new_empty(_EMPTY) if gD is None else gD,
            x.new_empty(_EMPTY) if g_init is None else g_init)


@_scan_backward.register_fake
def _(x, dt, A, B, C, D, entering, has_initial, gy, g_final, chunk_size, segment_chunks, need_x, need_initial):
    b, _, h, p = x.shape
    gD = torch.empty_like(D) if D is not None else x.new_empty(_EMPTY)
    g_init = x.new_empty((b, h, p, B.shape[-1])) if need_initial else x.new_empty(_EMPTY)
    return (torch.empty_like(x), torch.empty_like(dt), torch.empty_like(A), torch.empty_like(B), torch.empty_like(C),
            gD, g_init)


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, D, initial_state, chunk_size, segment_chunks, return_final, keep = inputs
    if not keep:
        raise RuntimeError("ratelab::ssd_scan: a gradient was requested through a call with keep=False "
                           "(scan / ssd_recompute choose keep from the autograd state; call them, not the op)")
    ctx.chunk_size, ctx.segment_chunks = chunk_size, segment_chunks
    ctx.has_D, ctx.has_initial, ctx.return_final = D is not None, initial_state is not None, return_final
    ctx.save_for_backward(x, dt, A, B, C, D if D is not None else x.new_empty(_EMPTY), output[2])


def _autograd_backward(ctx, gy, g_final, _g_entering):
    x, dt, A, B, C, D, entering = ctx.saved_tensors
    D = D if ctx.has_D else None
    need = ctx.needs_input_grad
    g_final = g_final if ctx.return_final and g_final is not None and g_final.numel() else None
    gx, gdt, gA, gB, gC, gD, g_init = _scan_backward(
        x, dt, A, B, C, D, entering, ctx.has_initial, gy, g_final, ctx.chunk_size, ctx.segment_chunks,
        bool(need[0]), bool(ctx.has_initial and need[6]))
    return (gx if need[0] else None, gdt if need[1] else None, gA if need[2] else None, gB if need[3] else None,
            gC if need[4] else None, gD if ctx.has_D and need[5] else None,
            g_init if ctx.has_initial and need[6] else None, None, None, None, None)


_scan.register_autograd(_autograd_backward, setup_context=_setup_context)


def scan(operands: tuple, chunk_size: int, segment_chunks: int, return_final: bool, grad: bool):
    """``(y, final or None)`` of prepared operands (:func:`~ratelab.kernels.ssd.recompute.prepare`) through
    ``ratelab::ssd_scan``, keeping the entering states only when autograd records the call."""
    y, final, _ = _scan(*operands, chunk_size, segment_chunks, return_final, grad)
    return y, final if return_final else None
