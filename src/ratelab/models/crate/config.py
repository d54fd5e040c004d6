"""CRATE architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class CrateConfig:
    """Architecture-only fields of a CRATE model (runtime options are constructor kwargs).

    Attributes:
        embed_dim: token width d.
        depth: number of CRATE layers L.
        num_heads: number of subspaces K.
        patch_size: square patch side in pixels.
        head_dim: subspace dimension p; defaults to ``embed_dim // num_heads`` (true for every official config).
        ista_step: ISTA step size eta (0.1 in the official code).
        ista_lambda: sparsity penalty lambda (0.1 in the official classifier code, 0.5 in CRATE-MAE's encoder).
        pool: ``"cls"`` (official default) or ``"mean"`` over patch tokens.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    head_dim: int | None = None
    ista_step: float = 0.1
    ista_lambda: float = 0.1
    pool: str = "cls"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes: Any) -> CrateConfig:
        """``dataclasses.replace`` that re-derives ``head_dim``.

        When this config's ``head_dim`` is the derived ``embed_dim // num_heads`` and the change touches
        ``embed_dim`` or ``num_heads`` without giving ``head_dim``, the new value is derived again instead of the old
        one being carried over (``replace`` copies every field).
        """
        derived = self.head_dim == self.embed_dim // self.num_heads
        if derived and "head_dim" not in changes and {"embed_dim", "num_heads"} & set(changes):
            changes["head_dim"] = None
        return replace(self, **changes)


# Official sizes (Ma-Lab-Berkeley/CRATE README; parameter counts at 224 px / 1000 classes: 6.09M, 13.12M, 22.80M,
# 77.64M). The small sizes are ratelab's own, for digits-sized inputs and for tests.
CRATE_VARIANTS: dict[str, CrateConfig] = {
    "tiny": CrateConfig(embed_dim=384, depth=12, num_heads=6),
    "small": CrateConfig(embed_dim=576, depth=12, num_heads=12),
    "base": CrateConfig(embed_dim=768, depth=12, num_heads=12),
    "large": CrateConfig(embed_dim=1024, depth=24, num_heads=16),
    # 6 layers x 128 wide: the digits demo model (~99% on 16x16 digits in a few CPU minutes).
    "nano": CrateConfig(embed_dim=128, depth=6, num_heads=4, patch_size=4),
    "pico": CrateConfig(embed_dim=64, depth=4, num_heads=4, patch_size=4),
    "test": CrateConfig(embed_dim=32, depth=2, num_heads=2, patch_size=4),
}
