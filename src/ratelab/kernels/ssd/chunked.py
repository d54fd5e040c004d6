"""Chunked SSD (state-space duality) forward in pure PyTorch: matmuls inside chunks, a batched pass between them.

The sequence is cut into ``c`` chunks of ``Q`` tokens. With ``a_t = dt_t A`` and ``s`` the running sum of ``a`` inside
a chunk, the output of position ``i`` of chunk ``k`` is

* an intra-chunk ("diagonal block") term ``sum_{j<=i} exp(s_i - s_j) (C_i . B_j) dt_j x_j`` -- a masked Q x Q
  matmul, the attention-like dual form;
* plus the state entering chunk ``k`` read out through ``C_i``, decayed by ``exp(s_i)``.

The states entering the chunks come from one batched product with the ``(c+1) x (c+1)`` lower-triangular matrix of
chunk-to-chunk decays (the optional initial state is chunk "-1"), so there is no Python loop over time or chunks and
autograd sees a handful of large ops, whose backward is linear in ``L`` for a fixed number of chunks (the
``(c+1)^2`` inter-chunk product is ``O((L/Q)^2 p n)``, small next to the intra-chunk work for the lengths used here).

Numerics: all exponents are differences ``s_i - s_j`` with ``i >= j`` (hence ``<= 0`` for ``A < 0``, ``dt >= 0``); the
upper triangle is filled with ``-inf`` *before* ``exp`` so nothing large is ever exponentiated, and its gradient is
exactly zero. Half inputs are computed in fp32. Lengths that are not a multiple of ``Q`` are padded at the end with
``dt = 0`` (no decay, no input), which leaves the final state exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ratelab.kernels.ssd.ref import DEFAULT_DT_LIMIT, check_inputs, compute_dtype, prepare_dt, skip_term


def _decay_matrix(cs: torch.Tensor) -> torch.Tensor:
    """``exp(cs_i - cs_j)`` for ``i >= j``, else 0, for cumulative log-decays ``cs (..., T)`` -> ``(..., T, T)``."""
    t = cs.shape[-1]
    seg = cs[..., :, None] - cs[..., None, :]
    upper = torch.ones(t, t, dtype=torch.bool, device=cs.device).triu_(1)
    return seg.masked_fill(upper, -math.inf).exp()


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

    q = min(chunk_size, length)  # a short sequence is one chunk of its own length: no padding work
    pad = (-length) % q
    xdt = xc * dtp[..., None]
    Bc, Cc, a = B.to(ct), C.to(ct), dtp * A.to(ct)
    if pad:  # dt = 0 rows: exp(0) = 1 keeps the state, dt x B^T = 0 adds nothing
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        Bc = F.pad(Bc, (0, 0, 0, 0, 0, pad))
        Cc = F.pad(Cc, (0, 0, 0, 0, 0, pad))
    c, hg = (length + pad) // q, h // g

    # Heads sharing B/C are kept next to each other (g, hg) so that the state matmuls fold them into one operand
    # instead of broadcasting (and copying) B/C per head.
    xdt = xdt.view(b, c, q, g, hg, p).permute(0, 3, 1, 2, 4, 5).contiguous()  # (b, g, c, Q, hg, p)
    Bc = Bc.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).contiguous()  # (b, g, c, Q, n)
    Cc = Cc.view(b, c, q, g, n).permute(0, 3, 1, 2, 4).contiguous()
    cs = a.view(b, c, q, g, hg).permute(0, 3, 1, 4, 2).cumsum(-1)  # (b, g, c, hg, Q): log-decay since chunk start

    # 1. intra-chunk: masked (C B^T) with per-head decays, applied to dt x
    scores = (Cc @ Bc.transpose(-1, -2)).unsqueeze(3)  # (b, g, c, 1, Q, Q)
    y = (scores * _decay_matrix(cs)) @ xdt.transpose(3, 4)  # (b, g, c, hg, Q, p)

    # 2. each chunk's own end state, inputs weighted by their decay to the chunk end
    to_end = torch.exp(cs[..., -1:] - cs).transpose(-1, -2)  # (b, g, c, Q, hg)
    local = Bc.transpose(-1, -2) @ (xdt * to_end[..., None]).flatten(-2)  # (b, g, c, n, hg*p)

    # 3. states entering each chunk: one product with the chunk-level decay matrix, initial state as chunk -1
    chunk_cs = F.pad(cs[..., -1].transpose(-1, -2), (1, 0)).cumsum(-1)  # (b, g, hg, c+1)
    s0 = state0.view(b, g, hg, p, n).permute(0, 1, 4, 2, 3).reshape(b, g, 1, n * hg * p)
    states = torch.cat([s0, local.flatten(-2)], dim=2)  # (b, g, c+1, n*hg*p)
    states = states.view(b, g, c + 1, n, hg, p).permute(0, 1, 4, 2, 3, 5).reshape(b, g, hg, c + 1, n * p)
    states = _decay_matrix(chunk_cs) @ states  # (b, g, hg, c+1, n*p)
    final = states[:, :, :, c].view(b, g, hg, n, p).transpose(-1, -2).reshape(b, h, p, n)
    entering = states[:, :, :, :c].view(b, g, hg, c, n, p).permute(0, 1, 3, 4, 2, 5).reshape(b, g, c, n, hg * p)

    # 4. read the entering state through C, decayed from the chunk start
    y_in = (Cc @ entering).view(b, g, c, q, hg, p) * torch.exp(cs).transpose(-1, -2)[..., None]
    y = y.transpose(3, 4) + y_in  # (b, g, c, Q, hg, p)

    y = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c * q, h, p)[:, :length]
    if D is not None:
        y = y + skip_term(xc, D.to(ct))
    y = y.to(x.dtype)
    return (y, final) if return_final_state else y
