"""Fast attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / fused
CPU kernels, picked by PyTorch for the device and dtype).

Same signature as :func:`ratelab.kernels.attention.ref.attention_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratelab.kernels.attention.mask import build_attn_mask, check_qkv, expand_kv_heads


def attention_sdpa(
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
) -> torch.Tensor:
    """The contract of :func:`~ratelab.kernels.attention.ref.attention_ref`, without the weights. (B, H, Lq, Dv).

    Raises:
        ValueError: ``return_attn=True`` (fused kernels never materialize the weights; use the reference).
    """
    if return_attn:
        raise ValueError("attention_sdpa cannot return attention weights (fused kernels never form them); "
                         "use attention_ref or attention(..., return_attn=True)")
    check_qkv(q, k, v)
    k, v = expand_kv_heads(q, k, v)
    if is_causal and attn_mask is None and block_ids is None and q.shape[-2] == k.shape[-2]:
        # SDPA's own causal flag (no mask tensor, the flash path); only valid when Lq == Lk (it aligns top-left).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = build_attn_mask(
        q, k, is_causal=is_causal, attn_mask=attn_mask, block_ids=block_ids, kv_block_ids=kv_block_ids,
        block_causal=block_causal,
    )  # fmt: skip
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
