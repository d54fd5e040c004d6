"""ViT-MAE: FAIR's masked autoencoder with a ViT encoder and decoder, the baseline CRATE-MAE is measured against.

Paper: He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv
2111.06377). Reference code: facebookresearch/mae ``models_mae.py`` (``MaskedAutoencoderViT``), whose parameter
names this model uses unchanged, so its checkpoints (``{"model": state_dict}``) load as they are. CRATE-MAE's
comparison builds the same class with timm's ``Block`` defaults and a decoder as wide as the encoder
(Ma-Lab-Berkeley/CRATE ``model/crate_ae/crate_ae.py``, ``mae_vit_base``): ``mae_vit_base_patch16_224``, 143.8M
parameters against CRATE-MAE-B's 44.6M. Independent re-implementation; the blocks are timm's ``Block``.

    x      = Conv_p(imgs) + P[1:]                  P: fixed 2-D sin-cos table, zero row for [CLS]
    keep   = argsort(noise)[:, :int(N (1 - r))]    the masked patches are DROPPED before the encoder
    latent = LN(ViT blocks([cls + P[0]; x[keep]]))                     (B, 1 + len_keep, d)
    y      = decoder_embed(latent); mask tokens appended, unshuffled with ids_restore; + P_dec
    pred   = Linear(LN(ViT blocks(y)))[:, 1:]                          (B, N, p^2 C)

Loss: per-patch MSE over masked patches (``norm_pix_loss``: per-patch standardized targets), as MAE.

Deviations from the reference code (none changes what a checkpoint computes): every LayerNorm has eps 1e-6 (MAE
passes that norm to its blocks; CRATE's comparison code leaves timm's default, which is 1e-6 in current timm);
``patchify``/``unpatchify`` work for any channel count; another input size gets the sin-cos tables of its own grid;
``forward`` refuses a ``mask_ratio`` that masks no patch; ``no_weight_decay`` lists the tokens and tables (MAE's
optimizer rule decays the tokens). No classifier: ``num_classes`` is ``None``; ``forward_features`` is the encoder's
latent of the unmasked image after its final norm. ``forward_intermediates(..., return_attn=True)`` recomputes each
kept block's softmax(q k^T / sqrt(h)) from its own ``qkv`` (timm's fused attention does not return it); the
block's output is its own. There are no white-box layer quantities (``layer_measures`` is empty).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn as nn

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices, split_tokens
from ratelab.models.crate_mae import mae
from ratelab.models.crate_mae.crate_mae import no_classifier
from ratelab.models.mae_vit.config import MAE_VIT_VARIANTS, MaeVitConfig


def block_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (B, H, N, N) attention weights of a timm ``Block`` on its input tokens x (B, N, D)."""
    a = blk.attn
    B, N, _ = x.shape
    qkv = a.qkv(blk.norm1(x)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    return ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class MaeVit(mae.MaskedAutoencoderMixin, nn.Module):
    """ViT masked autoencoder (see the module docstring).

    Args:
        cfg: architecture (:class:`MaeVitConfig`).
        img_size: construction input size (grid of the fixed position tables).
        in_chans: input channels.
        num_classes: ``None`` (or 0): there is no classifier; anything else is a ``ConfigError``.
        norm_pix_loss: regress per-patch standardized pixels.

    Attributes:
        num_prefix_tokens: 1 ([CLS], first).
        layer_measures: empty (a ViT has no subspace projections or sparse codes).
    """

    num_prefix_tokens = 1
    layer_measures: tuple[str, ...] = ()

    def __init__(self, cfg: MaeVitConfig, *, img_size: int = 224, in_chans: int = 3, num_classes: int | None = None,
                 norm_pix_loss: bool = False) -> None:
        # deferred: `import timm` costs seconds (see adventurer's _timm_note)
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        super().__init__()
        no_classifier(num_classes, type(self).__name__)
        p = cfg.patch_size
        if img_size % p:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={p}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = None
        self.norm_pix_loss = bool(norm_pix_loss)
        self.num_features = self.embed_dim = d = cfg.embed_dim
        dd = cfg.decoder_embed_dim
        self.patch_size = p
        self.grid_size = (img_size // p, img_size // p)
        n_tokens = self.grid_size[0] * self.grid_size[1] + 1
        norm = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(img_size, p, in_chans, d, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d), requires_grad=False)  # fixed sin-cos
        self.blocks = nn.ModuleList([Block(d, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm)
                                     for _ in range(cfg.depth)])
        self.norm = norm(d)

        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dd), requires_grad=False)  # fixed sin-cos
        self.decoder_blocks = nn.ModuleList(
            [Block(dd, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm)
             for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = norm(dd)
        self.decoder_pred = nn.Linear(dd, p * p * in_chans)
        self.grad_checkpointing = False
        self.init_weights()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"stem": r"^cls_token|^mask_token|^pos_embed|^patch_embed", "blocks": r"^blocks\.(\d+)",
                "decoder": r"^decoder_"}

    # ---- MAE API --------------------------------------------------------------------------------------------
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask (drop), then encode the kept patches.

        Args:
            imgs: (B, C, H, W).
            mask_ratio: fraction of patches dropped.
            noise: (B, N) masking scores (see :func:`ratelab.models.crate_mae.mae.random_masking`); default drawn
                from torch's global generator.

        Returns:
            ``(latent, mask, ids_restore)``: (B, 1 + len_keep, d) normalized encoder output ([CLS], then the kept
            patches in shuffled order), (B, N) mask (1 = masked), (B, N) ``ids_restore``.
        """
        x = self._patch_tokens(imgs)
        B, N, d = x.shape
        pos = self._table(self.pos_embed, self._grid(imgs))
        x = x + pos[:, 1:]
        ids_keep, mask, ids_restore = mae.random_masking(B, N, mask_ratio, noise=noise, device=x.device)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = self._run(blk, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + len_keep, d) latent and (B, N) ``ids_restore`` -> (B, N, p*p*C) predicted patches."""
        x = self.decoder_embed(latent)
        B, n_in, dd = x.shape
        N = ids_restore.shape[1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N + 1 - n_in, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self._table(self.decoder_pos_embed, self._grid_of(N))
        for blk in self.decoder_blocks:
            x = self._run(blk, x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, pred, mask)``: scalar loss, (B, N, p*p*C) prediction for every patch, (B, N) mask (1 = masked).

        Raises:
            ValueError: a ``mask_ratio`` that masks no patch (the loss would be 0/0), bad images or noise.
        """
        self._check_masks_something(imgs, mask_ratio)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ---- encoder features (timm conventions) -----------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N+1, d): the encoder on every patch, after its final norm ([CLS] first, then the
        patch tokens in raster order), without drawing noise."""
        z = self._embed_visible(imgs)
        for blk in self.blocks:
            z = self._run(blk, z)
        return self.norm(z)

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
        """Encoder block outputs on the unmasked image, without hooks (timm's convention, docs/models.md).

        Arguments and return values as :meth:`ratelab.models.crate_mae.CrateMAE.forward_intermediates`; the
        attention maps are (B, H, N+1, N+1) per kept block, recomputed from the block's ``qkv``; ``final`` is
        :meth:`forward_features`.
        """
        check_output_fmt(output_fmt, ("NLC", "NCHW"), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices)
        grid = self._grid(x)
        z = self._embed_visible(x)
        inter: list[Any] = []
        attn: list[torch.Tensor] | None = [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            if return_attn and i in take:
                attn.append(block_attention(blk, z))
            z = self._run(blk, z)
            if i in take:
                spatial, prefix = split_tokens(self.norm(z) if norm else z, output_fmt, num_prefix_tokens=1, grid=grid)
                inter.append((spatial, prefix) if return_prefix_tokens else spatial)
        return pack_intermediates(self.norm(z), inter, attn, intermediates_only=intermediates_only)

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: MaeVit) -> dict[str, torch.Tensor]:
        from ratelab.models.mae_vit.convert import checkpoint_filter_fn

        return checkpoint_filter_fn(state_dict, model)

    # ---- internals --------------------------------------------------------------------------------------------
    def _embed_visible(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self._patch_tokens(imgs)
        pos = self._table(self.pos_embed, self._grid(imgs))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x + pos[:, 1:]], dim=1)

    def _grid_of(self, num_patches: int) -> tuple[int, int]:
        # The decoder sees only a patch count: the construction grid when it fits, else a square one.
        if num_patches == self.grid_size[0] * self.grid_size[1]:
            return self.grid_size
        side = int(num_patches**0.5)
        if side * side != num_patches:
            raise ValueError(f"cannot tell the patch grid of {num_patches} patches (not the construction grid "
                             f"{self.grid_size}, not a square)")
        return side, side


def _create(variant: str, **kwargs: Any) -> MaeVit:
    return build_model_with_cfg(MaeVit, MaeVitConfig, MAE_VIT_VARIANTS[variant], **kwargs)


@register_model
def mae_vit_base_patch16_224(**kwargs: Any) -> MaeVit:
    """CRATE-MAE's ViT-MAE-B: 12 x 768 encoder, 8 x 768 decoder (16 heads), no qkv bias. 143.8M parameters."""
    return _create("base", **kwargs)


@register_model
def mae_vit_large_patch16_224(**kwargs: Any) -> MaeVit:
    """CRATE-MAE's ViT-MAE-L: 24 x 1024 encoder, 8 x 1024 decoder (16 heads), no qkv bias."""
    return _create("large", **kwargs)


@register_model
def mae_vit_base_patch16_dec512d8b_224(**kwargs: Any) -> MaeVit:
    """FAIR's mae_vit_base_patch16 (decoder 8 x 512, qkv bias)."""
    return _create("base_dec512d8b", **kwargs)


@register_model
def mae_vit_large_patch16_dec512d8b_224(**kwargs: Any) -> MaeVit:
    """FAIR's mae_vit_large_patch16 (decoder 8 x 512, qkv bias): the layout of its visualization checkpoints."""
    return _create("large_dec512d8b", **kwargs)


@register_model
def mae_vit_huge_patch14_dec512d8b_224(**kwargs: Any) -> MaeVit:
    """FAIR's mae_vit_huge_patch14 (decoder 8 x 512, qkv bias)."""
    return _create("huge_dec512d8b", **kwargs)


def _digits(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("in_chans", 1)
    return kwargs


@register_model
def mae_vit_nano_patch4_16(**kwargs: Any) -> MaeVit:
    """The ViT twin of crate_mae_nano_patch4_16: 6 + 6 blocks x 128, 4 heads, 16x16 one-channel inputs."""
    return _create("nano", **_digits(kwargs))


@register_model
def mae_vit_pico_patch4_16(**kwargs: Any) -> MaeVit:
    """The ViT twin of crate_mae_pico_patch4_16: 4 + 4 blocks x 64, 4 heads, 16x16 one-channel inputs."""
    return _create("pico", **_digits(kwargs))


@register_model
def test_mae_vit(**kwargs: Any) -> MaeVit:
    """2 + 2 blocks x 32 on 8x8 RGB inputs, for unit tests (the twin of test_crate_mae)."""
    kwargs.setdefault("img_size", 8)
    return _create("test", **kwargs)


__all__ = ["MaeVit", "block_attention"]
