"""DP-Cap family (ViT image captioner trained with DP-SGD)."""

from ratelab.models.dpcap.config import BERT_VOCAB_SIZE, DPCAP_VARIANTS, DPCapConfig
from ratelab.models.dpcap.dpcap import DPCap, caption_loss, sincos_pos_embed_1d

__all__ = ["BERT_VOCAB_SIZE", "DPCAP_VARIANTS", "DPCap", "DPCapConfig", "caption_loss", "sincos_pos_embed_1d"]
