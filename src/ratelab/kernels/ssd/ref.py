"""Readable reference for the Mamba-2 / SSD recurrence: one token at a time.

Per head ``i`` (of ``h``), with group ``gi = i // (h // g)`` for the shared ``B``/``C`` and a state
``S`` of shape ``(p, n)``::

    S_t = exp(dt_t A_i) S_{t-1} + dt_t x_t B_t^T        # x_t: (p,), B_t: (n,)
    y_t = S_t C_t + D_i x_t

This file also holds the argument checks and the ``dt`` preprocessing shared by every backend, so that all of them
agree on what the arguments mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_DT_LIMIT = (0.0, math.inf)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half inputs are computed in fp32 (the exponentials and long sums lose too much in 16 bits)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _shape_error(name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"ssd: {name} must have shape {expected}, got {tuple(t.shape)}")


def check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    state: torch.Tensor | None,
    *,
    step: bool,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return ``(batch, length, heads, headdim, groups, d_state)`` (length is 1 for a step).

    Args:
        step: ``True`` for the one-token layout (no length axis), ``False`` for the sequence layout.

    Raises:
        ValueError: naming the first argument whose shape is inconsistent.
    """
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ssd: {name} must be a torch.Tensor, got {type(t).__name__}")
    if step:
        if x.dim() != 3:
            raise _shape_error("x", x, "(batch, heads, headdim)")
        b, h, p = x.shape
        length = 1
        lead: tuple[int, ...] = (b,)
        lead_s = "(batch, "
    else:
        if x.dim() != 4:
            raise _shape_error("x", x, "(batch, length, heads, headdim)")
        b, length, h, p = x.shape
        lead = (b, length)
        lead_s = "(batch, length, "
    if B.dim() != len(lead) + 2:
        raise _shape_error("B", B, lead_s + "groups, d_state)")
    g, n = B.shape[-2:]
    if tuple(B.shape[: len(lead)]) != lead:
        raise _shape_error("B", B, f"{(*lead, g, n)} (leading dims of x)")
    if g == 0 or h % g:
        raise ValueError(f"ssd: heads ({h}) must be a multiple of B/C groups ({g})")
    if tuple(C.shape) != tuple(B.shape):
        raise _shape_error("C", C, f"{tuple(B.shape)} (same as B)")
    if tuple(dt.shape) != (*lead, h):
        raise _shape_error("dt", dt, f"{(*lead, h)}")
    if tuple(A.shape) != (h,):
        raise _shape_error("A", A, f"({h},) (one scalar decay per head)")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise _shape_error("D", D, f"({h},) or ({h}, {p})")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        raise _shape_error("dt_bias", dt_bias, f"({h},)")
    if state is not None and tuple(state.shape) != (b, h, p, n):
        raise _shape_error("initial_state" if not step else "state", state, f"{(b, h, p, n)}")
    return b, length, h, p, g, n


def prepare_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """``dt (+ dt_bias)``, then softplus if asked, then clamped to ``dt_limit`` (the mamba_ssm order).

    As in mamba_ssm, the clamp is skipped at the default ``(0, inf)``, so a raw negative ``dt`` without softplus
    is passed through unchanged.
    """
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"ssd: dt_limit must be (min, max) with min <= max, got {dt_limit!r}")
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20 returns dt itself above, as mamba_ssm does
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def expand_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., g, n)`` -> ``(..., heads, n)``: head ``i`` reads group ``i // (heads // g)``."""
    g = t.shape[-2]
    return t if g == heads else t.repeat_interleave(heads // g, dim=-2)


def skip_term(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``D * x`` for ``x (..., h, p)`` and ``D`` of shape ``(h,)`` or ``(h, p)``."""
    return x * (D[:, None] if D.dim() == 1 else D)


def _step_core(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step on prepared fp32/fp64 tensors: state (b,h,p,n), x (b,h,p), dt (b,h), B/C (b,h,n)."""
    decay = torch.exp(dt * A)  # (b, h)
    state = state * decay[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = (state @ C[..., None]).squeeze(-1)
    return y, state


def ssd_step(
    state: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence by one token (generation / recurrent mode), O(1) in the sequence length.

    Args:
        state: ``(b, h, p, n)`` state before this token (zeros to start a sequence).
        x: ``(b, h, p)`` input of this token.
        dt: ``(b, h)`` raw step size (see :func:`ssd` for ``dt_bias``/``dt_softplus``/``dt_limit``).
        A: ``(h,)`` decay rate per head (negative).
        B: ``(b, g, n)`` input projection, ``h % g == 0``.
        C: ``(b, g, n)`` output projection.
        D: optional ``(h,)`` or ``(h, p)`` skip.

    Returns:
        ``(y, new_state)``: ``y (b, h, p)`` in ``x``'s dtype and the new state in the compute dtype (fp32 for half
        inputs, else ``x``'s dtype).
    """
    _, _, h, _, _, _ = check_inputs(x, dt, A, B, C, D, dt_bias, state, step=True)
    ct = compute_dtype(x.dtype)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    xc = x.to(ct)
    y, new_state = _step_core(
        state.to(ct), xc, dtp, A.to(ct), expand_groups(B.to(ct), h), expand_groups(C.to(ct), h)
    )
    if D is not None:
        y = y + skip_term(xc, D.to(ct))
    return y.to(x.dtype), new_state


def ssd_ref(
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
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential reference: a Python loop over time applying the one-token recurrence. See :func:`ssd`.

    The time axis is unbound once rather than sliced per step: differentiating ``x[:, t]`` inside the loop makes
    every slice's backward write a full-length gradient, i.e. an O(L^2) backward.
    """
    b, length, h, p, _, n = check_inputs(x, dt, A, B, C, D, dt_bias, initial_state, step=False)
    ct = compute_dtype(x.dtype)
    dtp = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, ct)
    xc, Ac = x.to(ct), A.to(ct)
    Bh, Ch = expand_groups(B.to(ct), h), expand_groups(C.to(ct), h)
    if initial_state is None:
        state = x.new_zeros((b, h, p, n), dtype=ct)
    else:
        state = initial_state.to(ct)
    ys = []
    for x_t, dt_t, b_t, c_t in zip(xc.unbind(1), dtp.unbind(1), Bh.unbind(1), Ch.unbind(1)):
        y_t, state = _step_core(state, x_t, dt_t, Ac, b_t, c_t)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros((b, 0, h, p))
    if D is not None:
        y = y + skip_term(xc, D.to(ct))
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y
