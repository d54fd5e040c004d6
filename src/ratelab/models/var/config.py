"""Configs of the VAR family: the multi-scale residual VQ-VAE tokenizer (and, below, VAR / M-VAR).

The tokenizer's numbers are those of FoundationVision/VAR ``models/vqvae.py`` + ``models/__init__.py``
(``build_vae_var``): a VQGAN/LDM "vq-f16" encoder/decoder at ``ch=160``, ``C_vae=32``, one 4096-entry codebook,
four partially shared phi convs, ten scales ``(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MVAR_VARIANTS",
    "MVARConfig",
    "VAR_PATCH_NUMS_256",
    "VAR_PATCH_NUMS_512",
    "VAR_VARIANTS",
    "VARConfig",
    "VQVAE_VARIANTS",
    "VQVAEConfig",
]

# Scale schedules of the official repository (utils/arg_util.py): 256^2 gives L = 680 tokens, 512^2 L = 2240.
VAR_PATCH_NUMS_256: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_PATCH_NUMS_512: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass(frozen=True)
class VQVAEConfig:
    """Architecture of the multi-scale residual VQ-VAE (VAR's tokenizer).

    Attributes:
        vocab_size: codebook entries V (one codebook shared by every scale).
        z_channels: latent / code width C_vae.
        ch: base width of encoder and decoder.
        ch_mult: width multiplier per resolution level; ``len(ch_mult) - 1`` stride-2 stages, so the latent is
            ``2**(len(ch_mult) - 1)`` times smaller than the image (16 for vq-f16).
        num_res_blocks: ResNet blocks per encoder level (the decoder has one more, as in LDM).
        patch_nums: side p_k of each scale's token map, coarse to fine; the last one is the latent side
            (image side / downsampling).
        in_channels: image channels.
        using_sa: single-head self-attention after every block of the lowest-resolution level.
        using_mid_sa: self-attention in the middle (Res-Attn-Res) blocks.
        quant_conv_ks: kernel of ``quant_conv`` / ``post_quant_conv``.
        quant_resi: phi's blend, ``phi(h) = (1 - r) h + r conv3x3(h)``; 0 makes every phi the identity.
        share_quant_resi: number of phi convs: 0 = one per scale, 1 = one for all, n > 1 = n partially shared ones
            (the release: 4).
        default_qresi_counts: with ``share_quant_resi=0``, the number of phi convs (0 = one per scale).
        using_znorm: nearest code by cosine similarity instead of L2 (off in the release).
        beta: commitment weight of the VQ loss.
        norm_groups: GroupNorm groups; ``None`` = 32 (the official value) when ``ch`` is a multiple of 32, else
            ``gcd(ch, 32)`` so that small CPU tokenizers (``ch=16``) can be built. Not part of the official code.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS_256
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    using_znorm: bool = False
    beta: float = 0.25
    norm_groups: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        for name in ("vocab_size", "z_channels", "ch", "num_res_blocks", "in_channels", "quant_conv_ks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be non-empty positive integers, got {self.ch_mult}")
        if not self.patch_nums or any(p <= 0 for p in self.patch_nums):
            raise ValueError(f"patch_nums must be non-empty positive integers, got {self.patch_nums}")
        if list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"patch_nums must go from coarse to fine (non-decreasing), got {self.patch_nums}")
        if self.share_quant_resi < 0 or self.default_qresi_counts < 0:
            raise ValueError("share_quant_resi and default_qresi_counts must be >= 0")
        if self.quant_conv_ks % 2 == 0:
            raise ValueError(f"quant_conv_ks must be odd (same padding), got {self.quant_conv_ks}")
        g = self.groups
        for c in {self.ch * m for m in self.ch_mult} | {self.ch}:
            if c % g:
                raise ValueError(f"norm_groups={g} does not divide the width {c} (ch={self.ch}, ch_mult="
                                 f"{self.ch_mult}); pick ch or norm_groups so that it does")

    @property
    def groups(self) -> int:
        """GroupNorm groups actually used."""
        if self.norm_groups is not None:
            return self.norm_groups
        return 32 if self.ch % 32 == 0 else math.gcd(self.ch, 32)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def img_size(self) -> int:
        """Image side whose latent matches the last scale: ``patch_nums[-1] * downsample``."""
        return self.patch_nums[-1] * self.downsample

    @property
    def num_tokens(self) -> int:
        """L = sum of p_k^2 (680 for the 256^2 schedule)."""
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Named tokenizer variants. ``ch160v4096z32`` is the released one (vae_ch160v4096z32.pth, 108.95M parameters).
VQVAE_VARIANTS: dict[str, VQVAEConfig] = {
    "ch160v4096z32": VQVAEConfig(),
}


# ---- VAR and M-VAR transformers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VARConfig:
    """Architecture of a VAR transformer (FoundationVision/VAR ``models/var.py`` + ``build_vae_var``).

    ``embed_dim``, ``num_heads`` and ``drop_path`` follow the builder's rule (64 depth, depth heads, 0.1 depth / 24)
    when a variant is built with another ``depth`` (see :func:`ratelab.models.var.var.build_config`).

    Attributes:
        depth: blocks.
        embed_dim: width C.
        num_heads: attention heads (head_dim = C / heads = 64 in every official size).
        patch_nums: scale sides p_k, coarse to fine (the tokenizer's).
        vocab_size: codebook entries V (the head's width).
        c_vae: code width C_vae (``word_embed``'s input).
        num_classes: classes; ``class_emb`` has one more row, the null class.
        mlp_ratio: FFN hidden = round(mlp_ratio C).
        attn_l2_norm: L2-normalized q/k with a learned per-head logit scale (the builder's default: on).
        norm_eps: LayerNorm eps.
        drop_path: stochastic depth of the last block (linear from 0).
        cond_drop_rate: label dropout to the null class in training (classifier-free guidance).
        init_adaln: multiplier of the AdaLN scale/shift rows at init (and of the head AdaLN).
        init_adaln_gamma: multiplier of the block AdaLN gate rows ``[0, 2C)`` at init (``--alng``).
        init_head: multiplier of the head weight at init.
    """

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS_256
    vocab_size: int = 4096
    c_vae: int = 32
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    drop_path: float = 0.1 * 16 / 24
    cond_drop_rate: float = 0.1
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-3
    init_head: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        for name in ("depth", "embed_dim", "num_heads", "vocab_size", "c_vae", "num_classes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if not self.patch_nums or any(p <= 0 for p in self.patch_nums):
            raise ValueError(f"patch_nums must be non-empty positive integers, got {self.patch_nums}")
        if not 0 <= self.cond_drop_rate < 1:
            raise ValueError(f"cond_drop_rate must be in [0, 1), got {self.cond_drop_rate}")

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MVARConfig(VARConfig):
    """M-VAR (OliverRensu/MVAR ``models/basic_mvar.py``): VAR's fields plus the Mamba-2 mixer's.

    Attributes:
        d_state: Mamba-2 state size N (64).
        d_conv: depthwise conv width (4).
        expand: d_in = expand C (2).
        headdim: Mamba-2 channels per head (64, mamba_ssm's default; H = 2C / 64).
        ngroups: B/C groups (1).
        chunk_size: SSD chunk length (a speed knob only).
    """

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.expand * self.embed_dim) % self.headdim:
            raise ValueError(f"d_inner = expand * embed_dim = {self.expand * self.embed_dim} is not divisible by "
                             f"headdim={self.headdim}")


def _var_size(depth: int, cls: type = VARConfig, **kw: Any) -> Any:
    # The README commands: --alng 1e-3 up to d20, 1e-4 for d24, 1e-5 for d30 (and d32, which trains like d30).
    alng = 1e-3 if depth <= 20 else 1e-4 if depth <= 24 else 1e-5
    return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path=0.1 * depth / 24,
               init_adaln_gamma=alng, **kw)


# 133M / 310M / 601M / 1.03B / 2.01B parameters (1000 classes, V = 4096, C_vae = 32).
VAR_VARIANTS: dict[str, VARConfig] = {f"d{d}": _var_size(d) for d in (12, 16, 20, 24, 30)}
# 198M / 464M / 901M / 1.55B / 3.66B. d32 is built as the code builds it (width 64 * 32 = 2048, 3.66B); the
# paper's "3.0B" is the size of a depth-30 model, and the released d32.pth's shapes decide which one it is: the
# converter names the depth and width it finds.
MVAR_VARIANTS: dict[str, MVARConfig] = {f"d{d}": _var_size(d, MVARConfig) for d in (12, 16, 20, 24, 32)}
