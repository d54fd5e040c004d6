"""Attention: one signature, a readable reference and a fast path, chosen per call (``backend="auto"|"sdpa"|"ref"``).

Shapes: q (B, H, Lq, D), k and v (B, H_kv, Lk, D) with H a multiple of H_kv and Lk >= Lq allowed (KV cache).
Masks (combined by AND): ``is_causal`` (last query aligned with the last key), ``attn_mask`` (bool = may attend,
or additive float), and a block form: ``block_ids``/``kv_block_ids`` per token with ``block_causal`` off
(block-diagonal: packed variable-length sequences, intra-scale attention) or on (block-causal over scales, VAR).
See :mod:`ratelab.kernels.attention.mask`; :func:`block_ids_from_seqlens` builds ids from lengths.

``auto`` takes SDPA; asking for the weights (``return_attn=True``) always goes through the reference path, because
fused kernels never materialize them. The choice is made per call, so tests can flip it on one module instance.
"""

from __future__ import annotations

import torch

from ratelab.kernels.attention.fast import attention_sdpa
from ratelab.kernels.attention.mask import block_ids_from_cu_seqlens, block_ids_from_seqlens, build_attn_mask
from ratelab.kernels.attention.ref import attention_ref

BACKENDS = ("auto", "sdpa", "ref")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    kv_block_ids: torch.Tensor | None = None,
    block_causal: bool = False,
    backend: str = "auto",
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale + mask) v; arguments as :func:`attention_ref`, plus ``backend``.

    Example:
        Decoding one token against a cache of 7 (the same rows as full causal attention over 8 tokens)::

            out = attention(q[:, :, -1:], k, v, is_causal=True)   # q (B, H, 8, D) -> last row only
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    kw = dict(scale=scale, is_causal=is_causal, attn_mask=attn_mask, block_ids=block_ids, kv_block_ids=kv_block_ids,
              block_causal=block_causal)
    if return_attn or backend == "ref":
        return attention_ref(q, k, v, return_attn=return_attn, **kw)
    return attention_sdpa(q, k, v, **kw)


__all__ = [
    "BACKENDS",
    "attention",
    "attention_ref",
    "attention_sdpa",
    "block_ids_from_cu_seqlens",
    "block_ids_from_seqlens",
    "build_attn_mask",
]
