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

Model API (docs/models.md, "Model API"): ``forward_features`` / ``forward_head`` / ``forward_intermediates`` as timm.
The white-box quantities the analysis code measures -- U_k^T LN1(Z^l) per head, the half step Z^{l+1/2} and the
sparse codes Z^{l+1} -- come from ONE method, :meth:`Crate.forward_layer_quantities`; ``layer_measures`` names the
measures of :mod:`ratelab.analysis.layer_rates` they support. MSSA and ISTA live in ``ratelab.layers`` (CRATE-alpha
and CRATE-MAE reuse them); the stem stays here (timm's ``PatchEmbed`` is a conv with other key names).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.layers.attention import SelfAttention
from ratelab.layers.intermediates import (
    check_output_fmt,
    collect_intermediates,
    pack_intermediates,
    resolve_indices,
)
from ratelab.layers.ista import ISTA
from ratelab.layers.mssa import MSSA
from ratelab.layers.patch import patchify, resample_pos_embed
from ratelab.models.crate.config import CRATE_VARIANTS, CrateConfig


class Mlp(nn.Module):
    """A ViT feed-forward, fc1 -> GELU -> fc2 (timm's key names). (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrateBlock(nn.Module):
    """z -> ISTA(LN2(z + MSSA(LN1(z)))). (B, N, d) -> (B, N, d).

    The Table 2 ablation switches (``cfg.attn``, ``cfg.mlp``) swap either half: ``attn="mhsa"`` puts a ViT
    attention (separate Q, K, V, ``qkv_bias`` as in ViT) where MSSA was; ``mlp="mlp"`` replaces the ISTA step by
    ``z_half + MLP(LN2(z_half))`` (ISTA has no skip; the MLP keeps the ViT residual). The defaults build the CRATE
    layer with its original module names (``attn``, ``ista``), so checkpoints are unchanged.
    """

    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d)
        if cfg.attn == "mssa":
            self.attn: MSSA | SelfAttention = MSSA(d, cfg.num_heads, cfg.head_dim, out_bias=True)
        else:
            self.attn = SelfAttention(d, cfg.num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(d)
        if cfg.mlp == "ista":
            self.ista = ISTA(d, step=cfg.ista_step, lambd=cfg.ista_lambda)
        else:
            self.mlp = Mlp(d, round(cfg.mlp_ratio * d))
        self.subspace_attn = cfg.attn == "mssa"
        self.sparse_codes = cfg.mlp == "ista"

    def _second_half(self, half: torch.Tensor) -> torch.Tensor:
        if self.sparse_codes:
            return self.ista(self.norm2(half))
        return half + self.mlp(self.norm2(half))

    def forward(
        self, x: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> (B, N, d), and the (B, K, N, N) attention with ``return_attn`` (explicit softmax path)."""
        if return_attn:
            a, attn = self.attn(self.norm1(x), return_attn=True)
            return self._second_half(x + a), attn
        return self._second_half(x + self.attn(self.norm1(x)))

    def forward_quantities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same computation keeping ``half`` z + attention (B, N, d) and ``out``, plus ``proj`` U_k^T LN1(z)
        (B, K, N, p) for MSSA or ``keys`` (B, K, N, p) for MHSA (the features §3.4 of arXiv 2308.16271 uses for a
        ViT)."""
        a = self.norm1(x)
        res: dict[str, torch.Tensor] = {}
        if self.subspace_attn:
            res["proj"] = self.attn.project(a)
        else:
            B, N, d = a.shape
            K = self.attn.num_heads
            res["keys"] = self.attn.qkv(a).reshape(B, N, 3, K, d // K)[:, :, 1].transpose(1, 2)
        half = x + self.attn(a)
        res.update(out=self._second_half(half), half=half)
        return res


class Crate(nn.Module):
    """CRATE image classifier.

    Args:
        cfg: architecture (:class:`CrateConfig`).
        img_size: construction input size (position-embedding grid); other sizes are resampled on the fly.
        in_chans: input channels.
        num_classes: head width; 0 gives an identity head (features only).

    Attributes:
        num_prefix_tokens: 1 ([CLS], first).
        layer_measures: the per-layer measures of :mod:`ratelab.analysis.layer_rates` this model supports (from
            :meth:`forward_layer_quantities`), per instance: the compression measures need the subspace projections
            U_k of MSSA (absent with ``attn="mhsa"``: a ViT's Q, K, V are not one subspace basis, so the coding rate
            of any one of them is not the objective the layer descends); sparsity needs the ISTA codes (absent with
            ``mlp="mlp"``: a GELU MLP with a skip makes no exact zeros, so the measure would read 0 and mislead).
        model_args: set by the entry points (see :func:`ratelab.core.builder.build_model_with_cfg`).
    """

    num_prefix_tokens = 1
    layer_measures = ("compression", "compression_half", "sparsity")

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
        self.layer_measures = (("compression", "compression_half") if cfg.attn == "mssa" else ()) + (
            ("sparsity",) if cfg.mlp == "ista" else ())

    # ---- configuration switches ---------------------------------------------------------------------------
    def set_attn_backend(self, backend: str) -> None:
        """``"auto"``/``"sdpa"`` (fast) or ``"ref"`` (explicit softmax) for every attention block (MSSA or MHSA)."""
        for blk in self.blocks:
            blk.attn.attn_backend = backend

    def set_fused_ista(self, fused: bool) -> None:
        """Two-matmul fused ISTA (default) or the paper's three-matmul reference form (no-op for ``mlp="mlp"``)."""
        for blk in self.blocks:
            if blk.sparse_codes:
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
            x = self._run_block(blk, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N + 1, d) tokens -> (B, num_classes) logits, or the (B, d) normalized pooled feature."""
        x = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _run_block(self, blk: CrateBlock, z: torch.Tensor) -> torch.Tensor:
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
            norm: apply the final norm (``fc_norm``, the head's LayerNorm) to each kept layer's tokens.
            output_fmt: ``"NLC"`` (B, h*w, d) patch tokens or ``"NCHW"`` (B, d, h, w) maps; [CLS] is split off
                either way (timm's rule), see ``return_prefix_tokens``.
            intermediates_only: return only the intermediates (and the attention maps with ``return_attn``).
            return_attn: also return each kept layer's (B, K, N+1, N+1) attention, MSSA or MHSA ([CLS] is row/column 0),
                computed on the explicit-softmax path (so ``final`` then equals ``forward_features`` to rounding).
            return_prefix_tokens: each intermediate becomes ``(patch tokens, (B, 1, d) [CLS] token)``.

        Returns:
            ``(final, intermediates)``, ``(final, intermediates, attn)`` with ``return_attn``, or the list alone with
            ``intermediates_only``. ``final`` (B, N+1, d) is what :meth:`forward_features` returns (no norm).

        Raises:
            ValueError: out-of-range ``indices`` (the message gives the valid range) or another ``output_fmt``.

        The subspace projections U_k^T z and the ISTA half step are not here: see :meth:`forward_layer_quantities`.
        """
        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices)
        p = self.cfg.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        z, inter, attn = collect_intermediates(
            self.embed(x), self.blocks, take, self._run_block, norm=self.fc_norm if norm else None,
            output_fmt=output_fmt, grid=grid, return_attn=return_attn, return_prefix_tokens=return_prefix_tokens)
        return pack_intermediates(z, inter, attn, intermediates_only=intermediates_only)

    def forward_layer_quantities(self, x: torch.Tensor, indices: int | list[int] | None = None) -> dict[str, Any]:
        """The white-box quantities of each kept layer l, for the rate measures (and MaskCut-style affinities).

        Args:
            x: (B, C, H, W) images.
            indices: layers to keep, as in :meth:`forward_intermediates`.

        Returns:
            dict with ``indices`` (kept layers, forward order), ``features`` (B, N+1, d) = :meth:`forward_features`,
            and lists over the kept layers, all N+1 tokens ([CLS] first): ``proj`` (B, K, N+1, p) =
            U_k^T LN1_l(Z^l) (MSSA only; with ``attn="mhsa"`` the key features ``keys`` (B, K, N+1, p) instead);
            ``half`` (B, N+1, d) = Z^{l+1/2} = Z^l + attention(LN1_l(Z^l)); ``tokens`` (B, N+1, d) = Z^{l+1}, the
            layer output; ``codes`` = the sparse codes whose zeros "sparsity" counts (the ISTA output, the same
            tensors as ``tokens``; absent with ``mlp="mlp"``, whose output is not a sparse code).
        """
        take = resolve_indices(len(self.blocks), indices)
        side = "proj" if self.cfg.attn == "mssa" else "keys"
        res: dict[str, Any] = {"indices": take, "tokens": [], "half": [], side: []}
        z = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if i in take:
                out = blk.forward_quantities(z)
                z = out["out"]
                res["tokens"].append(z)
                res["half"].append(out["half"])
                res[side].append(out[side])
            else:
                z = self._run_block(blk, z)
        if self.cfg.mlp == "ista":
            res["codes"] = res["tokens"]
        res["features"] = z
        return res

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: Crate) -> dict[str, torch.Tensor]:
        from ratelab.models.crate.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)


def _create_crate(variant: str, **kwargs: Any) -> Crate:
    return build_model_with_cfg(Crate, CrateConfig, CRATE_VARIANTS[variant], **kwargs)


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


def _create_ablation(variant: str, defaults: dict[str, Any], **kwargs: Any) -> Crate:
    # defaults first: model_args (which name attn and mlp) must rebuild the same model through this entry point
    return _create_crate(variant, **{**defaults, **kwargs})


_PICO_16 = {"img_size": 16, "num_classes": 10, "in_chans": 1}
_MLP = {"attn": "mssa", "mlp": "mlp"}
_MHSA = {"attn": "mhsa", "mlp": "ista"}


# The segmentation paper's Table 2 ablation (arXiv 2308.16271): CRATE-MLP = MSSA + MLP, CRATE-MHSA = MHSA + ISTA.
# Its S/8 widths (d = 384, K = 6) are ratelab's "tiny" at patch 8.
@register_model
def crate_mlp_pico_patch4_16(**kwargs: Any) -> Crate:
    """CRATE-MLP (MSSA + ViT MLP), 4 x 64, for 16x16 inputs."""
    return _create_ablation("pico", {**_PICO_16, **_MLP}, **kwargs)


@register_model
def crate_mhsa_pico_patch4_16(**kwargs: Any) -> Crate:
    """CRATE-MHSA (ViT attention + ISTA), 4 x 64, for 16x16 inputs."""
    return _create_ablation("pico", {**_PICO_16, **_MHSA}, **kwargs)


@register_model
def crate_mlp_tiny_patch16_224(**kwargs: Any) -> Crate:
    return _create_ablation("tiny", {"patch_size": 16, **_MLP}, **kwargs)


@register_model
def crate_mhsa_tiny_patch16_224(**kwargs: Any) -> Crate:
    return _create_ablation("tiny", {"patch_size": 16, **_MHSA}, **kwargs)


@register_model
def crate_mlp_tiny_patch8_224(**kwargs: Any) -> Crate:
    """CRATE-MLP at the widths of the paper's S/8 (d = 384, K = 6)."""
    return _create_ablation("tiny", {"patch_size": 8, **_MLP}, **kwargs)


@register_model
def crate_mhsa_tiny_patch8_224(**kwargs: Any) -> Crate:
    """CRATE-MHSA at the widths of the paper's S/8 (d = 384, K = 6)."""
    return _create_ablation("tiny", {"patch_size": 8, **_MHSA}, **kwargs)


@register_model
def crate_mlp_small_patch16_224(**kwargs: Any) -> Crate:
    return _create_ablation("small", {"patch_size": 16, **_MLP}, **kwargs)


@register_model
def crate_mhsa_small_patch16_224(**kwargs: Any) -> Crate:
    return _create_ablation("small", {"patch_size": 16, **_MHSA}, **kwargs)


@register_model
def test_crate(**kwargs: Any) -> Crate:
    """2 x 32 CRATE on 8x8 inputs, for unit tests."""
    kwargs.setdefault("img_size", 8)
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("in_chans", 3)
    return _create_crate("test", **kwargs)


__all__ = ["Crate", "CrateBlock", "CrateConfig", "ISTA", "MSSA", "Mlp", "SelfAttention"]
