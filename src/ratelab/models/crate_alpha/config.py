"""CRATE-alpha architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class CrateAlphaConfig:
    """Architecture-only fields of a CRATE-alpha model (runtime options are constructor kwargs).

    Attributes:
        embed_dim: token width d.
        depth: number of layers L.
        num_heads: number of subspaces K.
        patch_size: square patch side in pixels.
        head_dim: subspace dimension p; defaults to ``embed_dim // num_heads`` (true for every official config).
        expansion: overcompleteness C of the dictionaries, D and D_hat in R^{d x C d} (4 in the official code,
            where it is hard-coded).
        odl_step: proximal step size eta (0.1 for every official size).
        odl_lambda: sparsity penalty lambda (0.1 for every official size).
        decoupled: synthesize the block output with its own dictionary D_hat (CRATE-alpha); ``False`` uses D itself,
            the "+ overcomplete" arm of the paper's ablation. Official checkpoints need ``True``.
        residual: add the ODL output to its input (CRATE-alpha); ``False`` replaces the tokens by it, as CRATE's
            ISTA step does (the ablation arms before "+ residual").
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    head_dim: int | None = None
    expansion: int = 4
    odl_step: float = 0.1
    odl_lambda: float = 0.1
    decoupled: bool = True
    residual: bool = True

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.num_heads <= 0 or self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "head_dim", "expansion"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.odl_step <= 0:
            raise ValueError(f"odl_step must be positive, got {self.odl_step}")
        if self.odl_lambda < 0:
            raise ValueError(f"odl_lambda must be >= 0, got {self.odl_lambda}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def code_dim(self) -> int:
        """Width C d of the sparse codes."""
        return self.expansion * self.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **changes: Any) -> CrateAlphaConfig:
        """``dataclasses.replace`` that re-derives a derived ``head_dim`` when ``embed_dim``/``num_heads`` change."""
        derived = self.head_dim == self.embed_dim // self.num_heads
        if derived and "head_dim" not in changes and {"embed_dim", "num_heads"} & set(changes):
            changes["head_dim"] = None
        return replace(self, **changes)


# Official sizes: decode_variant of UCSC-VLAA/CRATE-alpha models/crate.py (Ti/S/B/L/H; its mlp_dim is unused by the
# ODL block). The small sizes are ratelab's own, for digits-sized inputs and for tests.
CRATE_ALPHA_VARIANTS: dict[str, CrateAlphaConfig] = {
    "tiny": CrateAlphaConfig(embed_dim=192, depth=12, num_heads=3),
    "small": CrateAlphaConfig(embed_dim=576, depth=12, num_heads=12),
    "base": CrateAlphaConfig(embed_dim=768, depth=12, num_heads=12),
    "large": CrateAlphaConfig(embed_dim=1024, depth=24, num_heads=16),
    "huge": CrateAlphaConfig(embed_dim=1280, depth=32, num_heads=16),
    # The widths and depths of CRATE's nano/pico/test, so the two families compare at equal shape.
    "nano": CrateAlphaConfig(embed_dim=128, depth=6, num_heads=4, patch_size=4),
    "pico": CrateAlphaConfig(embed_dim=64, depth=4, num_heads=4, patch_size=4),
    "test": CrateAlphaConfig(embed_dim=32, depth=2, num_heads=2, patch_size=4),
}
