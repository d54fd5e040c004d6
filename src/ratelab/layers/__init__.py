"""Family-agnostic building blocks (patch embeddings, position-embedding resampling)."""

from ratelab.layers.patch import patchify, resample_pos_embed

__all__ = ["patchify", "resample_pos_embed"]
