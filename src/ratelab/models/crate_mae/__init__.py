"""CRATE-MAE family (white-box masked autoencoder)."""

# Registers the family's key layouts, so that a file refused by another family can be named as one of ours.
from ratelab.models.crate_mae import convert  # noqa: F401
from ratelab.models.crate_mae.config import CRATE_MAE_VARIANTS, CrateMAEConfig
from ratelab.models.crate_mae.crate_mae import CrateMAE, CrateMAEDecoderBlock, CrateMAELayers, Dictionary

__all__ = ["CRATE_MAE_VARIANTS", "CrateMAE", "CrateMAEConfig", "CrateMAEDecoderBlock", "CrateMAELayers", "Dictionary"]
