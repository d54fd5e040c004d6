"""Adventurer family (causal image models with a Mamba-2 token mixer)."""

from ratelab.models.adventurer.adventurer import Adventurer, AdventurerBlock
from ratelab.models.adventurer.config import ADVENTURER_VARIANTS, FLIP_SCHEDULES, AdventurerConfig, flip_flags

__all__ = [
    "ADVENTURER_VARIANTS",
    "FLIP_SCHEDULES",
    "Adventurer",
    "AdventurerBlock",
    "AdventurerConfig",
    "flip_flags",
]
