"""CRATE-alpha: the white-box transformer scaled up with an overcomplete, decoupled sparse-coding block.

Paper: Yang, Li, Pai, Zhou, Ma, Yu, Xie, "Scaling White-Box Transformers for Vision", NeurIPS 2024 (arXiv
2405.20299). Official code: UCSC-VLAA/CRATE-alpha, JAX/Flax ``models/crate.py`` (training) and the PyTorch inference
port ``torch_inference/model/crate_alpha.py``. This file is an independent re-implementation; the key names of both
official layouts are mapped in ``convert.py``.

One layer on row-major tokens z (B, N, d), K heads of width p, dictionaries D, D_hat in R^{d x C d} (C = 4):

    a      = LN1(z)
    w_k    = a U_k                                   one bias-free projection, used as query = key = value
    z_half = z + concat_k(softmax(w_k w_k^T / sqrt(p)) w_k) W_out^T          W_out bias-free too
    b      = LN2(z_half)
    A1     = ReLU(eta D^T b - eta lambda)            first proximal step, from A0 = 0
    A2     = ReLU(A1 - eta D^T (D A1 - b) - eta lambda)
    z_next = z_half + D_hat A2                       decoupled synthesis, residual

(column-vector notation; on token rows D^T b is ``b @ D``). eta = lambda = 0.1. All LayerNorms have eps 1e-6.
Stem: Conv2d(kernel = stride = patch) with bias (timm's ``PatchEmbed``), [CLS] prepended, learned position embedding
over the N+1 tokens. Head: final LayerNorm, [CLS] token, Linear.

Initialization follows the JAX training code: stem kaiming-uniform (fan in), D and D_hat kaiming-uniform with Flax's
fan-in of a (d, C d) kernel (= d; PyTorch's default for that shape would use C d, a bound half as large), MSSA and
head weights normal(0.02), biases zero, position embedding normal(0.02), [CLS] normal(1e-6).

Deviations from the official code (the released checkpoints load and give the same logits either way):
  * The PyTorch port's head LayerNorm uses PyTorch's default eps 1e-5; here it is 1e-6, as the JAX ``encoder_norm``
    the weights were trained with (a relative change of about 5e-6 / var(feature) in the normalized [CLS]).
  * The final norm is applied in :meth:`CrateAlpha.forward_head` to the [CLS] token only (the JAX code normalizes
    every token and then takes [CLS]: the same numbers), so ``forward_features`` returns the tokens before it, as
    every family of this library does; ``forward_intermediates(norm=True)`` applies it to all tokens.
  * ODL arithmetic: the fast path (:func:`odl_fast`) computes the same four products with the scalars folded into
    the GEMMs, in-place activations and a hand-written backward (eight products, fewer temporaries); the four
    products as written are :func:`odl_ref` (``set_fused_odl(False)``), and the tests compare outputs and
    gradients. Under autocast the fast path runs in the autocast dtype, as the products of the reference would; a
    backward with ``create_graph=True`` (second derivatives) goes through the reference's graph.
  * Inputs of another size than the construction size resample the position table on the fly, bilinearly on
    corner-aligned grids with the [CLS] row kept, which is what the official fine-tuning resampler does
    (``resample_posemb``: ``scipy.ndimage.zoom(order=1)``); the PyTorch port slices the table instead.
  * ``decoupled=False`` / ``residual=False`` switch off the two changes of the ODL block for the paper's ablation;
    ``expansion`` (C) is configurable (hard-coded 4 upstream). The optional LayerScale of the JAX code (off in every
    released config) is not implemented; drop path is (``drop_path_rate``, linear over depth as the JAX code).

Model API (docs/models.md, "Model API"): ``forward_features`` / ``forward_head`` / ``forward_intermediates`` as
timm; :meth:`CrateAlpha.forward_layer_quantities` gives U_k^T LN1(Z^l), the half step Z^{l+1/2} and the sparse codes
A2 for the rate measures (``layer_measures``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.layers.intermediates import (
    check_output_fmt,
    collect_intermediates,
    pack_intermediates,
    resolve_indices,
)
from ratelab.layers.mssa import MSSA
from ratelab.models.crate_alpha.config import CRATE_ALPHA_VARIANTS, CrateAlphaConfig

LN_EPS = 1e-6

# _timm_note: timm's layers are imported inside the constructors (as in the Adventurer family): `import timm` costs
# seconds, and importing ratelab.models imports every family.


# ---- position embedding ----------------------------------------------------------------------------------------
def resample_pos_embed_bilinear(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    prefix_last: bool = False,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resample a (1, prefix + h*w, d) position table to ``new_grid``, the official CRATE-alpha way.

    Bilinear on corner-aligned grids (``align_corners=True``): the same numbers as the official
    ``scipy.ndimage.zoom(grid, zoom, order=1)``. Prefix rows ([CLS]) are kept as they are. The signature is the one
    :func:`ratelab.core.keymap.fit_pos_embed` calls.
    """
    n = num_prefix_tokens
    if prefix_last:
        grid, prefix = pos_embed[:, : pos_embed.shape[1] - n], pos_embed[:, pos_embed.shape[1] - n :]
    else:
        prefix, grid = pos_embed[:, :n], pos_embed[:, n:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer a square grid from {grid.shape[1]} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    d = grid.shape[-1]
    g = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=tuple(new_grid), mode="bilinear", align_corners=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([g, prefix], dim=1) if prefix_last else torch.cat([prefix, g], dim=1)


# ---- the ODL block: reference and fast path ---------------------------------------------------------------------
def odl_ref(
    x: torch.Tensor, D: torch.Tensor, D_hat: torch.Tensor, step: float, lambd: float, *, return_codes: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ODL block as the paper writes it: four products, op by op. (..., d) -> (..., d).

    On token rows (x = b^T): D^T b is ``x @ D``, D A is ``A @ D^T`` and D_hat A is ``A @ D_hat^T``.

    Args:
        x: normalized tokens b, (..., d).
        D: analysis dictionary, (d, C d).
        D_hat: synthesis dictionary, (d, C d) (D itself when not decoupled).
        step: eta.
        lambd: lambda.
        return_codes: also return the sparse codes A2 (..., C d).
    """
    a1 = F.relu(step * (x @ D) - step * lambd)  # A1 = ReLU(eta D^T b - eta lambda)
    residual = a1 @ D.t() - x  # D A1 - b
    a2 = F.relu(a1 - step * (residual @ D) - step * lambd)  # A2 = ReLU(A1 - eta D^T (D A1 - b) - eta lambda)
    out = a2 @ D_hat.t()  # D_hat A2
    return (out, a2) if return_codes else out


def _odl_forward(x2: torch.Tensor, D: torch.Tensor, D_hat: torch.Tensor, step: float, lambd: float):
    """The four products on (T, d) token rows with the scalars folded into the GEMMs and activations in place.

    Returns (out, A1, D A1 - b, A2); the middle two are what the backward needs besides the inputs and A2.
    """
    el = step * lambd
    # eta x D - eta lambda in one GEMM (alpha scales the product, the broadcast scalar is its beta term).
    a1 = torch.addmm(x2.new_full((), -el), x2, D, alpha=step).relu_()
    r = torch.addmm(x2, a1, D.t(), beta=-1)  # D A1 - b, the subtraction inside the GEMM
    a2 = torch.addmm(a1, r, D, alpha=-step).sub_(el).relu_()  # A1 - eta D^T r - eta lambda
    return torch.mm(a2, D_hat.t()), a1, r, a2


# Device types autocast knows; asking about another (the meta device) is an error, and nothing autocasts there.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "privateuseone")

_relu_grad = torch.ops.aten.threshold_backward  # grad * (out > 0) in one pass, what autograd's ReLU uses


class _ODLFunction(torch.autograd.Function):
    """Fused ODL on (T, d) rows with a hand-written backward: the eight products of the chain rule, accumulated in
    place (``addmm_``), with no intermediate beyond A1, D A1 - b and A2 kept. Returns (out, A2); A2 is not
    differentiable (the codes are for measurement). A backward with ``create_graph=True`` goes through the
    reference's graph instead, so second derivatives work (at the reference's cost)."""

    @staticmethod
    def forward(ctx, x2, D, D_hat, step, lambd):  # type: ignore[override]
        out, a1, r, a2 = _odl_forward(x2, D, D_hat, step, lambd)
        ctx.save_for_backward(x2, D, D_hat, a1, r, a2)
        ctx.step, ctx.lambd = step, lambd
        ctx.mark_non_differentiable(a2)
        return out, a2

    @staticmethod
    def backward(ctx, g_out, _g_codes):  # type: ignore[override]
        x2, D, D_hat, a1, r, a2 = ctx.saved_tensors
        eta = ctx.step
        need_x, need_d, need_dh = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, g_out, x2, D, D_hat)
        g_dh = torch.mm(g_out.t(), a2) if need_dh else None
        g_p2 = _relu_grad(torch.mm(g_out, D_hat), a2, 0)  # at A2's pre-activation
        if not (need_x or need_d):
            return None, None, g_dh, None, None
        g_r = torch.mm(g_p2, D.t())  # the gradient at r is -eta times this
        g_d = torch.mm(r.t(), g_p2).mul_(-eta) if need_d else None  # through D^T r
        g_a1 = g_p2.addmm_(g_r, D, alpha=-eta)  # direct term + through r = A1 D^T - b (g_p2 is not needed again)
        if need_d:
            g_d.addmm_(g_r.t(), a1, alpha=-eta)  # through A1 D^T
        g_p1 = _relu_grad(g_a1, a1, 0)
        if need_d:
            g_d.addmm_(x2.t(), g_p1, alpha=eta)  # through eta x D
        # -(gradient at r) + eta g_p1 D^T = eta (g_r + g_p1 D^T)
        g_x = torch.addmm(g_r, g_p1, D.t(), beta=eta, alpha=eta) if need_x else None
        return g_x, g_d, g_dh, None, None


def _differentiable_backward(ctx, g_out, x2, D, D_hat):
    # create_graph=True (a second derivative): the reference's autograd graph, rebuilt on the saved inputs. Views
    # keep the partial derivatives apart when D_hat is D itself (the tied ablation passes one tensor twice).
    leaves = [t.view_as(t) for t in (x2, D, D_hat)]
    out = odl_ref(*leaves, ctx.step, ctx.lambd)
    want = [t for t, need in zip(leaves, ctx.needs_input_grad[:3]) if need]
    got = iter(torch.autograd.grad(out, want, g_out, create_graph=True, allow_unused=True))
    return (*(next(got) if need else None for need in ctx.needs_input_grad[:3]), None, None)


def odl_fast(
    x: torch.Tensor, D: torch.Tensor, D_hat: torch.Tensor, step: float, lambd: float, *, return_codes: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same signature and result as :func:`odl_ref` (to rounding), computed by :class:`_ODLFunction`.

    The returned codes carry no gradient (the output does, to any order).
    """
    shape = x.shape
    dev = x.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        # Autocast does not reach a custom backward; cast once here and run the whole block in that dtype, as the
        # reference's products would run under autocast.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            out, a2 = _ODLFunction.apply(x.reshape(-1, shape[-1]).to(dt), D.to(dt), D_hat.to(dt), step, lambd)
    else:
        out, a2 = _ODLFunction.apply(x.reshape(-1, shape[-1]), D, D_hat, step, lambd)
    out = out.view(*shape[:-1], out.shape[-1])
    return (out, a2.view(*shape[:-1], a2.shape[-1])) if return_codes else out


class ODL(nn.Module):
    """Overcomplete dictionary learning step: two proximal steps from zero, then synthesis. (B, N, d) -> (B, N, d).

    ``D`` (and ``D_hat``) are stored as (d, C d), the official orientation of both upstream codes.

    Args:
        dim: token width d.
        expansion: C.
        step: eta.
        lambd: lambda.
        decoupled: own synthesis dictionary ``D_hat``; otherwise D synthesizes.

    Attributes:
        fused: fast path (default) or the four-product reference.
    """

    def __init__(self, dim: int, *, expansion: int = 4, step: float = 0.1, lambd: float = 0.1,
                 decoupled: bool = True) -> None:
        super().__init__()
        self.step = step
        self.lambd = lambd
        self.D = nn.Parameter(torch.empty(dim, expansion * dim))
        self.D_hat = nn.Parameter(torch.empty(dim, expansion * dim)) if decoupled else None
        self.fused = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Flax's kaiming_uniform on a (d, C d) kernel takes fan_in = d; for this shape PyTorch calls d the fan_out.
        nn.init.kaiming_uniform_(self.D, mode="fan_out")
        if self.D_hat is not None:
            nn.init.kaiming_uniform_(self.D_hat, mode="fan_out")

    def _synthesis(self) -> torch.Tensor:
        return self.D if self.D_hat is None else self.D_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = odl_fast if self.fused else odl_ref
        return fn(x, self.D, self._synthesis(), self.step, self.lambd)

    def forward_with_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(x), A2)``: the output and the (B, N, C d) sparse codes, from the same computation."""
        fn = odl_fast if self.fused else odl_ref
        return fn(x, self.D, self._synthesis(), self.step, self.lambd, return_codes=True)

    def extra_repr(self) -> str:
        d, cd = self.D.shape
        return f"dim={d}, codes={cd}, step={self.step}, lambd={self.lambd}, decoupled={self.D_hat is not None}"


# ---- layer and model ------------------------------------------------------------------------------------------
class CrateAlphaBlock(nn.Module):
    """z -> z_half + ODL(LN2(z_half)), z_half = z + MSSA(LN1(z)). (B, N, d) -> (B, N, d)."""

    def __init__(self, cfg: CrateAlphaConfig, *, drop_path: float = 0.0) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.residual = cfg.residual
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = MSSA(d, cfg.num_heads, cfg.head_dim, out_bias=False)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.odl = ODL(d, expansion=cfg.expansion, step=cfg.odl_step, lambd=cfg.odl_lambda, decoupled=cfg.decoupled)
        if drop_path > 0:
            from timm.layers import DropPath  # deferred: see _timm_note

            self.drop_path = DropPath(drop_path)  # stateless: no state-dict keys
        else:
            self.drop_path = nn.Identity()

    def _mix(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(a)

    def _sparsify(self, half: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return half + self.drop_path(out) if self.residual else out

    def forward(
        self, x: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> (B, N, d), and the (B, K, N, N) attention with ``return_attn`` (explicit softmax path)."""
        if return_attn:
            a, attn = self.attn(self.norm1(x), return_attn=True)
            half = self._mix(x, a)
            return self._sparsify(half, self.odl(self.norm2(half))), attn
        half = self._mix(x, self.attn(self.norm1(x)))
        return self._sparsify(half, self.odl(self.norm2(half)))

    def forward_quantities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same computation keeping ``proj`` U_k^T LN1(z) (B, K, N, p), ``half`` (B, N, d), ``codes`` A2
        (B, N, C d) and ``out``."""
        a = self.norm1(x)
        proj = self.attn.project(a)
        half = self._mix(x, self.attn(a))
        y, codes = self.odl.forward_with_codes(self.norm2(half))
        return {"out": self._sparsify(half, y), "half": half, "proj": proj, "codes": codes}


# Parameters whose Flax names end in "kernel": the only ones the official optimizer decays (wd_mults ".*/kernel$").
_DECAYED = re.compile(r"^(patch_embed\.proj\.weight|blocks\.\d+\.attn\.(qkv|proj)\.weight|head\.weight)$")


class CrateAlpha(nn.Module):
    """CRATE-alpha image classifier.

    Args:
        cfg: architecture (:class:`CrateAlphaConfig`).
        img_size: construction input size (position-embedding grid); other sizes are resampled on the fly.
        in_chans: input channels.
        num_classes: head width; 0 gives an identity head (features only).
        drop_path_rate: stochastic depth of the last layer (linear from 0 over depth, as the JAX code; 0 in every
            released config).

    Attributes:
        num_prefix_tokens: 1 ([CLS], first).
        layer_measures: the measures of :mod:`ratelab.analysis.layer_rates` this family supports (from
            :meth:`forward_layer_quantities`; the sparsity one counts zeros of the codes A2, not of the output).
    """

    num_prefix_tokens = 1
    layer_measures = ("compression", "compression_half", "sparsity")

    def __init__(self, cfg: CrateAlphaConfig, *, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={cfg.patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        from timm.layers import PatchEmbed  # deferred: see _timm_note

        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = d = cfg.embed_dim
        self.grid_size = (img_size // cfg.patch_size, img_size // cfg.patch_size)
        # img_size=None: timm's PatchEmbed then accepts any input size (the position table is resampled instead).
        self.patch_embed = PatchEmbed(None, cfg.patch_size, in_chans, d)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, self.grid_size[0] * self.grid_size[1] + 1, d))
        rates = [drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # np.linspace(0, rate, L)
        self.blocks = nn.ModuleList(CrateAlphaBlock(cfg, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self) -> None:
        """The JAX training code's initializers (module docstring); D and D_hat are set by :class:`ODL`."""
        nn.init.kaiming_uniform_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            nn.init.normal_(blk.attn.proj.weight, std=0.02)
        self._init_head()

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ---- configuration switches ---------------------------------------------------------------------------
    def set_attn_backend(self, backend: str) -> None:
        """``"auto"``/``"sdpa"`` (fast) or ``"ref"`` (explicit softmax) for every MSSA block."""
        for blk in self.blocks:
            blk.attn.attn_backend = backend

    def set_fused_odl(self, fused: bool) -> None:
        """Fused ODL (default) or the four-product reference."""
        for blk in self.blocks:
            blk.odl.fused = fused

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Every parameter but the kernels (stem conv, MSSA projections, head weight): the official optimizer decays
        only Flax params named "kernel", so D, D_hat, [CLS], the position table, norms and biases are exempt."""
        return {n for n, _ in self.named_parameters() if not _DECAYED.match(n)}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_head()

    # ---- forward ------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resample_pos_embed_bilinear(self.pos_embed, grid, num_prefix_tokens=1, old_grid=self.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + H/p * W/p, d) tokens with [CLS] first and position embeddings added."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        p = self.cfg.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by patch_size={p}")
        t = self.patch_embed(x)  # (B, h*w, d), row-major patches
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self._pos_embed((x.shape[2] // p, x.shape[3] // p))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N + 1, d) output tokens of the last layer, before the final norm."""
        x = self.embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N + 1, d) tokens -> (B, num_classes) logits, or the (B, d) normalized [CLS] token."""
        x = self.norm(x[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _run_block(self, blk: CrateAlphaBlock, z: torch.Tensor) -> torch.Tensor:
        return checkpoint(blk, z, use_reentrant=False) if self.grad_checkpointing and self.training else blk(z)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        return_attn: bool = False,
        return_prefix_tokens: bool = False,
    ) -> Any:
        """Layer outputs without hooks, timm's convention (docs/models.md, "Model API").

        Args:
            x: (B, C, H, W) images.
            indices: layers to keep: ``None`` all, an int n the last n, a list those (negative from the end).
            norm: apply the final LayerNorm (``norm``) to each kept layer's tokens.
            output_fmt: ``"NLC"`` (B, h*w, d) patch tokens or ``"NCHW"`` (B, d, h, w) maps; [CLS] is split off
                either way (timm's rule), see ``return_prefix_tokens``.
            intermediates_only: return only the intermediates (and the attention maps with ``return_attn``).
            return_attn: also return each kept layer's (B, K, N+1, N+1) MSSA attention ([CLS] is row/column 0),
                computed on the explicit-softmax path (``final`` then equals ``forward_features`` to rounding).
            return_prefix_tokens: each intermediate becomes ``(patch tokens, (B, 1, d) [CLS] token)``.

        Returns:
            ``(final, intermediates)``, ``(final, intermediates, attn)`` with ``return_attn``, or the list alone with
            ``intermediates_only``. ``final`` (B, N+1, d) is what :meth:`forward_features` returns.

        Raises:
            ValueError: out-of-range ``indices`` (the message gives the valid range) or another ``output_fmt``.
        """
        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices)
        p = self.cfg.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        z, inter, attn = collect_intermediates(
            self.embed(x), self.blocks, take, self._run_block, norm=self.norm if norm else None,
            output_fmt=output_fmt, grid=grid, return_attn=return_attn, return_prefix_tokens=return_prefix_tokens)
        return pack_intermediates(z, inter, attn, intermediates_only=intermediates_only)

    def forward_layer_quantities(self, x: torch.Tensor, indices: int | list[int] | None = None) -> dict[str, Any]:
        """The white-box quantities of each kept layer l, for the rate measures.

        Args:
            x: (B, C, H, W) images.
            indices: layers to keep, as in :meth:`forward_intermediates`.

        Returns:
            dict with ``indices`` (kept layers, forward order), ``features`` (B, N+1, d) = :meth:`forward_features`,
            and lists over the kept layers, all N+1 tokens ([CLS] first): ``proj`` (B, K, N+1, p) =
            U_k^T LN1_l(Z^l); ``half`` (B, N+1, d) = Z^{l+1/2}; ``tokens`` (B, N+1, d) = Z^{l+1}, the layer output;
            ``codes`` (B, N+1, C d) = the sparse codes A2 of the ODL step, whose zeros "sparsity" counts (the output
            itself is a dense residual sum).
        """
        take = resolve_indices(len(self.blocks), indices)
        res: dict[str, Any] = {"indices": take, "tokens": [], "half": [], "proj": [], "codes": []}
        z = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if i in take:
                out = blk.forward_quantities(z)
                z = out["out"]
                res["tokens"].append(z)
                for key in ("half", "proj", "codes"):
                    res[key].append(out[key])
            else:
                z = self._run_block(blk, z)
        res["features"] = z
        return res

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: CrateAlpha) -> dict[str, torch.Tensor]:
        from ratelab.models.crate_alpha.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)


def _create(variant: str, **kwargs: Any) -> CrateAlpha:
    return build_model_with_cfg(CrateAlpha, CrateAlphaConfig, CRATE_ALPHA_VARIANTS[variant], **kwargs)


@register_model
def crate_alpha_tiny_patch16_224(**kwargs: Any) -> CrateAlpha:
    return _create("tiny", **{"patch_size": 16, **kwargs})


@register_model
def crate_alpha_small_patch16_224(**kwargs: Any) -> CrateAlpha:
    return _create("small", **{"patch_size": 16, **kwargs})


@register_model
def crate_alpha_base_patch32_224(**kwargs: Any) -> CrateAlpha:
    return _create("base", **{"patch_size": 32, **kwargs})


@register_model
def crate_alpha_base_patch16_224(**kwargs: Any) -> CrateAlpha:
    return _create("base", **{"patch_size": 16, **kwargs})


@register_model
def crate_alpha_base_patch8_224(**kwargs: Any) -> CrateAlpha:
    return _create("base", **{"patch_size": 8, **kwargs})


@register_model
def crate_alpha_large_patch32_224(**kwargs: Any) -> CrateAlpha:
    return _create("large", **{"patch_size": 32, **kwargs})


@register_model
def crate_alpha_large_patch14_224(**kwargs: Any) -> CrateAlpha:
    return _create("large", **{"patch_size": 14, **kwargs})


@register_model
def crate_alpha_large_patch8_224(**kwargs: Any) -> CrateAlpha:
    return _create("large", **{"patch_size": 8, **kwargs})


@register_model
def crate_alpha_huge_patch14_224(**kwargs: Any) -> CrateAlpha:
    return _create("huge", **{"patch_size": 14, **kwargs})


def _small(variant: str, img_size: int, in_chans: int, kwargs: dict[str, Any]) -> CrateAlpha:
    kwargs.setdefault("img_size", img_size)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", in_chans)
    return _create(variant, **kwargs)


@register_model
def crate_alpha_nano_patch4_16(**kwargs: Any) -> CrateAlpha:
    """6 x 128 CRATE-alpha for 16x16 inputs (the shape of crate_nano_patch4_16)."""
    return _small("nano", 16, 1, kwargs)


@register_model
def crate_alpha_pico_patch4_16(**kwargs: Any) -> CrateAlpha:
    """4 x 64 CRATE-alpha for 16x16 inputs."""
    return _small("pico", 16, 1, kwargs)


@register_model
def test_crate_alpha(**kwargs: Any) -> CrateAlpha:
    """2 x 32 CRATE-alpha on 8x8 RGB inputs, for unit tests."""
    return _small("test", 8, 3, kwargs)


__all__ = ["ODL", "CrateAlpha", "CrateAlphaBlock", "CrateAlphaConfig", "odl_fast", "odl_ref",
           "resample_pos_embed_bilinear"]
