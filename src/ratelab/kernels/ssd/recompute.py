"""Chunked SSD with a hand-written backward that recomputes the intra-chunk tensors (mamba's fused-kernel plan).

The op-by-op chunked path (:mod:`ratelab.kernels.ssd.chunked`) under autograd keeps every intermediate of the chunk
algorithm until the backward: the ``(Q, Q)`` decay and score blocks of every chunk and head, ``x dt``, the
decay-weighted inputs, the chunk and entering states, the read-outs -- about 8x the inputs' memory -- and its
backward is some forty autograd nodes, most of them broadcasting multiplies whose gradients need a reduction.

:class:`SSDRecomputeFn` keeps what mamba_ssm's fused kernel keeps: its inputs and the state entering every *segment*
(``segment_chunks`` chunks, ``(b, h, p, n)`` each). The forward runs segment by segment without autograd, writing
``y`` (with the ``D`` skip) straight into the output. The backward walks the segments from last to first; per
segment it rebuilds the chunk tensors from the inputs and the entering state (:class:`_Chunks`), then applies the
chain rule written out below (``i >= j`` positions in a chunk, ``s`` the in-chunk cumulative log-decay, ``e_i =
exp(s_i)``, ``L_ij = exp(s_i - s_j)``, ``w_j = exp(s_Q - s_j)``, ``X = x dt``, ``S_k`` the state entering chunk
``k``, ``G_k`` the gradient of ``S_k``)::

    y_i      = sum_j L_ij (C_i.B_j) X_j  +  e_i S_k C_i  +  D x_i    (diagonal block + state read-out + skip)
    S_{k+1}  = e_Q S_k + sum_j w_j X_j B_j^T                         (chunk recurrence)

    gM  = gy X^T (i >= j)             gX  = M^T gy + w (B G_{k+1})     M = L o (C B^T)
    gC  = (sum_h gM o L) B + (e gy) S_k       gB = (sum_h gM o L)^T C + (w X) G_{k+1}^T
    G_k = (e gy)^T C + e_Q G_{k+1}    (a loop over the chunks)
    gs  = row sums - column sums of gM o M + e gy.(S_k C) - gw,  gw = w X.(B G_{k+1});
          gs_Q += sum_j gw_j + e_Q <G_{k+1}, S_k>
    ga  = reverse cumsum of gs;  gdt = A ga + x.gX;  gA = sum dt ga;  gx = dt gX + D gy;  gD = sum gy x

Some identities would save passes but lose fp32 accuracy, and are not used: the column sums equal ``X_j . (M^T
gy)_j`` and the end terms equal ``<G_{k+1}, S_{k+1}>``, but under strong decay ``gs`` is a small difference of large
terms (the diagonal of ``gM o M`` in both sums; ``gw_j`` lost per position and regained at ``s_Q``), which cancel
exactly only when both sides are sums of the same floats; ``ga`` is then multiplied by ``A``. (Measured: with ``A =
-40`` over 300 tokens the identities gave ``dt`` gradients 10-20x further from the fp64 reference.) The segment's
working set is a few ``(Q, Q)`` blocks per head, and nothing of the forward outlives it.
The ``dt`` preprocessing (bias, softplus, clamp) stays outside, under autograd (elementwise on ``(b, L, h)``).

Forward: where a chunk's log-decay spans at most :data:`FACTOR_SPAN` for a head, its decay block is an outer
product ``r_i k_j`` (:func:`_decay_blocks`), so ``(L o CB) X = r o (CB (k o X))``: one chunk-major product of the
group's ``CB`` with all its heads (no per-head ``(Q, Q)`` blocks, no head-major copy of ``x``); the other blocks take
the exact per-head product (:func:`_forward_segment`).

Folding in the backward: the per-head ``(Q, Q)`` products use ``M' = M o dt_j`` (``dt`` scaling the columns, free in
the outer-product form of :func:`_decay_blocks`) on ``x`` itself, so ``M'^T gy = dt M^T gy``: ``gx`` is one fused op,
and ``x_j . gX_j`` (for ``gdt``) is ``(column sum_j + gw_j) / dt_j`` from sums already at hand (``|dt_j| <
sqrt(tiny)``, zero included, takes a direct path). ``D`` stays off the diagonal of ``M'``: taking it out of the
diagonal sums again would cancel catastrophically for small ``dt``. A per-head ``D``'s gradient is the sum of the
diagonal of ``gy x^T``.

Layouts: the backward's per-head products (``M'^T gy``, ``gy x^T``) run on head-major ``(b, c, h, Q, p)`` copies of
``x`` and ``gy`` (contiguous batches of ``(Q, p)`` blocks, one bmm); the state products (``B^T (w X)``, ``C S``,
``(e gy)^T C``, ``B G``, ...) run chunk-major, where with ``g = 1`` all heads form one ``(Q, h p)`` matrix (one bmm
per group with ``N`` or ``K`` = 512 at Adventurer-T's shapes); head-major results come back through the strided
read of the next fused elementwise op (``gx``), so no separate permute copies.

Numerics as the chunked forward: exponents are differences ``<= 0`` floored at ``log(finfo.tiny)``; a decay that
hits the floor (and every entry above the diagonal) is then set to exactly 0 (``threshold``), so no product with it
is subnormal (CPU multiplies and exps on subnormals are 5-40x slower; the term it drops is below ``finfo.tiny``).
Gradients through a floored exponent are taken as if unfloored: the difference is below ``finfo.tiny``. Segments are
whole chunks (only the last one is padded, with ``dt = 0`` rows), so the chunk boundaries are those of one
:func:`~ratelab.kernels.ssd.chunked.ssd_chunked` call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ratelab.core.workspace import scratch
from ratelab.kernels.ssd.chunked import balanced_chunk, exponent_floor, ssd_chunked
from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs, compute_dtype, prepare_dt

SEGMENT_CHUNKS = 8  # 512 tokens at the CPU chunk of 64: the backward's working set is one such segment
# Without autograd nothing is recomputed, and a segment is only a bound on the working set: segments of at least
# this many rows (batch x tokens) make the chunk products and the elementwise passes large enough to run well on
# several threads (4096 tokens of one sequence: one segment instead of eight)
LEAN_SEGMENT_ROWS = 8192


def _segments(length: int, q: int, segment_chunks: int) -> list[tuple[int, int]]:
    step = q * segment_chunks
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t (b, l, ...)`` with ``pad`` zero rows appended along the time axis."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


class _Chunks:
    """The chunk tensors of one segment of whole chunks for the backward, built from its inputs without autograd.

    ``x (b, l, h, p)``, ``dt (b, l, h)``, ``B``/``C (b, l, g, n)``, ``S0`` or None in the state layout of
    :func:`_to_states`, ``l = c Q``.
    Attributes: decays ``e``, ``w`` ``(b, c, Q, h)`` and ``dec`` ``(b, c, h)``; ``X`` = x head-major ``(b, c, h, Q,
    p)``; ``Xw_g`` = x dt w chunk-major per group ``(b, c, g, Q, hg p)``; ``Bg``/``Cg`` ``(b, c, g, Q, n)``; ``M`` =
    L o CB o dt_j ``(b, c, h, Q, Q)``; the states entering the chunks ``ent`` ``(b, c, g, n, hg p)``; also ``L``
    (times dt_j), the masked ``CB``, ``sT`` and the exponent floor for the backward.
    """

    def __init__(self, x, dt, A, B, C, S0, q: int):
        b, length, h, p = x.shape
        g, n = B.shape[-2:]
        hg, c = h // g, length // q
        ct, dev = x.dtype, x.device
        self.shape = (b, c, q, h, p, g, hg, n)
        floor, zero_at = _exponent_floor(ct)
        x5, dt4 = x.view(b, c, q, h, p), dt.view(b, c, q, h)
        s = (dt4 * A).cumsum_(2)  # (b, c, Q, h): log-decay since the chunk start
        sT = s.transpose(2, 3).contiguous()  # (b, c, h, Q)
        self.w = F.threshold_((s[:, :, -1:] - s).clamp_(min=floor).exp_(), zero_at, 0.0)
        self.dec = F.threshold_(s[:, :, -1].clamp(min=floor).exp_(), zero_at, 0.0)
        self.e = F.threshold_(s.clamp_(min=floor).exp_(), zero_at, 0.0)
        # right operand of the per-head products: x itself, head-major, with dt folded into the decay blocks'
        # columns (free in the outer-product form): M'^T gy = dt M^T gy
        self.X = torch.empty((b, c, h, q, p), dtype=ct, device=dev).copy_(x5.transpose(2, 3))
        Xw = torch.mul(x5, (dt4 * self.w)[..., None])  # (b, c, Q, h, p), contiguous
        self.Xw_g, self.Xw_hp = _by_group(Xw.view(b, c, q, g, hg * p)), Xw
        self.Bg = _by_group(B.view(b, c, q, g, n)).contiguous()
        self.Cg = _by_group(C.view(b, c, q, g, n)).contiguous()
        self.tril = torch.ones(q, q, dtype=ct, device=dev).tril_()  # a 0/1 multiply is cheaper than masked_fill
        CB = (self.Cg @ self.Bg.transpose(-1, -2)).mul_(self.tril)  # (b, c, g, Q, Q), one per group
        Lm = _decay_blocks(sT, self.tril, floor, columns=dt4.transpose(2, 3))  # L o dt_j
        self.M = torch.mul(Lm.view(b, c, g, hg, q, q), CB[:, :, :, None]).view(b, c, h, q, q)  # (b, c, h, Q, Q)
        local = self.Bg.transpose(-1, -2) @ self.Xw_g  # (b, c, g, n, hg p): each chunk's own end state
        # states entering the chunks: c - 1 small steps into one buffer (unbound views, never slices); the backward
        # does not need the final state
        ent = torch.empty((b, c, g, n, hg, p), dtype=ct, device=dev)
        ev, lv = [*ent.unbind(1)], local.view(b, c, g, n, hg, p).unbind(1)
        dv = self.dec.view(b, c, g, 1, hg, 1).unbind(1)
        if S0 is None:
            ev[0].zero_()
        else:
            ev[0].copy_(S0)
        for k in range(c - 1):
            torch.addcmul(lv[k], ev[k], dv[k], out=ev[k + 1])
        self.ent = ent.view(b, c, g, n, hg * p)
        self.x5, self.dt4 = x5, dt4
        self.L, self.CB, self.sT, self.floor = Lm, CB, sT, floor


def _to_states(S: torch.Tensor, g: int) -> torch.Tensor:
    """``(b, h, p, n)`` -> the kernel's state layout ``(b, g, n, hg, p)``: with ``g = 1`` a ``(n, h p)`` matrix per
    sequence, the operand of the chunk-major state products; segment states stay in it between segments."""
    b, h, p, n = S.shape
    return S.view(b, g, h // g, p, n).permute(0, 1, 4, 2, 3).contiguous()


def _from_states(S: torch.Tensor) -> torch.Tensor:
    b, g, n, hg, p = S.shape
    return S.permute(0, 1, 3, 4, 2).reshape(b, g * hg, p, n)


def _by_group(t: torch.Tensor) -> torch.Tensor:
    """``(b, c, Q, g, m)`` -> ``(b, c, g, Q, m)``; with one group a plain view (canonical strides: matmul folds its
    batch dimensions without a copy, which it does not for a transposed size-1 dimension)."""
    b, c, q, g, m = t.shape
    return t.view(b, c, 1, q, m) if g == 1 else t.transpose(2, 3)


def _from_group(t: torch.Tensor) -> torch.Tensor:
    """``(b, c, g, Q, m)`` -> ``(b, c, Q, g, m)`` (inverse of :func:`_by_group`)."""
    b, c, g, q, m = t.shape
    return t.view(b, c, q, 1, m) if g == 1 else t.transpose(2, 3)


def _write(dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
    """Copy the chunked ``src (b, c, Q, ...)`` into ``dst (b, length, ...)``, dropping the padded rows."""
    b, c, q, *rest = src.shape
    if c * q == length:
        dst.view(src.shape).copy_(src)
    else:
        dst.copy_(src.reshape(b, c * q, *rest)[:, :length])


FACTOR_SPAN = 60.0  # blocks whose log-decay spans at most this are built as an outer product (see _decay_blocks)


def _exact_decay(sT: torch.Tensor, tril: torch.Tensor, floor: float) -> torch.Tensor:
    """``exp(s_i - s_j)`` for ``i >= j``, else 0, from differences: exponents floored at ``floor``, above the
    diagonal capped at the floor before ``exp`` (no overflow), and every floored entry then set to exactly 0."""
    cap = torch.where(tril.bool(), math.inf, floor).to(sT.dtype)
    Lm = torch.sub(sT[..., :, None], sT[..., None, :])
    torch.clamp(Lm, min=torch.tensor(floor, dtype=sT.dtype, device=sT.device), max=cap, out=Lm)
    return F.threshold_(Lm.exp_(), math.exp(floor), 0.0)


def _decay_blocks(sT: torch.Tensor, tril: torch.Tensor, floor: float, *,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
    """The lower-triangular decay blocks ``L_ij = exp(s_i - s_j)`` (``i >= j``, else 0) of ``sT (..., Q)``.

    Where a block's log-decay spans at most :data:`FACTOR_SPAN` (``max s - min s``), ``L`` is the outer product
    ``exp(s_i - m) exp(m - s_j)`` around the midpoint ``m`` of the span: two passes over the block (product, mask)
    instead of four (difference, clamp, exp, zeroing), and both factors lie in ``[e^-30, e^30]``, so nothing
    overflows and no entry is subnormal. The other blocks (strong decays: some entries below the exponent floor)
    take the difference form of :func:`_exact_decay`. The two forms agree to rounding (a few ulp). ``columns``
    (shaped as ``sT``): column ``j`` of every block is multiplied by ``columns[..., j]`` (in the outer-product form,
    folded into the column factor). The forward (:func:`_forward_segment`) uses the same two forms without building
    the outer-product blocks.
    """
    lo, hi = sT.amin(-1, keepdim=True), sT.amax(-1, keepdim=True)
    wide = (hi - lo <= FACTOR_SPAN).logical_not_().squeeze(-1)  # NaN spans are wide: they reach the exact path
    mid = (lo + hi).mul_(0.5)
    col = (mid - sT).exp_()
    if columns is not None:
        col.mul_(columns)
    Lm = torch.mul((sT - mid).exp_()[..., :, None], col[..., None, :]).mul_(tril)
    if wide.any():
        flat, idx = Lm.view(-1, *Lm.shape[-2:]), wide.view(-1).nonzero().squeeze(1)
        exact = _exact_decay(sT.reshape(-1, sT.shape[-1])[idx], tril, floor)
        if columns is not None:
            exact.mul_(columns.reshape(-1, sT.shape[-1])[idx][:, None, :])
        flat[idx] = exact
    return Lm


def _d_view(D: torch.Tensor) -> torch.Tensor:
    return D[:, None] if D.dim() == 1 else D


def _exponent_floor(dtype: torch.dtype) -> tuple[float, float]:
    """``(floor, exp(floor))``: exponents are floored at :func:`exponent_floor` and a decay equal to ``exp(floor)``
    is then set to 0 (module docstring)."""
    floor = exponent_floor(dtype)
    return floor, math.exp(floor)


def _chunk_log_decay(dt4: torch.Tensor, A: torch.Tensor):
    """The forwards' decay bookkeeping for ``dt4 (b, c, Q, h)``: ``s`` the log-decay since each chunk's start, and
    per (chunk, head) ``lo`` its minimum, ``mid`` the midpoint of its span and ``wide`` (span over
    :data:`FACTOR_SPAN`, or NaN), each ``(b, c, 1, h)``."""
    s = (dt4 * A).cumsum_(2)
    lo, hi = s.amin(2, keepdim=True), s.amax(2, keepdim=True)
    wide = (hi - lo <= FACTOR_SPAN).logical_not_()  # NaN spans are wide
    return s, lo, (lo + hi).mul_(0.5), wide


def _exact_block_product(x, s, dt4, cb, bi, ci, hi_, q: int, tril, floor: float) -> torch.Tensor:
    """``(L o CB o dt_j) x`` of the listed (sequence ``bi``, chunk ``ci``, head ``hi_``) blocks, exactly (the
    difference form of :func:`_exact_decay`): ``(K, Q, p)``. ``cb (K, Q, Q)`` are the blocks' masked ``C B^T``; the
    rows of ``x (b, length, h, p)`` are gathered, those past its end (the padded last chunk) as zeros, not as x's
    last row again (a non-finite entry there would reach the chunk's earlier rows through their zero weights)."""
    sv = s[bi, ci, :, hi_]  # (K, Q)  (s is not modified in place after the cumsum)
    Lx = _exact_decay(sv, tril, floor).mul_(dt4[bi, ci, :, hi_][:, None, :]).mul_(cb)
    length = x.shape[1]
    rows = ci[:, None] * q + torch.arange(q, device=x.device)  # (K, Q) time rows
    xw = x[bi[:, None], rows.clamp(max=length - 1), hi_[:, None]].mul_((rows < length)[..., None])  # (K, Q, p)
    return Lx @ xw


def _forward_segment(x, dt, A, B, C, D, S0, q: int, y_out: torch.Tensor, *, final: bool = True):
    """Write one segment's ``y`` into ``y_out (b, l, h, p)``; return the state after it (None without ``final``).

    Where a chunk's log-decay spans at most :data:`FACTOR_SPAN` for a head, its decay block is the outer product
    ``r_i k_j`` (:func:`_decay_blocks`), so ``(L o CB) X = r o (CB (k o X))``: one chunk-major product of the
    group's ``CB`` with all its heads at once (``(Q, Q) @ (Q, hg p)``, no head-major copy of ``x`` and no
    per-head ``(Q, Q)`` block). Its rounding is bounded as the per-head product's (``r_i k_j = L_ij <= 1`` on every
    term that CB's mask keeps). The other (chunk, head) blocks get ``k = 0``, ``r = 1`` and their exact per-head
    product (:func:`_exact_block_product`).
    """
    b, length, h, p = x.shape
    pad = (-length) % q
    if pad:  # x itself is never padded: the products with it write into padded buffers (zero rows appended)
        dt, B, C = (_pad_time(t, pad) for t in (dt, B, C))
    ln = length + pad
    g, n = B.shape[-2:]
    hg, c = h // g, ln // q
    ct, dev = x.dtype, x.device
    floor, zero_at = _exponent_floor(ct)
    dt4 = dt.view(b, c, q, h)

    def times_x(factor: torch.Tensor) -> torch.Tensor:  # x * factor (b, c, Q, h) -> (b, c, Q, h, p)
        if not pad:
            return torch.mul(x.view(b, c, q, h, p), factor[..., None])
        buf = torch.empty((b, ln, h, p), dtype=ct, device=dev)
        torch.mul(x, factor.view(b, ln, h)[:, :length, :, None], out=buf[:, :length])
        buf[:, length:].zero_()
        return buf.view(b, c, q, h, p)
    s, _, mid, wide = _chunk_log_decay(dt4, A)  # (b, c, Q, h) and (b, c, 1, h)
    r = (s - mid).exp_()
    k = (mid - s).exp_().mul_(dt4)
    any_wide = bool(wide.any())
    if any_wide:  # these heads' rank-1 term is 0 (k = 0); their exact product goes into yd, read out with r = 1
        r.masked_fill_(wide, 1.0)
        k.masked_fill_(wide, 0.0)
    w = F.threshold_((s[:, :, -1:] - s).clamp_(min=floor).exp_(), zero_at, 0.0)
    dec = F.threshold_(s[:, :, -1].clamp(min=floor).exp_(), zero_at, 0.0)  # (b, c, h)
    e = F.threshold_(s.clamp(min=floor).exp_(), zero_at, 0.0)
    Xw = times_x(dt4 * w)  # (b, c, Q, h, p)
    Xk = times_x(k)
    Bg = _by_group(B.view(b, c, q, g, n)).contiguous()
    Cg = _by_group(C.view(b, c, q, g, n)).contiguous()
    tril = torch.ones(q, q, dtype=ct, device=dev).tril_()
    CB = (Cg @ Bg.transpose(-1, -2)).mul_(tril)  # (b, c, g, Q, Q)
    yd = _from_group(CB @ _by_group(Xk.view(b, c, q, g, hg * p))).reshape(b, c, q, h, p)
    del Xk
    local = Bg.transpose(-1, -2) @ _by_group(Xw.view(b, c, q, g, hg * p))  # (b, c, g, n, hg p)
    del Xw
    ent = torch.empty((b, c, g, n, hg, p), dtype=ct, device=dev)
    ev, lv = [*ent.unbind(1)], local.view(b, c, g, n, hg, p).unbind(1)
    steps = c
    if final:
        ev.append(torch.empty_like(ent[:, 0]))
    else:
        steps = c - 1
    dv = dec.view(b, c, g, 1, hg, 1).unbind(1)
    if S0 is None:
        ev[0].zero_()
    else:
        ev[0].copy_(S0)
    for i in range(steps):
        torch.addcmul(lv[i], ev[i], dv[i], out=ev[i + 1])
    yo = _from_group(Cg @ ent.view(b, c, g, n, hg * p)).reshape(b, c, q, h, p)
    if any_wide:  # the exact per-head product of the blocks too wide to factor
        bi, ci, _, hi_ = wide.nonzero().unbind(1)
        yd[bi, ci, :, hi_] = _exact_block_product(x, s, dt4, CB[bi, ci, hi_ // hg], bi, ci, hi_, q, tril, floor)

    def rows(t: torch.Tensor) -> torch.Tensor:  # chunked (b, c, Q, ...) -> (b, length, ...) without the padding
        return t.reshape(b, ln, *t.shape[3:])[:, :length]

    torch.mul(rows(yd), rows(r)[..., None], out=y_out)
    del yd
    y_out.addcmul_(rows(yo), rows(e)[..., None])
    if D is not None:
        y_out.addcmul_(x, _d_view(D))
    return ev[c] if final else None


def _forward_segment_lean(x, dt, A, B, C, D, S0, q: int, y_out: torch.Tensor, *, final: bool = True):
    """:func:`_forward_segment` without autograd: the same ``y`` and final state up to rounding, in fewer passes.

    Every chunk-level tensor is chunk-major (``(c, b, ...)``), so the states form one buffer ``T (c + 1, b, g, n,
    hg p)`` whose slices ``T[1:]`` (written by the state product) and ``T[:c]`` (read by the read-out) are both
    contiguous: no shifted copy of ``C`` or of the states. Per (chunk ``k``, head) a reference exponent ``m_k``
    scales the inputs once, ``Xk_j = exp(m_k - s_j) dt_j x_j``, and both products read that one tensor:

    * the diagonal block, ``yd = CB Xk`` (with ``r_i = exp(s_i - m_k)``, ``L_ij = r_i k_j``; ``m_k`` the midpoint of
      the chunk's log-decay span, as in :func:`_forward_segment`), and
    * the chunk's own state, ``local_k = exp(s_Q - m_k) B^T Xk`` (``w_j = exp(s_Q - s_j)`` factors the same way).

    The states are kept scaled, ``T_k = exp(tau_{k+1}) S_k`` (``tau = m`` on factored blocks, 0 on wide ones and
    after the last chunk, so ``T[c]`` is the true final state), which gives the recurrence ``T_k = beta_k B^T Xk +
    alpha_k T_{k-1}`` with ``beta_k = exp(tau_{k+1} + s_Q - m_k)``, ``alpha_k = exp(tau_{k+1} + s_Q - tau_k)``
    (every exponent ``<= 0``: nothing overflows) and turns the read-out ``e_i C_i S_{k-1}`` (``e_i = r_i
    exp(m_k)``) into ``r_i C_i T_{k-1}``: one ``baddbmm_`` accumulates it into ``yd`` and one multiply by ``r``
    finishes both terms. Wide blocks (log-decay span over :data:`FACTOR_SPAN`) take ``m = lo`` (the span's
    minimum: ``Xk`` stays ``<= dt x``, a valid state input) and ``tau = 0``; their rows are then overwritten with
    the exact per-head product plus ``e_i C_i S_{k-1}`` and read out with ``r = 1``. Exponent floor and zeroing
    as in the module docstring. The chunk-major buffers (``Xk``, ``Bt``, ``Cc``, ``yd``, ``T``) come from
    :func:`ratelab.core.workspace.scratch` (reused by every block of a forward inside a workspace scope); the final
    state leaves as a copy.
    """
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    hg = h // g
    pad = (-length) % q
    if pad:  # only dt is padded; x, B and C are written into chunk-major buffers with zero rows appended
        dt = _pad_time(dt, pad)
    c = (length + pad) // q
    full, rem = (c - 1, q - pad) if pad else (c, q)  # whole chunks of x, rows of its last (padded) chunk
    ct, dev = x.dtype, x.device
    floor, zero_at = _exponent_floor(ct)
    dt4 = dt.view(b, c, q, h)
    s, lo, mid, wide = _chunk_log_decay(dt4, A)  # (b, c, Q, h) and (b, c, 1, h)
    any_wide = bool(wide.any())
    m, tau = (torch.where(wide, lo, mid), mid.masked_fill(wide, 0.0)) if any_wide else (mid, mid)
    r = (s - m).exp_()
    k = (m - s).clamp_(min=floor).exp_()
    if any_wide:
        r.masked_fill_(wide, 1.0)
        F.threshold_(k, zero_at, 0.0)
    k.mul_(dt4)

    def by_chunk(t: torch.Tensor, out: torch.Tensor, factor: torch.Tensor | None = None) -> None:
        """``out (b, c, Q, ...) = t (b, length, ...)`` (times ``factor (b, c, Q, ...)``), the padded rows zero."""
        def put(src, dst, f):
            torch.mul(src, f, out=dst) if f is not None else dst.copy_(src)
        if full:
            put(t[:, :full * q].view(b, full, q, *t.shape[2:]), out[:, :full],
                None if factor is None else factor[:, :full])
        if pad:
            put(t[:, full * q:].unsqueeze(1), out[:, full:, :rem], None if factor is None else factor[:, full:, :rem])
            out[:, full:, rem:].zero_()

    Xk = scratch("ssd.Xk", (c, b, q, h, p), ct, dev)
    by_chunk(x, Xk.transpose(0, 1), k[..., None])
    Xg = Xk.view(c, b, 1, q, h * p) if g == 1 else Xk.view(c, b, q, g, hg * p).transpose(2, 3)  # (c, b, g, Q, hg p)
    Bt = scratch("ssd.Bt", (c, b, g, n, q), ct, dev)
    by_chunk(B, Bt.permute(1, 0, 4, 2, 3))  # (c, b, g, n, Q)
    Cc = scratch("ssd.Cc", (c, b, g, q, n), ct, dev)
    by_chunk(C, Cc.permute(1, 0, 3, 2, 4))  # (c, b, g, Q, n)
    tril = torch.ones(q, q, dtype=ct, device=dev).tril_()
    CB = (Cc @ Bt).mul_(tril)  # (c, b, g, Q, Q)
    yd = torch.matmul(CB, Xg, out=scratch("ssd.yd", (c, b, g, q, hg * p), ct, dev))  # (c, b, g, Q, hg p)
    T = scratch("ssd.T", (c + 1, b, g, n, hg * p), ct, dev)
    T6 = T.view(c + 1, b, g, n, hg, p)
    if S0 is not None:
        torch.mul(S0, tau[:, 0, 0].exp().view(b, g, 1, hg, 1), out=T6[0])
    ends = c if final else c - 1  # chunks whose end state is used: read by the next chunk, or returned
    if ends:
        torch.matmul(Bt[:ends], Xg[:ends], out=T[1:ends + 1])
    del Xg

    sq, m0 = s[:, :, -1], m[:, :, 0]  # (b, c, h)
    t_next = torch.cat([tau[:, 1:, 0], torch.zeros_like(sq[:, :1])], 1)

    def coef(ref: torch.Tensor) -> torch.Tensor:  # exp(tau_{k+1} + s_Q - ref), (c, b, g, 1, hg, 1)
        e = F.threshold_((t_next + sq - ref).clamp_(min=floor).exp_(), zero_at, 0.0)
        return e.transpose(0, 1).contiguous().view(c, b, g, 1, hg, 1)

    beta = coef(m0)
    alpha = coef(tau[:, :, 0]) if any_wide else beta
    for i in range(ends):  # the only per-chunk loop: small in-place ops on (b, g, n, hg p) states
        T6[i + 1].mul_(beta[i])
        if i or S0 is not None:
            T6[i + 1].addcmul_(T6[i], alpha[i])
    first = 0 if S0 is not None else 1  # without an initial state chunk 0 reads nothing (T[0] is never written)
    if first < c:
        yd[first:].view(-1, q, hg * p).baddbmm_(Cc[first:].view(-1, q, n), T[first:c].view(-1, n, hg * p))
    yd6 = yd.view(c, b, g, q, hg, p)
    if any_wide:
        bi, ci, _, hi_ = wide.nonzero().unbind(1)
        gi, li = hi_ // hg, hi_ % hg
        ew = F.threshold_(s[bi, ci, :, hi_].clamp(min=floor).exp_(), zero_at, 0.0)  # (K, Q)
        read = (Cc[ci, bi, gi] @ T6[ci, bi, gi, :, li]).mul_(ew[..., None])  # e_i C_i S_{k-1} (tau_k = 0)
        if S0 is None:  # chunk 0 has no entering state (T[0] was left unwritten)
            read.masked_fill_((ci == 0)[:, None, None], 0.0)
        yd6[ci, bi, gi, :, li] = read.add_(_exact_block_product(x, s, dt4, CB[ci, bi, gi], bi, ci, hi_, q, tril,
                                                                floor))
    y6 = y_out.view(b, length, g, hg, p)
    src = yd6.permute(1, 0, 3, 2, 4, 5)  # (b, c, Q, g, hg, p) view
    r6 = r.view(b, c, q, g, hg, 1)
    if full:
        torch.mul(src[:, :full], r6[:, :full], out=y6[:, :full * q].view(b, full, q, g, hg, p))
    if pad:
        torch.mul(src[:, full:, :rem], r6[:, full:, :rem], out=y6[:, full * q:].unsqueeze(1))
    if D is not None:
        y_out.addcmul_(x, _d_view(D))
    return T6[c].clone() if final else None  # T is scratch: the state leaves as a copy


def _backward_segment(x, dt, A, B, C, D, S0, gy, g_end, q: int, outs: dict, need: dict):
    """Gradients of one segment (module docstring), written into the views ``outs["x" | "dt" | "B" | "C"]`` of the
    full gradients; returns ``gA (h,)``, ``gD`` (None without ``D``) and the gradient of ``S0`` (None unless
    ``need["state"]``)."""
    length = x.shape[1]
    pad = (-length) % q
    if pad:  # dt = 0 rows: no decay, no input; their gradients are cut off below
        x, dt, B, C, gy = (_pad_time(t, pad) for t in (x, dt, B, C, gy))
    ch = _Chunks(x, dt, A, B, C, S0, q)
    b, c, q, h, p, g, hg, n = ch.shape
    ct, dev = x.dtype, x.device
    gy5 = gy.view(b, c, q, h, p)
    gy_hm = gy5.transpose(2, 3).contiguous()  # (b, c, h, Q, p)
    ge = gy5 * ch.e[..., None]  # (b, c, Q, h, p)
    ge_g = _by_group(ge.view(b, c, q, g, hg * p))  # (b, c, g, Q, hg p)

    # diagonal blocks, with M' = L o CB o dt_j and the head-major x: M'^T gy = dt M^T gy
    gxd_hm = ch.M.transpose(-1, -2) @ gy_hm  # (b, c, h, Q, p)
    gM = gy_hm @ ch.X.transpose(-1, -2)  # (b, c, h, Q, Q): gy_i . x_j
    del gy_hm
    gMM = ch.M.mul_(gM)  # = (gy_i . X_j) M_ij, the same matrix as without the folding (in place: M's last use)
    gD = None
    if D is not None and D.dim() == 1:
        gD = gM.diagonal(dim1=-2, dim2=-1).sum((0, 1, 3))  # sum of gy_i . x_i per head (padded rows: gy = 0)
    del ch.M
    # row minus column sums of the same matrix: its diagonal, which dominates under strong decay, cancels exactly
    cols = gMM.sum(-2).transpose(2, 3)  # (b, c, Q, h): X_j . gX_diag_j = dt_j (x_j . gX_diag_j)
    gs = gMM.sum(-1).transpose(2, 3) - cols  # (b, c, Q, h)
    del gMM
    gCB = gM.mul_(ch.L).view(b, c, g, hg, q, q).sum(3).mul_(ch.tril)  # (b, c, g, Q, Q)
    del gM, ch.L
    gC = gCB @ ch.Bg  # (b, c, g, Q, n)
    gB = gCB.transpose(-1, -2) @ ch.Cg
    del gCB

    # state read-out e_i S_k C_i
    gC += ge_g @ ch.ent.transpose(-1, -2)
    SC = ch.Cg @ ch.ent  # (b, c, g, Q, hg p): S_k C_i
    gs += _from_group(SC.mul_(ge_g)).reshape(b, c, q, h, p).sum(-1)
    del SC
    g_read = ch.Cg.transpose(-1, -2) @ ge_g  # (b, c, g, n, hg p)
    del ge, ge_g

    # chunk recurrence backwards: G_k = g_read_k + dec_k G_{k+1}, G_c = g_end; gl[k] = G_{k+1}
    gl = torch.empty((b, c, g, n, hg, p), dtype=ct, device=dev)
    glv, rv = gl.unbind(1), g_read.view(b, c, g, n, hg, p).unbind(1)
    dv = ch.dec.view(b, c, g, 1, hg, 1).unbind(1)
    if g_end is None:
        glv[c - 1].zero_()
    else:
        glv[c - 1].copy_(g_end)
    for k in range(c - 1, 0, -1):
        torch.addcmul(rv[k], glv[k], dv[k], out=glv[k - 1])
    G0 = torch.addcmul(rv[0], glv[0], dv[0]) if need["state"] else None
    del g_read, rv
    # S_{k+1} = e_Q S_k + sum_j exp(s_Q - s_j) X_j B_j^T depends on s_Q through e_Q (this term) and through the
    # w_j (gw below, summed at s_Q)
    # <G_{k+1}, S_k> per head (in place: the entering states' last use)
    g_dec = ch.ent.view(b, c, g, n, hg, p).mul_(gl).sum(-1).sum(3).view(b, c, h)
    del ch.ent
    gl = gl.view(b, c, g, n, hg * p)

    # chunk states: local = sum_j w_j X_j B_j^T
    gB += ch.Xw_g @ gl.transpose(-1, -2)
    gWX = _from_group(ch.Bg @ gl).reshape(b, c, q, h, p)  # (b, c, Q, h, p): B G_{k+1}
    del gl
    # d/d x = dt (M^T gy + w B G) + D gy, written straight into the gradient
    if need["x"]:
        gx = outs["x"].view(b, c, q, h, p) if not pad else torch.empty_like(gy5)
        torch.addcmul(gxd_hm.transpose(2, 3), gWX, (ch.dt4 * ch.w)[..., None], out=gx)
        if D is not None:
            gx.addcmul_(gy5, _d_view(D))
        if pad:
            outs["x"].copy_(gx.view(b, c * q, h, p)[:, :length])
    del gxd_hm
    # x_j . d/dX_j (for d/d dt_j) from sums already at hand: the column sums are dt_j x_j . (M^T gy)_j and gw_j =
    # dt_j w_j x_j . (B G)_j, both divided by dt_j; where |dt_j| is below sqrt(tiny) (the products could underflow;
    # dt = 0 is allowed) it is computed directly
    small = ch.dt4.abs() < math.sqrt(torch.finfo(ct).tiny)
    if pad:
        small.view(b, c * q, h)[:, length:] = False  # padded rows: cut off below
    fix = small.nonzero() if small.any() else None
    if fix is not None:
        bi, ci, ji, hi = fix.unbind(1)
        x_rows = ch.x5[bi, ci, ji, hi]  # (K, p)
        direct = (x_rows * gWX[bi, ci, ji, hi]).sum(-1) * ch.w[bi, ci, ji, hi]
    gw = gWX.mul_(ch.Xw_hp).sum(-1)  # (b, c, Q, h): gradient of the exponent s_Q - s_j
    del gWX
    xgX = cols.add(gw).div_(torch.where(small, 1.0, ch.dt4))
    if fix is not None:
        sv = ch.sT[bi, ci, hi]  # (K, Q): the column's block
        ex = (sv - sv.gather(1, ji[:, None])).clamp_(min=ch.floor).exp_()
        F.threshold_(ex, math.exp(ch.floor), 0.0).mul_(torch.arange(q, device=dev)[None] >= ji[:, None])
        col = ex.mul_(ch.CB[bi, ci, hi // hg, :, ji])  # (K, Q): M_ij, i over the chunk
        gXd = (col[:, :, None] * gy5[bi, ci, :, hi]).sum(1)  # (K, p): (M^T gy)_j
        xgX[bi, ci, ji, hi] = direct + (x_rows * gXd).sum(-1)
    # (the end terms below are the sums of the same floats that the positions lose: they cancel as in exact math)
    gs -= gw
    gs[:, :, -1] += gw.sum(2) + g_dec * ch.dec
    ga = gs.flip(2).cumsum_(2).flip(2)  # s = cumsum(a)
    gdt = xgX.add_(ga * A)  # (b, c, Q, h)
    _write(outs["dt"], gdt, length)
    gA = (ga * ch.dt4).sum((0, 1, 2))
    _write(outs["B"], _from_group(gB), length)
    _write(outs["C"], _from_group(gC), length)
    if D is not None and D.dim() == 2 and need["D"]:
        gD = (gy5 * ch.x5).sum((0, 1, 2))  # (h, p); padded rows have gy = 0
    return gA, gD, G0


def _forward(chunk_size: int, segment_chunks: int, x, dt, A, B, C, D, initial_state, final: bool = True,
             lean: bool = False):
    """The segment-by-segment forward on prepared operands: ``y``, the final state ``(b, h, p, n)`` (None without
    ``final``), the states entering the segments (kernel layout; the first is None without ``initial_state``), the
    chunk length and the segments."""
    q = balanced_chunk(x.shape[1], chunk_size)
    segs = _segments(x.shape[1], q, segment_chunks)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    entering = []
    state = None if initial_state is None else _to_states(initial_state, B.shape[2])
    run = _forward_segment_lean if lean else _forward_segment
    for i, (s, e) in enumerate(segs):
        entering.append(state)
        state = run(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, state, q, y[:, s:e],
                    final=final or i + 1 < len(segs))
    return y, None if state is None else _from_states(state), entering, q, segs


class SSDRecomputeFn(torch.autograd.Function):
    """``(x, dt, A, B, C, D, initial_state) -> (y, final_state)`` on prepared operands (compute dtype, ``dt`` after
    bias/softplus/clamp, ``D`` and ``initial_state`` optional); backward recomputes per segment (module
    docstring)."""

    @staticmethod
    def forward(ctx, chunk_size: int, segment_chunks: int, x, dt, A, B, C, D, initial_state):  # noqa: D102
        ctx.set_materialize_grads(False)
        y, final, entering, ctx.q, ctx.segs = _forward(chunk_size, segment_chunks, x, dt, A, B, C, D, initial_state)
        ctx.save_for_backward(x, dt, A, B, C, D, *entering)  # entering[0] is from initial_state (or None)
        return y, final

    @staticmethod
    def backward(ctx, gy, g_final):  # noqa: D102
        x, dt, A, B, C, D, *entering = ctx.saved_tensors
        need_x, need_dt, need_A, need_B, need_C, need_D, need_init = ctx.needs_input_grad[2:]
        outs, gA, gD, g_init = _backward(ctx.q, ctx.segs, x, dt, A, B, C, D, entering, gy, g_final,
                                         need_x=need_x, need_D=need_D, need_init=need_init)
        return (None, None, outs["x"] if need_x else None, outs["dt"] if need_dt else None, gA if need_A else None,
                outs["B"] if need_B else None, outs["C"] if need_C else None, gD if need_D else None,
                g_init if need_init else None)


def _backward(q: int, segs, x, dt, A, B, C, D, entering, gy, g_final, *, need_x: bool, need_D: bool,
              need_init: bool):
    """The segment-by-segment backward from the saved inputs and the states entering the segments (``entering[0]``
    None without an initial state): ``(grads of x, dt, B, C as a dict, gA, gD or None, g_initial (b, h, p, n) or
    None)``. ``gy`` None: no gradient reached ``y``."""
    gy = gy.contiguous() if gy is not None else torch.zeros_like(x)
    outs = {"x": torch.empty_like(x), "dt": torch.empty_like(dt), "B": torch.empty_like(B),
            "C": torch.empty_like(C)}
    gA = torch.zeros_like(A)
    gD = torch.zeros_like(D) if D is not None else None
    g_state = None if g_final is None else _to_states(g_final, B.shape[2])
    for i in range(len(segs) - 1, -1, -1):
        s, e = segs[i]
        need = {"x": need_x, "D": need_D, "state": i > 0 or need_init}
        gA_s, gD_s, g_state = _backward_segment(
            x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, entering[i], gy[:, s:e], g_state, q,
            {k: v[:, s:e] for k, v in outs.items()}, need)
        gA += gA_s
        if gD_s is not None:
            gD += gD_s
    return outs, gA, gD, _from_states(g_state) if need_init else None


def prepare(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, chunk_size, initial_state, segment_chunks):
    """Validate the arguments of :func:`ssd_recompute` and bring the operands to the compute dtype: ``(operands
    (x, dt after bias / softplus / clamp, A, B, C, D, initial_state), segment_chunks resolved, grad)`` with ``grad``
    whether autograd records the call."""
    tensors = (x, dt, A, B, C, D, dt_bias, initial_state)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    if segment_chunks is not None and (not isinstance(segment_chunks, int) or segment_chunks < 1):
        raise ValueError(f"ssd: segment_chunks must be a positive int or None, got {segment_chunks!r}")
    if segment_chunks is None:
        rows = x.shape[0] * balanced_chunk(x.shape[1], chunk_size)  # rows of one chunk across the batch
        segment_chunks = SEGMENT_CHUNKS if grad else max(SEGMENT_CHUNKS, -(-LEAN_SEGMENT_ROWS // rows))
    ct = compute_dtype(x.dtype)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    init = None if initial_state is None else initial_state.to(ct)
    Dc = None if D is None else D.to(ct)
    return (x.to(ct), dtp, A.to(ct), B.to(ct), C.to(ct), Dc, init), segment_chunks, grad


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
    segment_chunks: int | None = None,
    custom_op: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD with the recomputing backward; same contract as :func:`ratelab.kernels.ssd.ssd`.

    Args:
        segment_chunks: chunks per segment (the backward's working set); results do not depend on it beyond
            rounding. None: :data:`SEGMENT_CHUNKS` under autograd, and without it enough chunks for
            :data:`LEAN_SEGMENT_ROWS` rows (batch x tokens) per segment, at least :data:`SEGMENT_CHUNKS`.
        custom_op: run the same kernel as the ``ratelab::ssd_scan`` custom ops (:mod:`ratelab.kernels.ssd.library`).
            None: while ``torch.compile`` traces (dynamo would otherwise unroll the scan's loops), else directly.

    Without autograd (no input requires grad, or grad mode off) a leaner segment forward runs
    (:func:`_forward_segment_lean`) and nothing is kept; its working set is one segment (:func:`ssd_chunked` without
    autograd holds the chunk tensors of the whole sequence at once, and is slower from about a thousand tokens at
    Adventurer-T's shapes).
    """
    if x.dim() != 4 or x.shape[1] == 0:  # (ssd_chunked raises the shape errors, and returns the empty case)
        return ssd_chunked(x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                           chunk_size=chunk_size, initial_state=initial_state, return_final_state=return_final_state)
    operands, segment_chunks, grad = prepare(x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, chunk_size,
                                             initial_state, segment_chunks)
    if custom_op is None:
        custom_op = torch.compiler.is_compiling()
    if custom_op:
        from ratelab.kernels.ssd import library  # (imported with the package: the ops are registered)

        y, final = library.scan(operands, chunk_size, segment_chunks, return_final_state, grad)
    elif grad:
        y, final = SSDRecomputeFn.apply(chunk_size, segment_chunks, *operands)
    else:
        y, final = _forward(chunk_size, segment_chunks, *operands, final=return_final_state, lean=True)[:2]
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
