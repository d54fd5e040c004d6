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
fuses) and return fixed-structure tensors: unused outputs are empty tensors, not None. :func:`ssd_scan` is the
Python entry with the contract of :func:`~ratelab.kernels.ssd.recompute.ssd_recompute`; ``tests/test_compile.py``
compares it, eager and compiled, with the sequential reference (values and every gradient) and runs
``torch.library.opcheck`` on both ops.
"""

from __future__ import annotations

import torch

from ratelab.kernels.ssd.recompute import (
    SEGMENT_CHUNKS,
    _backward_segment,
    _forward,
    _from_states,
    _segments,
    _to_states,
    balanced_chunk,
)
from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs, compute_dtype, prepare_dt

__all__ = ["ssd_scan"]

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
    entering: torch.Tensor, has_initial: bool, gy: torch.Tensor, g_final: torch.Tensor | None, chunk_size: int,
    segment_chunks: int, need_x: bool, need_initial: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gx, gdt, gA, gB, gC, gD or empty, g_initial (b, h, p, n) or empty)`` from the saved inputs and the
    entering states of :func:`_scan` (``has_initial``: its first row is a real initial state, not zeros)."""
    length = x.shape[1]
    q = balanced_chunk(length, chunk_size)
    segs = _segments(length, q, segment_chunks)
    outs = {"x": torch.empty_like(x), "dt": torch.empty_like(dt), "B": torch.empty_like(B), "C": torch.empty_like(C)}
    gA = torch.zeros_like(A)
    gD = torch.zeros_like(D) if D is not None else None
    g_state = None if g_final is None else _to_states(g_final, B.shape[2])
    for i in range(len(segs) - 1, -1, -1):
        s, e = segs[i]
        need = {"x": need_x, "D": D is not None, "state": i > 0 or need_initial}
        S0 = entering[i] if i > 0 or has_initial else None
        gA_s, gD_s, g_state = _backward_segment(
            x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, S0, gy[:, s:e], g_state, q,
            {k: v[:, s:e] for k, v in outs.items()}, need)
        gA += gA_s
        if gD_s is not None:
            gD += gD_s
    g_init = _from_states(g_state) if need_initial else x.new_empty(_EMPTY)
    return (outs["x"], outs["dt"], gA, outs["B"], outs["C"], gD if gD is not None else x.new_empty(_EMPTY),
            g_init)


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
                           "(ssd_scan chooses keep from the autograd state; call it, not the op)")
    ctx.chunk_size, ctx.segment_chunks = chunk_size, segment_chunks
    ctx.has_D, ctx.has_initial, ctx.return_final = D is not None, initial_state is not None, return_final
    ctx.save_for_backward(x, dt, A, B, C, D if D is not None else x.new_empty(_EMPTY), output[2])


def _backward(ctx, gy, g_final, _g_entering):
    x, dt, A, B, C, D, entering = ctx.saved_tensors
    D = D if ctx.has_D else None
    need = ctx.needs_input_grad
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    g_final = g_final if ctx.return_final and g_final is not None and g_final.numel() else None
    gx, gdt, gA, gB, gC, gD, g_init = _scan_backward(
        x, dt, A, B, C, D, entering, ctx.has_initial, gy, g_final, ctx.chunk_size, ctx.segment_chunks,
        bool(need[0]), bool(ctx.has_initial and need[6]))
    return (gx if need[0] else None, gdt if need[1] else None, gA if need[2] else None, gB if need[3] else None,
            gC if need[4] else None, gD if ctx.has_D and need[5] else None,
            g_init if ctx.has_initial and need[6] else None, None, None, None, None)


_scan.register_autograd(_backward, setup_context=_setup_context)


def ssd_scan(
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
    segment_chunks: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`~ratelab.kernels.ssd.recompute.ssd_recompute` through the custom ops (same contract and values):
    the form ``torch.compile`` can capture without unrolling the scan."""
    from ratelab.kernels.ssd.recompute import LEAN_SEGMENT_ROWS, ssd_recompute

    if x.dim() != 4 or x.shape[1] == 0:
        return ssd_recompute(x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                             chunk_size=chunk_size, initial_state=initial_state,
                             return_final_state=return_final_state, segment_chunks=segment_chunks)
    check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    tensors = (x, dt, A, B, C, D, dt_bias, initial_state)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if segment_chunks is None:
        rows = x.shape[0] * balanced_chunk(x.shape[1], chunk_size)
        segment_chunks = SEGMENT_CHUNKS if grad else max(SEGMENT_CHUNKS, -(-LEAN_SEGMENT_ROWS // rows))
    elif not isinstance(segment_chunks, int) or segment_chunks < 1:
        raise ValueError(f"ssd: segment_chunks must be a positive int or None, got {segment_chunks!r}")
    ct = compute_dtype(x.dtype)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    y, final, _ = _scan(x.to(ct), dtp, A.to(ct), B.to(ct), C.to(ct), None if D is None else D.to(ct),
                        None if initial_state is None else initial_state.to(ct), chunk_size, segment_chunks,
                        return_final_state, grad)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
