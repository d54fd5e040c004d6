"""Fast attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / fused
CPU kernels, picked by PyTorch for the device and dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Same contract as :func:`ratelab.kernels.attention.ref.attention_ref` without the weights. (B, H, N, p)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)
