"""VAR's multi-scale residual VQ-VAE tokenizer (Tian et al., "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction", NeurIPS 2024, arXiv 2404.02905), shared unchanged by M-VAR.

Encoder and decoder are the VQGAN / latent-diffusion "vq-f16" networks (FoundationVision/VAR ``models/
basic_vae.py``): conv_in; per level ``num_res_blocks`` ResNet blocks (GroupNorm eps 1e-6, SiLU, 3x3 convs, a 1x1
shortcut when the width changes), single-head 1x1-conv self-attention after each block of the last level, a
zero-pad (0, 1, 0, 1) + stride-2 3x3 conv between levels; a Res-Attn-Res middle; GroupNorm + SiLU + conv_out to
``z_channels``. The decoder mirrors it with one more block per level and nearest-2x + 3x3 conv upsampling. Between
them: ``quant_conv`` (3x3), the multi-scale quantizer (:mod:`ratelab.models.var.quant`), ``post_quant_conv``
(3x3). Images are in [-1, 1]; decoded images are clamped to [-1, 1].

State-dict keys are the official ones, so ``vae_ch160v4096z32.pth`` loads strictly (see
:mod:`ratelab.models.var.convert`). Deviations, none of which changes the released architecture:

* ``norm_groups`` (config) lets small CPU tokenizers use fewer than 32 GroupNorm groups;
* :meth:`VQVAE.forward` returns a :class:`VQVAEOutput` (reconstruction, VQ loss, per-scale hit counts) instead of
  the official ``(rec, usages, vq_loss)``; codebook-usage tracking lives in the ``vqvae`` training task;
* the model is trainable by default (the official ``test_mode=True`` freezes it; the ``var`` task freezes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.errors import ConfigError
from ratelab.core.registry import register_model
from ratelab.models.var.config import VQVAE_VARIANTS, VQVAEConfig
from ratelab.models.var.quant import MultiScaleQuantizer

__all__ = ["AttnBlock", "Decoder", "Encoder", "ResnetBlock", "VQVAE", "VQVAEOutput"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q/k/v from one 1x1 conv, residual output."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(channels, channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C) each
        # One head of width C: SDPA's default scale 1/sqrt(C) is the official w_ratio.
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj_out(o.transpose(1, 2).reshape(b, c, h, w))


class _Down(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: the stride-2 conv then halves even sides exactly


class _Up(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList(attns)
    return m


def _mid(channels: int, groups: int, dropout: float, attn: bool) -> nn.Module:
    m = nn.Module()
    m.block_1 = ResnetBlock(channels, channels, groups, dropout)
    m.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
    m.block_2 = ResnetBlock(channels, channels, groups, dropout)
    return m


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/d, W/d), d = 2**(len(ch_mult) - 1)."""

    def __init__(self, cfg: VQVAEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        ch, g, n = cfg.ch, cfg.groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, g, dropout))
                cin = cout
                if i == n - 1 and cfg.using_sa:
                    attns.append(AttnBlock(cin, g))
            level = _level(blocks, attns)
            if i != n - 1:
                level.downsample = _Down(cin)
            self.down.append(level)
        self.mid = _mid(cin, g, dropout, cfg.using_mid_sa)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, in_channels, h*d, w*d) (not clamped)."""

    def __init__(self, cfg: VQVAEConfig, dropout: float = 0.0) -> None:
        super().__init__()
        ch, g, n = cfg.ch, cfg.groups, len(cfg.ch_mult)
        cin = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, 1, 1)
        self.mid = _mid(cin, g, dropout, cfg.using_mid_sa)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            cout = ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, g, dropout))
                cin = cout
                if i == n - 1 and cfg.using_sa:
                    attns.append(AttnBlock(cin, g))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = _Up(cin)
            levels.insert(0, level)  # up[i] is resolution level i, as in the official ordering of keys
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAEOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns: ``rec`` (B, 3, H, W) decoded from the straight-through ``f_hat`` (not
    clamped, so the reconstruction loss has gradients everywhere), ``vq_loss`` (scalar), ``hits`` (K, V) code
    counts of the batch per scale."""

    rec: torch.Tensor
    vq_loss: torch.Tensor
    hits: torch.Tensor


class VQVAE(nn.Module):
    """Multi-scale residual VQ-VAE (see the module docstring).

    Args:
        cfg: the architecture (:class:`~ratelab.models.var.config.VQVAEConfig`).
        dropout: dropout inside the ResNet blocks (0 in the release).
        img_size, in_chans: accepted for the library's model conventions; they must agree with the config
            (``patch_nums[-1] * downsampling`` and ``in_channels``), which alone decides them.

    API (the official method names in brackets):

    * :meth:`img_to_idx` [``img_to_idxBl``]: images -> list of (B, p_k^2) LongTensors;
    * :meth:`idx_to_img` [``idxBl_to_img``]: token maps -> images;
    * :meth:`fhat_to_img`: cumulative latent ``f_hat`` -> images;
    * :meth:`idx_to_var_input` [``quantize.idxBl_to_var_input``]: token maps -> VAR's teacher-forcing input
      (B, L - p_1^2, C_vae);
    * ``quantize.next_var_input`` [``quantize.get_next_autoregressive_input``]: one sampling step.
    """

    # Checked aliases of config values, not options: kept out of model_args so that a save/load round trip does not
    # turn them from None into numbers.
    execution_args = ("img_size", "in_chans")

    def __init__(self, cfg: VQVAEConfig, *, dropout: float = 0.0, img_size: int | None = None,
                 in_chans: int | None = None) -> None:
        super().__init__()
        if img_size is not None and img_size != cfg.img_size:
            raise ConfigError(f"img_size={img_size}: this tokenizer codes {cfg.img_size}px images (patch_nums[-1]="
                              f"{cfg.patch_nums[-1]} x downsampling {cfg.downsample}); change patch_nums instead")
        if in_chans is not None and in_chans != cfg.in_channels:
            raise ConfigError(f"in_chans={in_chans} differs from in_channels={cfg.in_channels}; set in_channels")
        self.cfg = cfg
        self.vocab_size, self.Cvae = cfg.vocab_size, cfg.z_channels
        self.patch_nums = cfg.patch_nums
        self.downsample = cfg.downsample
        self.img_size, self.in_chans = cfg.img_size, cfg.in_channels
        self.num_classes = None  # a tokenizer: no classifier (the library's model convention)
        self.encoder = Encoder(cfg, dropout)
        self.decoder = Decoder(cfg, dropout)
        self.quantize = MultiScaleQuantizer(
            cfg.vocab_size, cfg.z_channels, cfg.patch_nums, quant_resi=cfg.quant_resi,
            share_quant_resi=cfg.share_quant_resi, default_qresi_counts=cfg.default_qresi_counts,
            using_znorm=cfg.using_znorm, beta=cfg.beta)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2)

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: VQVAE) -> dict[str, torch.Tensor]:
        from ratelab.models.var.convert import convert_vqvae_checkpoint

        return convert_vqvae_checkpoint(state_dict, model)

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    # ---- encoder side ---------------------------------------------------------------------------------------------
    def _check_img(self, img: torch.Tensor) -> None:
        want = self.patch_nums[-1] * self.downsample
        if img.ndim != 4 or img.shape[1] != self.in_chans or img.shape[-2:] != (want, want):
            raise ValueError(f"images of shape {tuple(img.shape)}: this tokenizer takes (B, {self.in_chans}, {want}, "
                             f"{want}) in [-1, 1] (patch_nums[-1]={self.patch_nums[-1]} x downsampling "
                             f"{self.downsample})")

    def img_to_f(self, img: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> pre-quantization latent ``quant_conv(Enc(img))`` (B, C_vae, h, w)."""
        self._check_img(img)
        return self.quant_conv(self.encoder(img))

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """timm-style features: the pre-quantization latent (B, C_vae, h, w) (= :meth:`img_to_f`)."""
        return self.img_to_f(img)

    def forward_intermediates(self, img: torch.Tensor, indices: int | Sequence[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_attn: bool = False) -> Any:
        """The encoder's resolution levels as stages (timm's convention, ``docs/models.md``).

        Stage i is the output of encoder level i's blocks (before its downsampling): (B, ch * ch_mult[i], H / 2^i,
        W / 2^i) in ``"NCHW"``, or (B, H_i * W_i, C_i) in ``"NLC"``. ``final`` is :meth:`forward_features`.
        ``norm`` and ``return_attn`` do not apply (no final norm of a stage, no attention in most levels).
        """
        from ratelab.layers.intermediates import check_output_fmt, resolve_indices

        check_output_fmt(output_fmt, ("NCHW", "NLC"), type(self).__name__)
        if norm or return_attn:
            raise ValueError(f"{type(self).__name__}.forward_intermediates has no {'norm' if norm else 'attention'} "
                             "option: its stages are convolutional feature maps")
        keep = set(resolve_indices(len(self.encoder.down), indices, what="stage"))
        self._check_img(img)
        enc, inter = self.encoder, []
        h = enc.conv_in(img)
        for i, level in enumerate(enc.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i in keep:
                inter.append(h if output_fmt == "NCHW" else h.flatten(2).transpose(1, 2))
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        if intermediates_only:
            return inter
        h = enc.mid.block_2(enc.mid.attn_1(enc.mid.block_1(h)))
        return self.quant_conv(enc.conv_out(F.silu(enc.norm_out(h)))), inter

    @torch.no_grad()
    def img_to_idx(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> token maps, one (B, p_k^2) LongTensor per scale, coarse to fine."""
        return self.quantize.f_to_idx(self.img_to_f(img))

    @torch.no_grad()
    def img_to_fhat(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Images -> the cumulative ``f_hat`` after each scale (each (B, C_vae, h, w))."""
        return self.quantize.f_to_idx(self.img_to_f(img), to_fhat=True)

    # ---- decoder side ---------------------------------------------------------------------------------------------
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Cumulative latent (B, C_vae, h, w) -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def idx_to_img(self, idx_list: Sequence[torch.Tensor], *, all_scales: bool = False
                   ) -> torch.Tensor | list[torch.Tensor]:
        """Token maps of every scale -> images in [-1, 1]; with ``all_scales`` the list of images decoded from
        the cumulative ``f_hat`` after each scale (the coarse-to-fine progression)."""
        f = self.quantize.idx_to_fhat(idx_list, all_scales=all_scales)
        if all_scales:
            return [self.fhat_to_img(x) for x in f]
        return self.fhat_to_img(f)

    @torch.no_grad()
    def img_to_reconstructed_img(self, img: torch.Tensor) -> torch.Tensor:
        """Encode, quantize over every scale and decode (clamped)."""
        return self.fhat_to_img(self.img_to_fhat(img)[-1])

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """VAR's teacher-forcing input (B, L - p_1^2, C_vae) from the ground-truth token maps."""
        return self.quantize.idx_to_var_input(idx_list)

    # ---- training -------------------------------------------------------------------------------------------------
    def forward(self, img: torch.Tensor) -> VQVAEOutput:
        """Training forward: encode, quantize with straight-through gradients, decode (unclamped)."""
        f_hat, vq_loss, hits = self.quantize(self.img_to_f(img))
        return VQVAEOutput(self.decoder(self.post_quant_conv(f_hat)), vq_loss, hits)

    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv (for adaptive GAN weighting)."""
        return self.decoder.conv_out.weight

    # official method names, so code written against FoundationVision/VAR runs unchanged
    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums: Any = None) -> list[torch.Tensor]:  # noqa: N802
        if v_patch_nums is not None and tuple(v_patch_nums) != self.patch_nums:
            raise ValueError(f"v_patch_nums={v_patch_nums}: build the tokenizer with patch_nums= instead")
        return self.img_to_idx(inp_img_no_grad)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor], same_shape: bool = True,  # noqa: N802
                     last_one: bool = False) -> torch.Tensor | list[torch.Tensor]:
        if not same_shape:
            raise ValueError("same_shape=False (the official experimental path) is not supported")
        return self.idx_to_img(ms_idx_Bl, all_scales=not last_one)


def _create(variant: str, **kwargs: Any) -> VQVAE:
    return build_model_with_cfg(VQVAE, VQVAEConfig, VQVAE_VARIANTS[variant], **kwargs)


@register_model
def var_vae_ch160v4096z32(**kwargs: Any) -> VQVAE:
    """VAR's released tokenizer: vq-f16, ch 160, 4096 codes of width 32, 10 scales up to 16x16 (256^2 images);
    108.95M parameters. ``ch``, ``vocab_size``, ``z_channels``, ``patch_nums``, ``ch_mult`` ... override."""
    return _create("ch160v4096z32", **kwargs)
