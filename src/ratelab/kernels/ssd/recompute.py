"""Chunked SSD with a hand-written backward that recomputes the intra-chunk tensors (mamba's fused-kernel plan).

The op-by-op chunked path (:mod:`ratelab.kernels.ssd.chunked`) under autograd keeps every intermediate of the chunk
algorithm until the backward: the ``(Q, Q)`` decay and score blocks of every chunk and head, ``x dt``, the
decay-weighted inputs, the chunk and entering states, the read-outs -- about 8x the inputs' memory -- and its
backward is some forty autograd nodes, most of them broadcasting multiplies whose gradients need a reduction.

:class:`SSDRecomputeFn` keeps what mamba_ssm's fused kernel keeps: its inputs and the state entering every *segment*
(``segment_chunks`` chunks, ``(b, h, p, n)`` each). The forward runs the chunked code without autograd (its in-place
inference variant). The backward walks the segments from last to first; per segment it rebuilds the chunk tensors
from the inputs and the entering state, then applies the chain rule written out below (``i >= j`` positions in a
chunk, ``s`` the in-chunk cumulative log-decay, ``e_i = exp(s_i)``, ``L_ij = exp(s_i - s_j)``, ``w_j = exp(s_Q -
s_j)``, ``X = x dt``, ``S_k`` the state entering chunk ``k``)::

    y_i      = sum_j L_ij (C_i.B_j) X_j  +  e_i S_k C_i             (diagonal block + state read-out)
    S_{k+1}  = e_Q S_k + sum_j w_j X_j B_j^T                         (chunk recurrence)

    gM  = gy X^T (masked i >= j)      gX  = M^T gy + w (B G_{k+1})     M = L o (C B^T)
    gC  = (gM o L) B + (e gy) S_k     gB  = (gM o L)^T C + (w X) G_{k+1}^T
    G_k = (e gy)^T C + e_Q G_{k+1}    (G: gradient of the state entering each chunk, a loop over the chunks)
    gs  = row sums - column sums of gM o M, + e sum_p gy o (S_k C), - w sum_p X o (B G), + end terms
    ga  = reverse cumsum of gs;  gdt = A ga + sum_p x o gX;  gA = sum dt o ga;  gx = dt gX

so the segment's working set is a handful of ``(Q, Q)`` blocks per head, and nothing of the forward outlives it. The
``dt`` preprocessing (bias, softplus, clamp) and the ``D`` skip stay outside, under autograd (elementwise, cheap).

Numerics as the chunked forward: exponents are differences ``<= 0`` floored at ``log(finfo.tiny)``; entries above
the diagonal are zeroed after ``exp`` (so the floor never leaks into them). Gradients through a floored exponent are
taken as if unfloored: the difference is below ``finfo.tiny``. Segments are whole chunks, so the chunk boundaries are
those of one :func:`~ratelab.kernels.ssd.chunked.ssd_chunked` call; with a single segment (``L <= Q *
segment_chunks``) the forward is bitwise that of ``ssd_chunked`` under ``no_grad``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ratelab.kernels.ssd.chunked import balanced_chunk, ssd_chunked
from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs, compute_dtype, prepare_dt, skip_term

SEGMENT_CHUNKS = 4  # 256 tokens at the CPU chunk of 64: the backward's working set is one such segment


def _segments(length: int, q: int, segment_chunks: int) -> list[tuple[int, int]]:
    step = q * segment_chunks
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def _segment_backward(x, dt, A, B, C, S0, gy, g_end, q: int, need_state: bool):
    """Gradients of one segment (see the module docstring). Shapes: x/gy (b, l, h, p), dt (b, l, h), B/C (b, l, g,
    n), S0/g_end (b, h, p, n) or None. Returns gx, gdt, gA, gB, gC, g_S0 (None when not ``need_state``)."""
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    pad = (-length) % q
    if pad:  # dt = 0 rows: no decay, no input (their gradients are cut off below)
        x, gy = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(gy, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, 0, 0, pad)), F.pad(C, (0, 0, 0, 0, 0, pad))
    c = (length + pad) // q
    ct = x.dtype
    floor = float(math.ceil(math.log(torch.finfo(ct).tiny)))
    x6 = x.view(b, c, q, g, hg, p)
    dt5 = dt.view(b, c, q, g, hg)
    X = x6 * dt5[..., None]  # (b, c, Q, g, hg, p)
    s = (dt5 * A.view(g, hg)).cumsum(2)  # (b, c, Q, g, hg)
    s_end = s[:, :, -1]  # (b, c, g, hg)
    Bc, Cc = B.view(b, c, q, g, n), C.view(b, c, q, g, n)
    gy6 = gy.view(b, c, q, g, hg, p)

    # rebuilt forward tensors: decays, the (Q, Q) blocks, the chunk states and the states entering each chunk
    e = s.clamp(min=floor).exp()  # (b, c, Q, g, hg)
    w = (s_end[:, :, None] - s).clamp(min=floor).exp()
    dec = s_end.clamp(min=floor).exp()  # (b, c, g, hg)
    sT = s.permute(0, 1, 3, 4, 2)  # (b, c, g, hg, Q)
    tril = torch.ones(q, q, dtype=torch.bool, device=x.device).tril_()
    # above the diagonal s_i - s_j > 0 may overflow exp: set to the floor first, zeroed after exp
    Lm = (sT[..., :, None] - sT[..., None, :]).masked_fill_(~tril, floor).clamp_(min=floor).exp_().mul_(tril)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, Q, Q); its upper triangle is multiplied by L = 0
    M = Lm * CB[:, :, :, None]
    Xw = X * w[..., None]
    local = torch.einsum("bcjghp,bcjgn->bcghpn", Xw, Bc)  # (b, c, g, hg, p, n)
    states = []  # S_k entering chunk k
    st = S0.view(b, g, hg, p, n) if S0 is not None else x.new_zeros((b, g, hg, p, n))
    dec6 = dec[..., None, None]
    for k, (lk, dk) in enumerate(zip(local.unbind(1), dec6.unbind(1), strict=True)):
        states.append(st)
        if k < c - 1:
            st = torch.addcmul(lk, st, dk)
    S = torch.stack(states, 1)  # (b, c, g, hg, p, n)

    # diagonal blocks
    XT = X.permute(0, 1, 3, 4, 2, 5)  # (b, c, g, hg, Q, p)
    gyT = gy6.permute(0, 1, 3, 4, 2, 5)
    # (Q, Q) blocks are the working set's bulk: at most three alive at once, the products done in place
    gX = (M.transpose(-1, -2) @ gyT).permute(0, 1, 4, 2, 3, 5)  # (b, c, Q, g, hg, p)
    del M
    gM = gyT @ XT.transpose(-1, -2)  # (b, c, g, hg, Q, Q); its upper triangle only ever meets L = 0
    gL = gM.mul_(Lm)  # gM o L
    del Lm
    gCB = gL.sum(3)  # (b, c, g, Q, Q): summed over the heads sharing B and C
    gC = torch.einsum("bcgij,bcjgn->bcign", gCB, Bc)
    gB = torch.einsum("bcgij,bcign->bcjgn", gCB, Cc)
    del gCB
    gMM = gL.mul_(CB[:, :, :, None])  # gM o L o CB: the gradient of the exponent s_i - s_j
    gs = gMM.sum(-1) - gMM.sum(-2)  # (b, c, g, hg, Q): rows i gain, columns j lose
    del gMM, gL, gM, CB

    # state read-out: y_off = e (S_k C)
    ge = gy6 * e[..., None]  # (b, c, Q, g, hg, p)
    SC = torch.einsum("bcghpn,bcign->bcighp", S, Cc)
    gs = gs.permute(0, 1, 4, 2, 3) + SC.mul_(ge).sum(-1)  # (b, c, Q, g, hg)
    del SC
    gC += torch.einsum("bcighp,bcghpn->bcign", ge, S)
    g_read = torch.einsum("bcighp,bcign->bcghpn", ge, Cc)  # (b, c, g, hg, p, n)
    del ge, S

    # chunk recurrence, backwards: G_k = g_read_k + dec_k G_{k+1}; G_c = g_end
    G_next = g_end.view(b, g, hg, p, n) if g_end is not None else x.new_zeros((b, g, hg, p, n))
    g_dec, g_local = [], []
    for k in range(c - 1, -1, -1):
        g_local.append(G_next)
        g_dec.append((G_next * states[k]).sum((-1, -2)))
        G_next = torch.addcmul(g_read[:, k], G_next, dec6[:, k])
    g_local_t = torch.stack(g_local[::-1], 1)  # (b, c, g, hg, p, n)
    g_dec_t = torch.stack(g_dec[::-1], 1)  # (b, c, g, hg)

    # chunk states: local = sum_j w_j X_j B_j^T
    gWX = torch.einsum("bcghpn,bcjgn->bcjghp", g_local_t, Bc)
    gB += torch.einsum("bcghpn,bcjghp->bcjgn", g_local_t, Xw)
    del Xw
    gX.addcmul_(gWX, w[..., None])
    gw = gWX.mul_(X).sum(-1).mul_(w)  # (b, c, Q, g, hg): gradient of the exponent s_Q - s_j
    del gWX, X
    gs = gs - gw
    gs_end = gw.sum(2) + g_dec_t * dec  # (b, c, g, hg)
    gs[:, :, -1] += gs_end
    ga = gs.flip(2).cumsum(2).flip(2)  # s = cumsum(a)
    gdt = ga * A.view(g, hg) + (gX * x6).sum(-1)
    gA = (ga * dt5).sum((0, 1, 2)).reshape(h)
    gx = gX.mul_(dt5[..., None])

    def cut(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return t.reshape(b, c * q, *shape)[:, :length]

    g_S0 = G_next.reshape(b, h, p, n) if need_state else None
    return cut(gx, (h, p)), cut(gdt, (h,)), gA, cut(gB, (g, n)), cut(gC, (g, n)), g_S0


class SSDRecomputeFn(torch.autograd.Function):
    """``(x, dt, A, B, C, initial_state) -> (y, final_state)`` on prepared operands (compute dtype, ``dt`` after
    bias/softplus/clamp, no ``D``); backward recomputes per segment (module docstring)."""

    @staticmethod
    def forward(ctx, chunk_size: int, segment_chunks: int, x, dt, A, B, C, initial_state):  # noqa: D102
        ctx.set_materialize_grads(False)
        q = balanced_chunk(x.shape[1], chunk_size)
        segs = _segments(x.shape[1], q, segment_chunks)
        ys, entering = [], []
        state = initial_state
        with torch.no_grad():
            for s, e in segs:
                entering.append(state)
                y, state = ssd_chunked(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], initial_state=state,
                                       chunk_size=q, return_final_state=True)
                state = state.clone()  # a view of all the segment's chunk states: keep only this one alive
                ys.append(y)
        ctx.q, ctx.segs = q, segs
        ctx.save_for_backward(x, dt, A, B, C, *entering)  # entering[0] is initial_state (or None)
        return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), state

    @staticmethod
    def backward(ctx, gy, g_final):  # noqa: D102
        x, dt, A, B, C, *entering = ctx.saved_tensors
        need_x, need_dt, need_A, need_B, need_C, need_init = ctx.needs_input_grad[2:]
        gx, gdt = torch.zeros_like(x), torch.zeros_like(dt)
        gB, gC = torch.zeros_like(B), torch.zeros_like(C)
        gA = torch.zeros_like(A)
        g_state = g_final
        for i in range(len(ctx.segs) - 1, -1, -1):
            s, e = ctx.segs[i]
            gy_s = gy[:, s:e] if gy is not None else x.new_zeros(x[:, s:e].shape)
            out = _segment_backward(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], entering[i], gy_s, g_state,
                                    ctx.q, need_state=i > 0 or need_init)
            gx[:, s:e], gdt[:, s:e] = out[0], out[1]
            gB[:, s:e], gC[:, s:e] = out[3], out[4]
            gA += out[2]
            g_state = out[5]
        return (None, None, gx if need_x else None, gdt if need_dt else None, gA if need_A else None,
                gB if need_B else None, gC if need_C else None, g_state if need_init else None)


def ssd_recompute(
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
    segment_chunks: int = SEGMENT_CHUNKS,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD with the recomputing backward; same contract as :func:`ratelab.kernels.ssd.ssd`.

    Args:
        segment_chunks: chunks per recomputed segment (the backward's working set); results do not depend on it
            beyond rounding.

    Without autograd (no input requires grad, or grad mode off) this is :func:`ssd_chunked` itself.
    """
    tensors = (x, dt, A, B, C, D, dt_bias, initial_state)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, chunk_size=chunk_size,
              initial_state=initial_state, return_final_state=return_final_state)
    if not grad or x.dim() != 4 or x.shape[1] == 0:
        return ssd_chunked(x, dt, A, B, C, D, **kw)  # (it also raises the shape errors)
    check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(segment_chunks, int) or segment_chunks < 1:
        raise ValueError(f"ssd: segment_chunks must be a positive int, got {segment_chunks!r}")
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    init = None if initial_state is None else initial_state.to(ct)
    y, final = SSDRecomputeFn.apply(chunk_size, segment_chunks, xc, dtp, A.to(ct), B.to(ct), C.to(ct), init)
    if D is not None:
        y = y + skip_term(xc, D.to(ct))
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
