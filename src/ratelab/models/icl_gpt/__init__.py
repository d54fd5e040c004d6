"""Small causal transformer that learns classification in context (synthetic few-shot tasks)."""

from ratelab.models.icl_gpt.config import ICL_GPT_VARIANTS, ICLGPTConfig
from ratelab.models.icl_gpt.model import ICLGPT, ICLGPTBlock

__all__ = ["ICLGPT", "ICL_GPT_VARIANTS", "ICLGPTBlock", "ICLGPTConfig"]
