"""Reference scaled dot-product attention: the textbook formula, written out so it can be read and diffed.

Same signature as :func:`ratelab.kernels.attention.fast.attention_sdpa`; it alone can return the weights.
"""

from __future__ import annotations

import torch

from ratelab.kernels.attention.mask import build_attn_mask, check_qkv, expand_kv_heads


def attention_ref(
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
    return_attn: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v over the key axis.

    Args:
        q: (B, H, Lq, D) queries (in MSSA q = k = v = U_k^T z).
        k: (B, H_kv, Lk, D) keys; H must be a multiple of H_kv (grouped-query attention). Lk may exceed Lq (a KV
            cache: queries are the last Lq positions).
        v: (B, H_kv, Lk, Dv) values.
        scale: logit scale; default 1/sqrt(D).
        is_causal: query i sees keys ``j <= i + Lk - Lq`` (last query aligned with the last key).
        attn_mask: bool (True = may attend) or floating additive mask, broadcastable to (B, H, Lq, Lk).
        block_ids: (Lq,) or (B, Lq) integer block id of each query (see :mod:`ratelab.kernels.attention.mask`).
        kv_block_ids: (Lk,) or (B, Lk) block ids of the keys; default ``block_ids`` (needs Lq == Lk).
        block_causal: with block ids, allow ``kv_block <= q_block`` (block-causal) instead of ``==`` (block-diagonal).
        return_attn: also return the (B, H, Lq, Lk) attention weights.

    Returns:
        (B, H, Lq, Dv), and the weights with ``return_attn``. A query row with no allowed key gives zero weights and
        a zero output (what SDPA returns on CPU), not NaN.
    """
    check_qkv(q, k, v)
    k, v = expand_kv_heads(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = build_attn_mask(
        q, k, is_causal=is_causal, attn_mask=attn_mask, block_ids=block_ids, kv_block_ids=kv_block_ids,
        block_causal=block_causal,
    )  # fmt: skip
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is None:
        weights = logits.softmax(dim=-1)
    else:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        # Safe softmax: a row with every key masked would be 0/0. Giving it finite logits first and zeroing its
        # weights after keeps NaN out of the output and out of the gradients; other rows are untouched (bitwise).
        empty = (logits == float("-inf")).all(dim=-1, keepdim=True)
        weights = logits.masked_fill(empty, 0.0).softmax(dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(weights, v)  # (B, H, Lq, Dv)
    return (out, weights) if return_attn else out
