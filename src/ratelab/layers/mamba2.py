"""Mamba-2 token mixer in pure PyTorch, with the parameter names and shapes of ``mamba_ssm`` 2.x ``Mamba2``.

Paper: Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality", ICML 2024 (arXiv 2405.21060). Parameter layout, defaults and initialization follow the documented
behaviour of state-spaces/mamba ``mamba_ssm/modules/mamba2.py`` (v2.0.x); this is an independent implementation,
so a ``mamba_ssm`` state dict loads with no renaming:

    in_proj.weight   (2 d_in + 2 g N + H, d_model)   split as [z | xBC | dt]
    conv1d.weight    (d_in + 2 g N, 1, d_conv), conv1d.bias (d_in + 2 g N)
    dt_bias, A_log   (H,);  D (H,) or (d_in,) with ``D_has_hdim``
    norm.weight      (d_in,)                          gated RMSNorm, gate first (norm_before_gate=False)
    out_proj.weight  (d_model, d_in)

Forward on u (B, L, d_model):

    z, xBC, dt = in_proj(u)
    xBC        = SiLU(causal depthwise conv(xBC))           left-padded by d_conv - 1
    x, B, C    = xBC                                        x -> (H, P), B, C -> (g, N)
    y          = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D x
    out        = out_proj(RMSNorm(y * SiLU(z)) * w)         normalized over groups of d_in / g channels

The scan itself is :func:`ratelab.kernels.ssd.ssd` (backend ``"auto"``/``"recompute"``/``"chunked"``/``"ref"``, fused
``mamba_ssm`` kernels on CUDA when installed). Without autograd :meth:`Mamba2.forward_infer_parts` runs the same
function regrouped (in_proj as three GEMMs with contiguous outputs, gate in place, the norm's weight folded into
out_proj); ``fast_inference = False`` gives the op-by-op path. Deviations from ``mamba_ssm``: no fused
"memory-efficient" path (the same math is run op by op), no tensor-parallel or variable-length
(``seq_idx``/``cu_seqlens``) support, the depthwise conv is ``F.conv2d`` on a channels-last view rather than the
``causal_conv1d`` CUDA extension, and the step API is functional (returns new caches instead of updating them in
place).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["Mamba2", "RMSNormGated", "causal_conv1d", "causal_conv1d_step"]


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str | None = None
) -> torch.Tensor:
    """Causal depthwise 1-D convolution over the sequence axis.

    Args:
        x: (B, L, C) sequence-major input.
        weight: (C, 1, W) or (C, W) per-channel filters; ``weight[c, -1]`` multiplies the current position.
        bias: optional (C,).
        activation: ``None`` or ``"silu"``.

    Returns:
        (B, L, C); output t depends on inputs t-W+1 .. t only (zeros before the start).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    C = x.shape[-1]
    if torch.compiler.is_compiling():
        # as W shifted multiply-adds, which inductor fuses with the bias and the SiLU into one loop over x; the
        # conv2d below would reach inductor's convolution lowering in a layout oneDNN runs several times slower
        # (Adventurer-T at 4096 tokens: 5 ms a mixer against one elementwise pass)
        W = weight.shape[-1]
        w = weight.reshape(C, W)
        xp = F.pad(x, (0, 0, W - 1, 0))
        L = x.shape[1]
        y = sum(xp[:, k:k + L] * w[:, k] for k in range(W))
        y = y + bias if bias is not None else y
        return F.silu(y) if activation == "silu" else y
    w = weight.reshape(C, 1, 1, -1)
    # (B, C, 1, L) is a channels-last view of the (B, L, C) input: the depthwise conv2d then runs on the
    # sequence-major layout directly (oneDNN on CPU), 3-5x faster than conv1d on a transposed copy, and its output
    # is again sequence-major, so no transpose copy follows.
    # The conv pads both ends by W-1; the last W-1 outputs (which see the right padding) are dropped.
    L, W = x.shape[1], w.shape[-1]
    if not x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad):
        # a strided input (the xBC columns of in_proj's output) sends oneDNN to a path several times slower than a
        # copy followed by the channels-last kernel (Adventurer-T's shapes, 1 thread: up to 15 ms vs 0.65 + 1.6 ms).
        # Not under autograd: the copy would be what the conv keeps for its backward (memory of the training path)
        x = x.contiguous()
    y = F.conv2d(x.transpose(1, 2).unsqueeze(2), w, bias, padding=(0, W - 1), groups=C).squeeze(2).transpose(1, 2)
    y = y[:, :L]
    if activation != "silu":
        return y
    return F.silu(y, inplace=not (torch.is_grad_enabled() and y.requires_grad))


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of :func:`causal_conv1d` with an explicit window.

    Args:
        x: (B, C) this token's input.
        conv_state: (B, C, W) the last W inputs, oldest first (zeros at the start of a sequence).
        weight: (C, 1, W) or (C, W).

    Returns:
        ``(y (B, C), new_conv_state (B, C, W))``.
    """
    state = torch.cat([conv_state[:, :, 1:], x[:, :, None].to(conv_state.dtype)], dim=-1)
    y = (state * weight.reshape(weight.shape[0], -1)).sum(-1)
    if bias is not None:
        y = y + bias
    return (F.silu(y) if activation == "silu" else y), state


def rsqrt_mean_square(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``rsqrt(mean(x^2, -1) + eps)`` with a kept last dim (RMSNorm's scale; ``eps`` None: the dtype's eps, as
    ``nn.RMSNorm``): one vectorized reduction pass (``vector_norm``) and ops on the (..., 1) result, where
    ``F.rms_norm`` on CPU runs pow, mean, rsqrt and two multiplies over x."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return n.square_().div_(x.shape[-1]).add_(torch.finfo(x.dtype).eps if eps is None else eps).rsqrt_()


class RMSNormGated(nn.Module):
    """Gated RMSNorm of ``mamba_ssm``: ``RMSNorm(x * SiLU(z)) * weight`` (``norm_before_gate=False``).

    The mean square is taken over consecutive groups of ``group_size`` channels (``d_in // ngroups`` in Mamba-2, so a
    single group over all channels when ``ngroups == 1``). ``norm_before_gate=True`` gives
    ``RMSNorm(x) * weight * SiLU(z)`` instead. (..., dim) -> (..., dim).
    """

    def __init__(
        self, dim: int, eps: float = 1e-5, *, norm_before_gate: bool = False, group_size: int | None = None
    ) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if dim % group_size:
            raise ValueError(f"RMSNormGated: dim={dim} is not divisible by group_size={group_size}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        if z is not None and not self.norm_before_gate:
            if torch.is_grad_enabled() and (x.requires_grad or z.requires_grad):
                x = x * F.silu(z.to(x.dtype))
            else:  # inference: gate in a fresh buffer in place (one fewer full-size allocation)
                x = F.silu(z.to(x.dtype)).mul_(x)
        # torch's fused rms_norm (one pass instead of pow, mean, rsqrt and two multiplies), per group of channels
        g = x.unflatten(-1, (-1, self.group_size))
        w = self.weight.to(x.dtype)
        if self.group_size == x.shape[-1]:
            y = F.rms_norm(g, (self.group_size,), w, self.eps).flatten(-2)
        else:
            y = F.rms_norm(g, (self.group_size,), None, self.eps).flatten(-2) * w
        if z is not None and self.norm_before_gate:
            y = y * F.silu(z.to(y.dtype))
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}"


class Mamba2(nn.Module):
    """Mamba-2 mixer: (B, L, d_model) -> (B, L, d_model), causal along L.

    Args:
        d_model: token width D.
        d_state: state size N per group (``mamba_ssm`` default 128; Adventurer and M-VAR use 64).
        d_conv: depthwise conv width.
        expand: d_in = expand * d_model.
        headdim: channels P per head; H = d_in / P heads.
        ngroups: groups g sharing B and C (H % g == 0).
        A_init_range: A_log = log U(A_init_range).
        D_has_hdim: skip D per channel (d_in,) instead of per head (H,).
        rmsnorm: gated RMSNorm before out_proj (else plain gating y * SiLU(z)).
        norm_before_gate: see :class:`RMSNormGated`.
        dt_min, dt_max, dt_init_floor: dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max], floored.
        dt_limit: clamp of the step size after softplus ((0, inf): none).
        bias: bias on in_proj and out_proj.
        conv_bias: bias on the depthwise conv.
        chunk_size: SSD chunk length (a speed knob; the result does not depend on it).
        backend: SSD backend, one of :data:`ratelab.kernels.ssd.BACKENDS` (see :func:`ratelab.kernels.ssd.ssd`).
        recompute: under autograd keep only the mixer's input and out_proj's input and recompute the rest (in_proj,
            conv, scan, gate, norm) in the backward (``torch.utils.checkpoint``): per token ``d_model + d_in``
            floats are kept instead of about ``2 d_in + conv_dim + 2 (2 d_in + 2 g N + H)``, for one more forward
            of all but out_proj. Same values and gradients (the same ops are replayed).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        backend: str = "auto",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2: d_inner = {expand} * {d_model} = {d_inner} is not divisible by {headdim=}")
        self.headdim = headdim
        self.nheads = nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={nheads} is not divisible by ngroups={ngroups}")
        self.ngroups = ngroups
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.backend = backend
        self.recompute = recompute
        self.conv_dim = conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        # padding is applied by causal_conv1d (left only); the module holds the weights in nn.Conv1d's layout.
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)

        # Step size: softplus(dt_bias) is log-uniform in [dt_min, dt_max] at init; softplus^-1(y) = y + log(1 - e^-y).
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # the mamba_ssm flag; ratelab's optimizer already skips every 1-D tensor
        if rmsnorm:
            gs = d_inner // ngroups
            self.norm = RMSNormGated(d_inner, eps=1e-5, norm_before_gate=norm_before_gate, group_size=gs)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    # ---- pieces shared by the full pass, the step and the analysis path ---------------------------------------
    def _split_proj(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _split_xbc(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.ngroups, self.d_state),
            C.reshape(*lead, self.ngroups, self.d_state),
        )

    def _D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _A(self) -> torch.Tensor:
        a = self.A_log
        return -torch.exp(a.float() if a.dtype in (torch.float16, torch.bfloat16) else a)

    def _gate_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        return self.out_proj(y)

    def ssm_inputs(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The SSD operands for a sequence: ``z`` (B, L, d_in), ``x`` (B, L, H, P), ``dt`` (B, L, H) raw,
        ``B``/``C`` (B, L, g, N)."""
        z, xbc, dt = self._split_proj(self.in_proj(u))
        xbc = causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias, activation="silu")
        x, B, C = self._split_xbc(xbc)
        return {"z": z, "x": x, "dt": dt, "B": B, "C": C}

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: expected input (B, L, {self.d_model}), got {tuple(u.shape)}")
        if self.fast_inference_applies(u):
            o, r = self.forward_infer_parts(u)
            o = o.mul_(r) if r is not None else o
            return o.add_(self.out_proj.bias) if self.out_proj.bias is not None else o
        if self.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # no RNG inside the mixer: nothing to replay; under torch.compile inductor plans recomputation itself.
            # out_proj stays outside: its input is kept (d_in floats a token) rather than its GEMM run again.
            y = checkpoint(self._gated, u, use_reentrant=False, preserve_rng_state=False)
        else:
            y = self._gated(u)
        return self.out_proj(y)

    # ---- inference fast path ------------------------------------------------------------------------------------
    fast_inference = True  # class default; set False on an instance (or the class) to run the reference path

    def fast_inference_applies(self, u: torch.Tensor) -> bool:
        """The no-grad fast path of :meth:`forward_infer_parts` runs: no autograd, fp32/fp64, gated RMSNorm with
        the gate first (mamba_ssm's default; Adventurer's and M-VAR's)."""
        return (
            self.fast_inference and self.rmsnorm and not self.norm.norm_before_gate and not torch.is_grad_enabled()
            and u.dtype in (torch.float32, torch.float64) and self.in_proj.weight.dtype == u.dtype
            and not torch.compiler.is_compiling()
        )

    def forward_infer_parts(
        self, u: torch.Tensor, in_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` without autograd as ``(o, r)``: the mixer output is ``o * r + out_proj.bias``.

        The same function as the reference path, regrouped so that the large tensors are touched fewer times:

        * ``in_scale`` (D,) multiplies the input channels: a preceding RMSNorm's weight is folded into the in_proj
          weight (``W diag(w)``, a (1160, 256) product) instead of a pass over the tokens;
        * in_proj runs as three GEMMs on row blocks of its weight, so that z, xBC and dt are contiguous (the conv
          and the SiLUs then read dense memory; a strided xBC slice costs a copy or a slow conv);
        * the gate ``SiLU(z) * y`` is written in place in z's buffer;
        * with one norm group, the RMSNorm weight is folded into out_proj's weight and the per-token
          ``rsqrt(mean(g^2) + eps)`` is returned as ``r`` (B, L, 1), applied to the d_model-wide GEMM output
          (half the work of scaling the d_in-wide input; the caller may fold it into its residual add). With
          several groups the scaling is applied per group before out_proj and ``r`` is None.

        Values equal :meth:`forward`'s up to rounding (``tests/test_mamba2_layer.py``).
        """
        from ratelab.kernels.ssd import ssd

        W, bias = self.in_proj.weight, self.in_proj.bias
        if in_scale is not None:
            W = W * in_scale
        sizes = [self.d_inner, self.conv_dim, self.nheads]
        bs = bias.split(sizes) if bias is not None else (None, None, None)
        z, xbc, dt = (F.linear(u, w, b) for w, b in zip(W.split(sizes), bs, strict=True))
        xbc = causal_conv1d(xbc, self.conv1d.weight, self.conv1d.bias, activation="silu")
        x, B, C = self._split_xbc(xbc)
        y = ssd(
            x, dt, self._A(), B, C, self._D(),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        g = F.silu(z, inplace=True).mul_(y.flatten(-2))
        norm = self.norm
        gs = norm.group_size
        r = rsqrt_mean_square(g.unflatten(-1, (-1, gs)), norm.eps)  # (B, L, groups, 1)
        w_out = self.out_proj.weight * norm.weight
        if r.shape[-2] == 1:
            return F.linear(g, w_out), r.squeeze(-1)
        g = g.unflatten(-1, (-1, gs)).mul_(r).flatten(-2)
        return F.linear(g, w_out), None

    def _gated(self, u: torch.Tensor) -> torch.Tensor:
        """in_proj, conv, scan, gate and norm: the input of out_proj, (B, L, d_in)."""
        from ratelab.kernels.ssd import ssd

        s = self.ssm_inputs(u)
        y = ssd(
            s["x"], s["dt"], self._A(), s["B"], s["C"], self._D(),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        y, z = y.flatten(-2), s["z"]
        return self.norm(y, z) if self.rmsnorm else y * F.silu(z)

    def mixing_matrix(self, u: torch.Tensor) -> torch.Tensor:
        """The SSD's implicit causal token-mixing matrix (the "attention" of state-space duality).

        ``M[b, h, i, j] = (C_i . B_j) dt_j exp(sum_{k=j+1..i} dt_k A_h)`` for ``i >= j``, 0 above the diagonal, so that
        the SSD output is ``y[:, i, h] = sum_j M[:, h, i, j] x[:, j, h] + D_h x[:, i, h]`` with ``x`` the post-conv
        input of :meth:`ssm_inputs`. The conv, gate and projections are not part of it. O(L^2 H) memory: for
        analysis at small sizes.

        Returns:
            (B, H, L, L).
        """
        s = self.ssm_inputs(u)
        ct = torch.float32 if u.dtype in (torch.float16, torch.bfloat16) else u.dtype
        dt = F.softplus(s["dt"].to(ct) + self.dt_bias.to(ct))
        lo, hi = self.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(min=lo, max=hi)
        rep = self.nheads // self.ngroups
        B = s["B"].to(ct).repeat_interleave(rep, dim=-2)  # (B, L, H, N)
        C = s["C"].to(ct).repeat_interleave(rep, dim=-2)
        cb = torch.einsum("bihn,bjhn->bhij", C, B)
        cum = torch.cumsum(dt * self._A().to(ct), dim=1).transpose(1, 2)  # (B, H, L): sum_{k<=i} dt_k A
        L = u.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=u.device).tril()
        seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        return (cb * torch.exp(seg) * dt.transpose(1, 2)[..., None, :]).to(u.dtype)

    # ---- recurrent inference ------------------------------------------------------------------------------------
    def allocate_inference_cache(
        self, batch_size: int, *, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero caches ``(conv_state (B, conv_dim, d_conv), ssm_state (B, H, P, N))`` for :meth:`step`."""
        dtype = dtype or self.in_proj.weight.dtype
        device = device or self.in_proj.weight.device
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, dtype=dtype, device=device)
        ssm_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, dtype=ssm_dtype, device=device)
        return conv_state, ssm_state

    def step(
        self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: ``u`` (B, d_model) or (B, 1, d_model) -> ``(out, new_conv_state, new_ssm_state)``.

        Running it over a sequence from :meth:`allocate_inference_cache` reproduces :meth:`forward` token by token.
        """
        from ratelab.kernels.ssd import ssd_step

        squeeze = u.ndim == 3
        if squeeze:
            if u.shape[1] != 1:
                raise ValueError(f"Mamba2.step: expected one token (B, 1, D), got {tuple(u.shape)}")
            u = u[:, 0]
        z, xbc, dt = self._split_proj(self.in_proj(u))
        xbc, conv_state = causal_conv1d_step(xbc, conv_state, self.conv1d.weight, self.conv1d.bias, activation="silu")
        x, B, C = self._split_xbc(xbc)
        y, ssm_state = ssd_step(
            ssm_state, x, dt, self._A(), B, C, self._D(),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit,
        )  # fmt: skip
        out = self._gate_out(y.flatten(-2), z)
        return (out[:, None] if squeeze else out), conv_state, ssm_state

    def chunk(
        self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n >= 1 tokens continuing a sequence whose recurrent state is given: ``u`` (B, n, d_model) ->
        ``(out (B, n, d_model), new_conv_state, new_ssm_state)``.

        The states are those of :meth:`step` / :meth:`allocate_inference_cache` (zeros at the start). With the states
        after a prefix, ``out`` equals ``forward(cat([prefix, u]))[:, -n:]`` up to rounding: the conv sees the real
        previous inputs instead of zero padding and the scan starts from ``ssm_state``. M-VAR carries the state of
        each block across scales with it, so sampling scans each new token once (O(L) instead of O(L^2/n)).
        """
        from ratelab.kernels.ssd import ssd

        if u.ndim != 3 or u.shape[1] < 1:
            raise ValueError(f"Mamba2.chunk: u must be (B, n >= 1, D), got {tuple(u.shape)}")
        z, xbc, dt = self._split_proj(self.in_proj(u))
        W = self.d_conv
        window = torch.cat([conv_state[:, :, 1:].transpose(1, 2).to(xbc.dtype), xbc], dim=1)  # (B, W - 1 + n, conv)
        xbc = causal_conv1d(window, self.conv1d.weight, self.conv1d.bias, activation="silu")[:, W - 1:]
        new_conv = window[:, -W:].transpose(1, 2).to(conv_state.dtype)
        x, B, C = self._split_xbc(xbc)
        y, new_ssm = ssd(
            x, dt, self._A(), B, C, self._D(),
            dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit, chunk_size=self.chunk_size,
            initial_state=ssm_state, return_final_state=True, backend=self.backend,
        )  # fmt: skip
        return self._gate_out(y.flatten(-2), z), new_conv, new_ssm

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, heads={self.nheads}x{self.headdim}, "
            f"d_state={self.d_state}, ngroups={self.ngroups}, d_conv={self.d_conv}, backend={self.backend!r}"
            + (", recompute=True" if self.recompute else "")
        )
