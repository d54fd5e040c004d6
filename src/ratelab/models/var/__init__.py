"""VAR family: the multi-scale residual VQ-VAE tokenizer (shared by VAR and M-VAR), VAR, M-VAR."""

from ratelab.models.var import convert  # noqa: F401  (registers the family's key layouts)
from ratelab.models.var.config import VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512, VQVAE_VARIANTS, VQVAEConfig
from ratelab.models.var.quant import MultiScaleQuantizer, phi_schedule
from ratelab.models.var.vqvae import VQVAE, VQVAEOutput

__all__ = ["VAR_PATCH_NUMS_256", "VAR_PATCH_NUMS_512", "VQVAE", "VQVAE_VARIANTS", "MultiScaleQuantizer",
           "VQVAEConfig", "VQVAEOutput", "phi_schedule"]
