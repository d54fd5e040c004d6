"""CRATE family (white-box transformers)."""

# Registers the family's key layouts, so that a file refused by another family can be named as one of ours.
from ratelab.models.crate import convert  # noqa: F401
from ratelab.models.crate.config import CRATE_VARIANTS, CrateConfig
from ratelab.models.crate.crate import ISTA, MSSA, Crate, CrateBlock

__all__ = ["CRATE_VARIANTS", "Crate", "CrateBlock", "CrateConfig", "ISTA", "MSSA"]
