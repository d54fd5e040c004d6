"""ViT-MAE family (FAIR's masked autoencoder; the baseline of CRATE-MAE)."""

# Registers the family's key layout, so that a file refused by another family can be named as one of ours.
from ratelab.models.mae_vit import convert  # noqa: F401
from ratelab.models.mae_vit.config import MAE_VIT_VARIANTS, MaeVitConfig
from ratelab.models.mae_vit.mae_vit import MaeVit, block_attention

__all__ = ["MAE_VIT_VARIANTS", "MaeVit", "MaeVitConfig", "block_attention"]
