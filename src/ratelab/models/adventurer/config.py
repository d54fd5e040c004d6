"""Adventurer architecture config and the named variants table."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FLIP_SCHEDULES = ("alternate", "pairs", "legacy_2_3", "none")


def flip_flags(schedule: str, depth: int) -> list[bool]:
    """Which blocks reverse the order of the patch tokens around their mixer.

    ``alternate``: blocks 1, 3, 5, ... (``n % 2 == 1``; the paper's figure and the maintainer's suggested fix);
    ``pairs``: blocks 2, 3, 6, 7, ... (``(n // 2) % 2 == 1``; the other suggested fix); ``legacy_2_3``: blocks 2 and
    3 only (``n // 2 == 1``, what the released code computes); ``none``: no block.
    """
    rules = {
        "alternate": lambda n: n % 2 == 1,
        "pairs": lambda n: (n // 2) % 2 == 1,
        "legacy_2_3": lambda n: n // 2 == 1,
        "none": lambda n: False,
    }
    if schedule not in rules:
        raise ValueError(f"flip must be one of {FLIP_SCHEDULES}, got {schedule!r}")
    return [rules[schedule](n) for n in range(depth)]


@dataclass(frozen=True)
class AdventurerConfig:
    """Architecture-only fields of an Adventurer model (runtime options are constructor kwargs).

    Attributes:
        embed_dim: token width D.
        depth: number of blocks.
        patch_size: square patch side in pixels (conv stem with kernel = stride = patch_size).
        d_state: Mamba-2 state size N (64 in every official model).
        expand: Mamba-2 expansion, d_in = expand * D.
        headdim: Mamba-2 channels per head (64 official; H = d_in / headdim).
        ngroups: Mamba-2 B/C groups (1 official).
        d_conv: Mamba-2 depthwise conv width (4 official).
        mlp_ratio: SwiGLU hidden width = floor(mlp_ratio * D) (2.5 official).
        heading_avg: prepend the heading-average token in every block (official: on).
        flip: flip schedule, see :func:`flip_flags` (``"alternate"`` by default; see the model docstring).
    """

    embed_dim: int = 768
    depth: int = 12
    patch_size: int = 16
    d_state: int = 64
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    d_conv: int = 4
    mlp_ratio: float = 2.5
    heading_avg: bool = True
    flip: str = "alternate"

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "patch_size", "d_state", "expand", "headdim", "ngroups", "d_conv"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"d_inner = expand * embed_dim = {self.d_inner} is not divisible by headdim={self.headdim}"
            )
        if (self.d_inner // self.headdim) % self.ngroups:
            raise ValueError(f"heads = {self.d_inner // self.headdim} is not divisible by ngroups={self.ngroups}")
        if self.flip not in FLIP_SCHEDULES:
            raise ValueError(f"flip must be one of {FLIP_SCHEDULES}, got {self.flip!r}")
        if not isinstance(self.heading_avg, bool):
            raise ValueError(f"heading_avg must be a bool, got {self.heading_avg!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.embed_dim)

    def to_dict(self) -> dict:
        return asdict(self)


# Official sizes (wangf3014/Adventurer models_mamba.py; parameter counts at 224 px / 1000 classes: 11.61M, 44.49M,
# 98.66M, 346.20M, and 98.67M for Base/P8). The small sizes are ratelab's own, for digits-sized inputs and tests.
ADVENTURER_VARIANTS: dict[str, AdventurerConfig] = {
    "tiny": AdventurerConfig(embed_dim=256, depth=12),
    "small": AdventurerConfig(embed_dim=512, depth=12),
    "base": AdventurerConfig(embed_dim=768, depth=12),
    "large": AdventurerConfig(embed_dim=1024, depth=24),
    # 5 blocks x 64 wide, 4 heads of 32, state 32: 0.309M parameters at 16x16/1ch/10 classes, about
    # crate_nano_patch4_16's 0.305M (the digits demo model).
    "nano": AdventurerConfig(embed_dim=64, depth=5, patch_size=4, d_state=32, headdim=32),
    "test": AdventurerConfig(embed_dim=32, depth=2, patch_size=4, d_state=8, headdim=16),
}
