"""CRATE-MAE architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class CrateMAEConfig:
    """Architecture-only fields of a CRATE-MAE (runtime options are constructor kwargs).

    The decoder has the encoder's width: the official code defines a ``decoder_embed_dim`` but feeds the encoder's
    output to the decoder directly, so any other value could not run. Subspace dimensions are
    ``embed_dim // num_heads`` (encoder) and ``embed_dim // decoder_num_heads`` (decoder), as in the official code.

    Attributes:
        embed_dim: token width d of encoder and decoder.
        depth: encoder layers.
        num_heads: encoder subspaces K.
        decoder_depth: decoder layers.
        decoder_num_heads: decoder subspaces; defaults to ``num_heads`` (true for every official size).
        patch_size: square patch side in pixels.
        ista_step: encoder ISTA step size eta (0.1).
        ista_lambda: encoder ISTA sparsity penalty lambda (0.5 in CRATE-MAE's code; the book states 0.1).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_depth: int = 12
    decoder_num_heads: int | None = None
    patch_size: int = 16
    ista_step: float = 0.1
    ista_lambda: float = 0.5

    def __post_init__(self) -> None:
        if self.decoder_num_heads is None:
            object.__setattr__(self, "decoder_num_heads", self.num_heads)
        for name in ("embed_dim", "depth", "num_heads", "decoder_depth", "decoder_num_heads", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("num_heads", "decoder_num_heads"):
            if self.embed_dim % getattr(self, name):
                raise ValueError(f"embed_dim={self.embed_dim} is not divisible by {name}={getattr(self, name)}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by 4 (2-D sin-cos position table)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.embed_dim // self.decoder_num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes: Any) -> CrateMAEConfig:
        """``dataclasses.replace`` that keeps ``decoder_num_heads`` following ``num_heads`` when it did before."""
        if self.decoder_num_heads == self.num_heads and "num_heads" in changes and "decoder_num_heads" not in changes:
            changes["decoder_num_heads"] = None
        return replace(self, **changes)


# Official sizes (Ma-Lab-Berkeley/CRATE model/crate_ae/crate_ae.py, mae_crate_{tiny,small,base,large}). The small
# sizes are ratelab's own, for 16x16 digits and for tests; the matched ViT-MAEs of ratelab.models.mae_vit copy them.
CRATE_MAE_VARIANTS: dict[str, CrateMAEConfig] = {
    "tiny": CrateMAEConfig(embed_dim=384, depth=12, num_heads=6, decoder_depth=12),
    "small": CrateMAEConfig(embed_dim=576, depth=12, num_heads=12, decoder_depth=12),
    "base": CrateMAEConfig(embed_dim=768, depth=12, num_heads=12, decoder_depth=12),
    "large": CrateMAEConfig(embed_dim=1024, depth=24, num_heads=16, decoder_depth=24),
    "nano": CrateMAEConfig(embed_dim=128, depth=6, num_heads=4, decoder_depth=6, patch_size=4),
    "pico": CrateMAEConfig(embed_dim=64, depth=4, num_heads=4, decoder_depth=4, patch_size=4),
    "test": CrateMAEConfig(embed_dim=32, depth=2, num_heads=2, decoder_depth=2, patch_size=4),
}
