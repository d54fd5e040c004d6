"""DP-Cap family (ViT image captioner trained with DP-SGD)."""

# Registers the family's key layout, so that a file refused by another family can be named as one of ours.
from ratelab.models.dpcap import convert  # noqa: F401
from ratelab.models.dpcap.config import BERT_VOCAB_SIZE, DPCAP_VARIANTS, DPCapConfig
from ratelab.models.dpcap.dpcap import DPCap, caption_loss, sincos_pos_embed_1d

__all__ = ["BERT_VOCAB_SIZE", "DPCAP_VARIANTS", "DPCap", "DPCapConfig", "caption_loss", "sincos_pos_embed_1d"]
