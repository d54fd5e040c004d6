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
        attn: ``"mssa"`` (CRATE: one projection U_k shared by query, key and value) or ``"mhsa"`` (a ViT's
            multi-head self-attention with separate Q, K, V; needs ``head_dim == embed_dim // num_heads``). The
            CRATE-MHSA arm of the segmentation paper's Table 2 ablation (arXiv 2308.16271).
        mlp: ``"ista"`` (CRATE: one ISTA step, no skip) or ``"mlp"`` (a ViT MLP with a residual,
            ``z + MLP(LN2(z))``): the CRATE-MLP arm of the same ablation.
        mlp_ratio: hidden width of the ``"mlp"`` block as a multiple of ``embed_dim`` (ViT's 4); unused by ISTA.
    """

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 16
    head_dim: int | None = None
    ista_step: float = 0.1
    ista_lambda: float = 0.1
    pool: str = "cls"
    attn: str = "mssa"
    mlp: str = "ista"
    mlp_ratio: float = 4.0

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
        if self.attn not in ("mssa", "mhsa"):
            raise ValueError(f"attn must be 'mssa' or 'mhsa', got {self.attn!r}")
        if self.mlp not in ("ista", "mlp"):
            raise ValueError(f"mlp must be 'ista' or 'mlp', got {self.mlp!r}")
        # a ViT attention splits its d-wide q/k/v into heads; a free head_dim would need another layer
        if self.attn == "mhsa" and self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"attn='mhsa' needs head_dim * num_heads == embed_dim, got {self.head_dim} * "
                             f"{self.num_heads} != {self.embed_dim}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def variant_name(self) -> str:
        """``"crate"``, ``"crate_mlp"`` (MSSA + MLP), ``"crate_mhsa"`` (MHSA + ISTA) or ``"mhsa_mlp"`` (both
        swapped: a ViT on CRATE's stem)."""
        return {("mssa", "ista"): "crate", ("mssa", "mlp"): "crate_mlp", ("mhsa", "ista"): "crate_mhsa",
                ("mhsa", "mlp"): "mhsa_mlp"}[(self.attn, self.mlp)]

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
