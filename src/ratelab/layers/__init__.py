"""Family-agnostic building blocks ratelab keeps as its own (timm's are used where timm has them and the key names
and numerics stay unchanged: ``timm.layers.DropPath``, ``SwiGLU``, ``PatchEmbed``)."""

from ratelab.layers.attention import SelfAttention
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices, split_tokens
from ratelab.layers.ista import ISTA
from ratelab.layers.mssa import MSSA
from ratelab.layers.patch import patchify, resample_pos_embed

__all__ = [
    "ISTA",
    "MSSA",
    "SelfAttention",
    "check_output_fmt",
    "pack_intermediates",
    "patchify",
    "resample_pos_embed",
    "resolve_indices",
    "split_tokens",
]
