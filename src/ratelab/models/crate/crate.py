"""CRATE: Coding RAte reduction TransformEr (white-box transformer), as the official code computes it.

Papers: Yu et al., "White-Box Transformers via Sparse Rate Reduction", NeurIPS 2023 (arXiv 2306.01129), and the
long version "White-Box Transformers via Sparse Rate Reduction: Compression Is All There Is?" (arXiv 2311.13110).
Official code: Ma-Lab-Berkeley/CRATE ``model/crate.py`` (this file is an independent re-implementation; key names
differ and are mapped in ``convert.py``).

One layer on row-major tokens z (B, N, d):

    a      = LN1(z)
    w_k    = a U_k                                    one bias-free projection, used as query = key = value
    MSSA   = concat_k(softmax(w_k w_k^T / sqrt(p)) w_k) W_out^T + b_out
    z_half = z + MSSA                                 residual adds the un-normalized z
    b      = LN2(z_half)
    z_next = ReLU(b + eta D^T (b - D b) - eta lambda) one non-negative ISTA step, no skip around it

Stem: patchify (channels last within a patch) -> LN -> Linear -> LN; [CLS] prepended; learned position embedding.
Head: LN -> Linear on the [CLS] token.

Deviations from the paper's equations, all shared with the official code (so released checkpoints load):
  * the MSSA output map W_out is a free Linear with bias, not tied to U (official issues #18, #31);
  * the skip factor (1 - kappa p / (n eps^2)) is dropped and the step size is absorbed into W_out;
  * U and D are not constrained to be orthogonal;
  * the softmax temperature is 1/sqrt(p).
Deviations from the official code: ISTA is computed with fewer products (same math, other rounding): with more
tokens than channels as ReLU(b + b M - eta lambda), M = eta (D - D^T D) formed once (one token product), otherwise
as b + eta D^T(b - D b) (two); the reference twin keeps the three-matmul form and tests check equality.
Position embeddings are resampled (bicubic) when the input size differs from the construction size (the official
code slices the table instead). ``pool="mean"`` averages patch tokens only (the official code includes [CLS]).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ratelab.core.registry import register_model
from ratelab.kernels.attention import attention
from ratelab.layers.patch import patchify, resample_pos_embed
from ratelab.models.crate.config import CRATE_VARIANTS, CrateConfig


class MSSA(nn.Module):
    """Multi-head subspace self-attention. (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, out_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, num_heads * head_dim, bias=False)  # U = [U_1 .. U_K]^T, shared q = k = v
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias)
        self.attn_backend = "auto"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """U_k^T z for every head: (B, N, d) -> (B, K, N, p)."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.project(x)
        if return_attn:
            out, attn = attention(w, w, w, scale=self.scale, return_weights=True)
        else:
            out = attention(w, w, w, scale=self.scale, backend=self.attn_backend)
        B, K, N, p = out.shape
        out = self.proj(out.transpose(1, 2).reshape(B, N, K * p))
        return (out, w, attn) if return_attn else out


class ISTA(nn.Module):
    """One non-negative ISTA step against a square dictionary D (d x d). (B, N, d) -> (B, N, d).

    ``weight`` holds D in ``F.linear`` orientation, so ``F.linear(x, D)`` is D x for each token row x (this is also
    the official layout, no transpose on conversion).
    """

    def __init__(self, dim: int, *, step: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.step = step
        self.lambd = lambd
        self.fused = True
        nn.init.kaiming_uniform_(self.weight)  # official init: PyTorch defaults (a=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.forward_ref(x)
        d = self.weight.shape[0]
        # Folding costs O(d^3) once per call and saves one (tokens x d x d) product, forward and backward: it pays
        # once there are more tokens than channels (any training batch); tiny batches keep the two-product form.
        if x.numel() >= d * d:
            return self.forward_folded(x)
        return self.forward_two_matmul(x)

    def forward_two_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """b + eta D^T (b - D b): residual b - Db first, then one product with D^T (row form: r @ D)."""
        r = x - F.linear(x, self.weight)
        return F.relu(x + self.step * torch.matmul(r, self.weight) - self.step * self.lambd)

    def forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(b + eta (D^T - D^T D) b - eta lambda) with the d x d operator formed first: one product per token.

        Row form: x + x M with M = eta (D - D^T D) (the transpose of eta (D^T - D^T D), since D^T D is symmetric).
        ``addmm`` adds the identity term inside the GEMM, so it is not rounded into M.
        """
        W = self.weight
        M = torch.addmm(W, W.t(), W, beta=self.step, alpha=-self.step)  # eta W - eta W^T W
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(x2, x2, M).sub_(self.step * self.lambd)
        return F.relu(y).view(x.shape)

    def forward_ref(self, x: torch.Tensor) -> torch.Tensor:
        """Three-matmul form, as in the paper's equation: b + eta (D^T b - D^T D b) - eta lambda."""
        Db = F.linear(x, self.weight)
        DtDb = F.linear(Db, self.weight.t())
        Dtb = F.linear(x, self.weight.t())
        return F.relu(x + self.step * (Dtb - DtDb) - self.step * self.lambd)


class CrateBlock(nn.Module):
    """z -> ISTA(LN2(z + MSSA(LN1(z)))). (B, N, d) -> (B, N, d)."""

    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d)
        self.attn = MSSA(d, cfg.num_heads, cfg.head_dim, out_bias=True)
        self.norm2 = nn.LayerNorm(d)
        self.ista = ISTA(d, step=cfg.ista_step, lambd=cfg.ista_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return self.ista(self.norm2(x))

    def forward_verbose(self, x: torch.Tensor, *, return_attn: bool) -> dict[str, torch.Tensor]:
        """Same computation, keeping the intermediates the analysis code measures."""
        a = self.norm1(x)
        if return_attn:
            mssa, proj, attn = self.attn(a, return_attn=True)
        else:
            proj = self.attn.project(a)
            mssa, attn = self.attn(a), None
        half = x + mssa
        out = self.ista(self.norm2(half))
        res = {"out": out, "half": half, "proj": proj}
        if attn is not None:
            res["attn"] = attn
        return res


class Crate(nn.Module):
    """CRATE image classifier.

    Args:
        cfg: architecture (:class:`CrateConfig`).
        img_size: construction input size (position-embedding grid); other sizes are resampled on the fly.
        in_chans: input channels.
        num_classes: head width; 0 gives an identity head (features only).
    """

    num_prefix_tokens = 1

    def __init__(self, cfg: CrateConfig, *, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={cfg.patch_size}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = d = cfg.embed_dim
        self.grid_size = (img_size // cfg.patch_size, img_size // cfg.patch_size)
        patch_dim = in_chans * cfg.patch_size**2
        self.patch_norm = nn.LayerNorm(patch_dim)
        self.patch_proj = nn.Linear(patch_dim, d)
        self.patch_post_norm = nn.LayerNorm(d)
        n_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))  # official init: standard normal
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, d))
        self.blocks = nn.ModuleList([CrateBlock(cfg) for _ in range(cfg.depth)])
        self.fc_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False

    # ---- configuration switches ---------------------------------------------------------------------------
    def set_attn_backend(self, backend: str) -> None:
        """``"auto"``/``"sdpa"`` (fast) or ``"ref"`` (explicit softmax) for every MSSA block."""
        for blk in self.blocks:
            blk.attn.attn_backend = backend

    def set_fused_ista(self, fused: bool) -> None:
        """Two-matmul fused ISTA (default) or the paper's three-matmul reference form."""
        for blk in self.blocks:
            blk.ista.fused = fused

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^pos_embed|^patch_", "blocks": r"^blocks\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ---- forward ------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, num_prefix_tokens=1, old_grid=self.grid_size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + H/p * W/p, d) tokens with [CLS] first and position embeddings added."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        p = self.cfg.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        t = self.patch_post_norm(self.patch_proj(self.patch_norm(patchify(x, p))))
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self._pos_embed(grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N + 1, d) output tokens of the last layer."""
        x = self.embed(x)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N + 1, d) tokens -> (B, num_classes) logits, or the (B, d) normalized pooled feature."""
        x = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        return_attn: bool = False,
    ) -> dict[str, Any]:
        """Per-layer quantities without hooks.

        Args:
            x: (B, C, H, W) images.
            indices: layers to keep (list of indices, negative allowed) or an int n for the last n; all by default.
            return_attn: also return attention maps (computed on the explicit reference path).

        Returns:
            dict with ``features`` (B, N+1, d) last-layer tokens, ``indices`` (the kept layers) and lists over the
            kept layers of ``tokens`` (layer outputs = ISTA outputs, (B, N+1, d)), ``half`` (z + MSSA(LN z),
            (B, N+1, d)), ``proj`` (U_k^T LN1(z), (B, K, N+1, p)) and, with ``return_attn``, ``attn``
            (B, K, N+1, N+1).
        """
        depth = len(self.blocks)
        if indices is None:
            keep = list(range(depth))
        elif isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: asks for the last n layers, n must be in 1..{depth}")
            keep = list(range(depth - indices, depth))
        else:
            bad = [i for i in indices if not -depth <= i < depth]
            if bad:
                raise ValueError(f"indices {bad} out of range for a {depth}-layer model (use -{depth}..{depth - 1})")
            keep = sorted({i % depth for i in indices})
        res: dict[str, Any] = {"indices": keep, "tokens": [], "half": [], "proj": []}
        if return_attn:
            res["attn"] = []
        z = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if i in keep:
                out = blk.forward_verbose(z, return_attn=return_attn)
                z = out["out"]
                res["tokens"].append(z)
                res["half"].append(out["half"])
                res["proj"].append(out["proj"])
                if return_attn:
                    res["attn"].append(out["attn"])
            else:
                z = blk(z)
        res["features"] = z
        return res

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: Crate) -> dict[str, torch.Tensor]:
        from ratelab.models.crate.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)


def _create_crate(variant: str, patch_size: int | None = None, **kwargs: Any) -> Crate:
    cfg = CRATE_VARIANTS[variant]
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in CrateConfig.__dataclass_fields__}
    if patch_size is not None:
        overrides["patch_size"] = patch_size
    derived_head_dim = cfg.head_dim == cfg.embed_dim // cfg.num_heads
    if derived_head_dim and "head_dim" not in overrides and {"embed_dim", "num_heads"} & set(overrides):
        # The variant's head_dim was derived as embed_dim // num_heads; re-derive it for the new width/heads
        # instead of carrying the old value over (replace() copies every field).
        overrides["head_dim"] = None
    cfg = replace(cfg, **overrides)
    return Crate(cfg, **kwargs)


@register_model
def crate_tiny_patch16_224(**kwargs: Any) -> Crate:
    return _create_crate("tiny", **{"patch_size": 16, **kwargs})


@register_model
def crate_small_patch16_224(**kwargs: Any) -> Crate:
    return _create_crate("small", **{"patch_size": 16, **kwargs})


@register_model
def crate_base_patch16_224(**kwargs: Any) -> Crate:
    return _create_crate("base", **{"patch_size": 16, **kwargs})


@register_model
def crate_large_patch16_224(**kwargs: Any) -> Crate:
    return _create_crate("large", **{"patch_size": 16, **kwargs})


@register_model
def crate_tiny_patch8_224(**kwargs: Any) -> Crate:
    return _create_crate("tiny", **{"patch_size": 8, **kwargs})


@register_model
def crate_small_patch8_224(**kwargs: Any) -> Crate:
    return _create_crate("small", **{"patch_size": 8, **kwargs})


@register_model
def crate_base_patch8_224(**kwargs: Any) -> Crate:
    return _create_crate("base", **{"patch_size": 8, **kwargs})


@register_model
def crate_large_patch8_224(**kwargs: Any) -> Crate:
    return _create_crate("large", **{"patch_size": 8, **kwargs})


@register_model
def crate_nano_patch4_16(**kwargs: Any) -> Crate:
    """6 x 128 CRATE for 16x16 inputs (digits demo)."""
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 1)
    return _create_crate("nano", **kwargs)


@register_model
def crate_pico_patch4_16(**kwargs: Any) -> Crate:
    """4 x 64 CRATE for 16x16 inputs."""
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 1)
    return _create_crate("pico", **kwargs)


@register_model
def test_crate(**kwargs: Any) -> Crate:
    """2 x 32 CRATE on 8x8 inputs, for unit tests."""
    kwargs.setdefault("img_size", 8)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 3)
    return _create_crate("test", **kwargs)


__all__ = ["Crate", "CrateBlock", "CrateConfig", "ISTA", "MSSA"]
