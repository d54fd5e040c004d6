"""Adventurer family (causal image models with a Mamba-2 token mixer)."""

# Registers the family's key layouts, so that a file refused by another family can be named as one of ours.
from ratelab.models.adventurer import convert  # noqa: F401
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
