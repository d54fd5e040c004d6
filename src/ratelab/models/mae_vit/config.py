"""ViT-MAE architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class MaeVitConfig:
    """Architecture-only fields of a ViT masked autoencoder (FAIR MAE's ``MaskedAutoencoderViT``).

    Attributes:
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder attention heads.
        decoder_embed_dim: decoder width (``decoder_embed`` maps the encoder's latent to it); defaults to
            ``embed_dim``.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        patch_size: square patch side in pixels.
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: biases on the q/k/v projection. FAIR's MAE has them; the ViT-MAEs of CRATE-MAE's comparison
            (Ma-Lab-Berkeley/CRATE ``crate_ae.py``, timm ``Block`` defaults) do not, which is what its 143.8M counts.
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int | None = None
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    patch_size: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.decoder_embed_dim is None:
            object.__setattr__(self, "decoder_embed_dim", self.embed_dim)
        for name in ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                     "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}")
            if getattr(self, width) % 4:
                raise ValueError(f"{width}={getattr(self, width)} must be divisible by 4 (2-D sin-cos position table)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes: Any) -> MaeVitConfig:
        """``dataclasses.replace`` that keeps ``decoder_embed_dim`` following ``embed_dim`` when it did before."""
        if self.decoder_embed_dim == self.embed_dim and "embed_dim" in changes and "decoder_embed_dim" not in changes:
            changes["decoder_embed_dim"] = None
        return replace(self, **changes)


# "base"/"large": the ViT-MAEs CRATE-MAE is compared with (Ma-Lab-Berkeley/CRATE model/crate_ae/crate_ae.py,
# mae_vit_base / mae_vit_large: decoder as wide as the encoder, 8 blocks of 16 heads, no qkv bias).
# "*_dec512d8b": FAIR's released MAE configs (facebookresearch/mae models_mae.py). The small sizes match the small
# CRATE-MAEs block for block (same width, heads, depths and patch), for ratelab's CPU comparison.
MAE_VIT_VARIANTS: dict[str, MaeVitConfig] = {
    "base": MaeVitConfig(embed_dim=768, depth=12, num_heads=12, decoder_depth=8, decoder_num_heads=16),
    "large": MaeVitConfig(embed_dim=1024, depth=24, num_heads=16, decoder_depth=8, decoder_num_heads=16),
    "base_dec512d8b": MaeVitConfig(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                                   decoder_num_heads=16, qkv_bias=True),
    "large_dec512d8b": MaeVitConfig(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                                    decoder_num_heads=16, qkv_bias=True),
    "huge_dec512d8b": MaeVitConfig(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                                   decoder_num_heads=16, patch_size=14, qkv_bias=True),
    "nano": MaeVitConfig(embed_dim=128, depth=6, num_heads=4, decoder_depth=6, decoder_num_heads=4, patch_size=4),
    "pico": MaeVitConfig(embed_dim=64, depth=4, num_heads=4, decoder_depth=4, decoder_num_heads=4, patch_size=4),
    "test": MaeVitConfig(embed_dim=32, depth=2, num_heads=2, decoder_depth=2, decoder_num_heads=2, patch_size=4),
}
