"""CRATE-alpha family (white-box transformers scaled with an overcomplete, decoupled sparse-coding block)."""

# Registers the family's key layouts, so that a file refused by another family can be named as one of ours.
from ratelab.models.crate_alpha import convert  # noqa: F401
from ratelab.models.crate_alpha.config import CRATE_ALPHA_VARIANTS, CrateAlphaConfig
from ratelab.models.crate_alpha.crate_alpha import ODL, CrateAlpha, CrateAlphaBlock, odl_fast, odl_ref

__all__ = ["CRATE_ALPHA_VARIANTS", "ODL", "CrateAlpha", "CrateAlphaBlock", "CrateAlphaConfig", "odl_fast", "odl_ref"]
