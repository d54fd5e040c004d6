"""Chunked SSD (state-space duality) forward in pure PyTorch: matmuls inside chunks, a short recurrence between them.

The sequence is cut into ``c`` chunks of ``Q`` tokens. With ``a_t = dt_t A`` and ``s`` the running sum of ``a`` inside
a chunk, the output of position ``i`` of chunk ``k`` is

* an intra-chunk ("diagonal block") term ``sum_{j<=i} exp(s_i - s_j) (C_i . B_j) dt_j x_j`` -- a masked Q x Q
  matmul, the attention-like dual form;
* plus the state entering chunk ``k`` read out through ``C_i``, decayed by ``exp(s_i)``.

The states entering the chunks follow ``S_{k+1} = exp(s_end,k) S_k + local_k`` (``local_k``: chunk ``k``'s own end
state, one batched matmul for all chunks). This is the only Python loop: ``c = L / Q`` steps of one small
``addcmul`` on the ``(p, n)`` states per head, over chunks that are ``unbind``-ed (views whose backward is a single
``stack``), never sliced out of a big tensor step by step (each slice's backward would allocate a full-size gradient:
quadratic in ``L``). It replaces the earlier ``(c+1) x (c+1)`` decay-matrix product, which cost ``O((L/Q)^2 p n)``
plus two permute copies of all chunk states. Everything is laid out chunk-major, ``(b, c, Q, h, p)``, a free view of
the ``(b, L, h, p)`` input/output, so the large operands need no permute copies (matmul reads the per-head strided
views in place). Without autograd (``torch.no_grad`` or no input requiring grad) the same ops run in place.

Numerics: all exponents are differences ``s_i - s_j`` with ``i >= j`` (hence ``<= 0`` for ``A < 0``, ``dt >= 0``); the
upper triangle gets ``-inf`` *before* ``exp`` so nothing large is ever exponentiated, and its gradient is exactly zero.
Exponents are floored at ``log(finfo.tiny)`` (about -87 in fp32, -708 in fp64) because CPU ``exp`` is 5-40x slower
when its result is subnormal or zero; a term below the smallest normal number changes by less than ``finfo.tiny``.
Half inputs are computed in fp32. ``Q`` is balanced (:func:`balanced_chunk`: the fewest chunks of at most
``chunk_size``, as equal as possible) and the few tokens short of a multiple of ``Q`` are padded at the end with
``dt = 0`` (no decay, no input), which leaves the final state exact. Without autograd the head-wise matmuls read
strided views in place and write head-major buffers, and the states entering the chunks go into one batch-major
buffer: a few large ops instead of one small GEMM per (sequence, chunk, head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs, compute_dtype, prepare_dt, skip_term


def exponent_floor(dtype: torch.dtype) -> float:
    """``log(finfo(dtype).tiny)`` rounded up: the floor of every decay exponent (see the module docstring)."""
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def balanced_chunk(length: int, chunk_size: int) -> int:
    """The chunk length actually used: the fewest chunks of at most ``chunk_size`` tokens, made as equal as
    possible, so that padding is under one token per chunk (198 tokens at ``chunk_size`` 64: 4 chunks of 50 and 2
    padded tokens, instead of 4 chunks of 64 and 58)."""
    if length <= chunk_size:
        return max(length, 1)  # a short sequence is one chunk of its own length: no padding work
    c = -(-length // chunk_size)
    return -(-length // c)


def ssd_chunked(
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
    """Chunked SSD; same contract as :func:`ratelab.kernels.ssd.ssd` (which documents the arguments)."""
    b, length, h, p, g, n = check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    ct = compute_dtype(x.dtype)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)  # (b, L, h)
    xc = x.to(ct)
    state0 = x.new_zeros((b, h, p, n), dtype=ct) if initial_state is None else initial_state.to(ct)
    if length == 0:
        y = x.new_zeros(x.shape)
        return (y, state0) if return_final_state else y

    q = balanced_chunk(length, chunk_size)
    pad = (-length) % q
    c, hg = (length + pad) // q, h // g
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, dt_bias, initial_state)
    )

    # Chunk-major layout throughout: (b, c, Q, h, p) is a free view of the (b, L, h, p) input, so no big permute.
    if grad or not pad:
        xdt = xc * dtp[..., None]  # (b, L, h, p), contiguous
        if pad:
            xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
    else:  # written straight into the padded buffer: no zero-fill of the whole buffer, no second copy
        xdt = torch.empty((b, length + pad, h, p), dtype=ct, device=x.device)
        torch.mul(xc, dtp[..., None], out=xdt[:, :length])
        xdt[:, length:].zero_()
    a = dtp * A.to(ct)  # (b, L, h)
    Bc, Cc = B.to(ct), C.to(ct)
    if pad:  # dt = 0 rows: exp(0) = 1 keeps the state, dt x B^T = 0 adds nothing
        a = F.pad(a, (0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
    xdt = xdt.view(b, c, q, g, hg * p)
    Bg = Bc.reshape(b, c, q, g, n).transpose(2, 3)  # (b, c, g, Q, n) views (strided; matmul reads them in place)
    Cg = Cc.reshape(b, c, q, g, n).transpose(2, 3)
    cs = a.view(b, c, q, h).cumsum(2)  # (b, c, Q, h): log-decay since the chunk start (<= 0 for A < 0, dt >= 0)
    csT = cs.transpose(2, 3).contiguous()  # (b, c, h, Q), small
    # exp() of arguments whose result is subnormal or 0 (including -inf) runs 5-40x slower on CPUs than in the normal
    # range, so exponents are floored at log(smallest normal): each such term changes by < finfo.tiny (1e-38 in
    # fp32, 1e-308 in fp64), invisible next to any O(eps) term; its gradient (of the same size) becomes 0.
    floor = exponent_floor(ct)

    # 1. intra-chunk, per head: (C B^T) masked by exp(s_i - s_j), i >= j; -inf above the diagonal before exp.
    scores = (Cg @ Bg.transpose(-1, -2)).unsqueeze(3)  # (b, c, g, 1, Q, Q)
    # Above the diagonal -inf is added and the exponent then floored (so exp sees the floor, never a large positive)
    # and the scores are zeroed: those entries are exactly 0 with zero gradient. (Adding a -inf/0 (Q, Q) mask and
    # a scalar clamp are cheaper than masked_fill, forward and backward.)
    upper = torch.ones(q, q, dtype=torch.bool, device=x.device).triu_(1)
    scores = scores.masked_fill(upper, 0.0)
    neg_upper = torch.zeros(q, q, dtype=ct, device=x.device).masked_fill_(upper, -math.inf)
    seg = torch.sub(csT[..., :, None], csT[..., None, :]).add_(neg_upper).view(b, c, g, hg, q, q)
    if grad:
        mix = seg.clamp(min=floor).exp() * scores
    else:  # same ops in place: no autograd graph to protect
        mix = seg.clamp_(min=floor).exp_().mul_(scores)

    # 2. each chunk's own end state, inputs weighted by their decay to the chunk end: (b, c, g, n, hg*p)
    to_end = torch.exp((cs[:, :, -1:] - cs).clamp(min=floor))  # (b, c, Q, h), exponents <= 0
    xw = (xdt.view(b, c, q, h, p) * to_end[..., None]).view(b, c, q, g, hg * p).transpose(2, 3)
    local = Bg.transpose(-1, -2) @ xw  # (b, c, g, n, hg*p)

    # 3. states entering each chunk: a recurrence over the c chunks, S_{k+1} = exp(sum_k a) S_k + local_k. The loop
    # is O(L/Q) small ops on unbound (not sliced) chunks, so its backward stays linear in L (slicing one big tensor
    # per step would allocate a full-size gradient per step: quadratic).
    decay = torch.exp(cs[:, :, -1].clamp(min=floor)).view(b, c, g, 1, hg, 1)  # (b, c, g, 1, hg, 1)
    s = state0.view(b, g, hg, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, n, hg, p)
    loc, dec = local.view(b, c, g, n, hg, p).unbind(1), decay.unbind(1)
    if grad:
        entering = []
        for k in range(c):
            entering.append(s)
            s = torch.addcmul(loc[k], s, dec[k])
        ent = torch.stack(entering, 1).view(b, c, g, n, hg * p)
    else:  # inference: the recurrence writes straight into one batch-major buffer (no list + stack copy, and the
        # read-out matmul below takes it as it is)
        buf = torch.empty((b, c, g, n, hg, p), dtype=ct, device=x.device)
        ents = buf.unbind(1)
        ents[0].copy_(s)
        for k in range(c - 1):
            torch.addcmul(loc[k], ents[k], dec[k], out=ents[k + 1])
        s = torch.addcmul(loc[c - 1], ents[c - 1], dec[c - 1])
        ent = buf.view(b, c, g, n, hg * p)
    final = s.permute(0, 1, 3, 4, 2).reshape(b, h, p, n)

    # 4. the entering state read out through C and decayed from the chunk start, plus the intra-chunk term
    y_in = (Cg @ ent).transpose(2, 3).reshape(b, c, q, h, p)  # (b, c, Q, h, p); a view when g == 1
    e_in = torch.exp(cs.clamp(min=floor))[..., None]
    y_in = y_in * e_in if g > 1 or grad else y_in.mul_(e_in)  # (g == 1: y_in is the matmul's own fresh buffer)
    x5 = xdt.view(b, c, q, h, p)
    mix = mix.view(b, c, h, q, q)
    if grad:  # one batched matmul on a head-major copy of x dt, added back into the chunk-major y_in
        y = y_in.add_((mix @ x5.transpose(2, 3)).transpose(2, 3))
    else:  # per head one bmm reading the strided (b c, Q, p) view of x dt in place, into a head-major buffer,
        # then one strided add into y_in (an in-place baddbmm_ into y_in's strided views would run one small
        # addmm_ per (sequence, chunk, head): thousands of calls)
        yd = torch.empty((h, b * c, q, p), dtype=ct, device=x.device)
        for hi, (mi, xi) in enumerate(zip(mix.unbind(2), x5.unbind(3), strict=True)):
            torch.bmm(mi.flatten(0, 1), xi.flatten(0, 1), out=yd[hi])
        y = y_in.add_(yd.view(h, b, c, q, p).permute(1, 2, 3, 0, 4))
    y = y.reshape(b, c * q, h, p)[:, :length]
    if D is not None:
        Dc = D.to(ct)
        if grad:
            y = y + skip_term(xc, Dc)
        else:
            y = y.addcmul_(xc, Dc[:, None] if Dc.dim() == 1 else Dc)
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
