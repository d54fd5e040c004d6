"""Reference scaled dot-product attention: the textbook formula, written out so it can be read and diffed."""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, return_weights: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over the key axis.

    Args:
        q, k, v: (B, H, N, p) queries, keys and values (in MSSA all three are the same tensor U_k^T z).
        scale: logit scale, 1/sqrt(p) in CRATE.
        return_weights: also return the (B, H, N, N) attention matrix (rows sum to one).
    """
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, N, N)
    weights = logits.softmax(dim=-1)
    out = torch.matmul(weights, v)  # (B, H, N, p)
    return (out, weights) if return_weights else out
