"""Attention dispatch: ``backend="auto"|"sdpa"|"ref"``.

``auto`` takes SDPA; asking for the attention weights always goes through the reference path, because fused
kernels never materialize them. The choice is made per call, so tests can flip it on one module instance.
"""

from __future__ import annotations

import torch

from ratelab.kernels.attention.fast import attention_sdpa
from ratelab.kernels.attention.ref import attention_ref

BACKENDS = ("auto", "sdpa", "ref")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    backend: str = "auto",
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale) v for (B, H, N, p) inputs; see :func:`attention_ref`."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if return_weights or backend == "ref":
        return attention_ref(q, k, v, scale=scale, return_weights=return_weights)
    return attention_sdpa(q, k, v, scale=scale)


__all__ = ["BACKENDS", "attention", "attention_ref", "attention_sdpa"]
