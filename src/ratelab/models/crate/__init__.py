"""CRATE family (white-box transformers)."""

from ratelab.models.crate.config import CRATE_VARIANTS, CrateConfig
from ratelab.models.crate.crate import ISTA, MSSA, Crate, CrateBlock

__all__ = ["CRATE_VARIANTS", "Crate", "CrateBlock", "CrateConfig", "ISTA", "MSSA"]
