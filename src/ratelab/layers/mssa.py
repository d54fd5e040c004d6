"""Multi-head subspace self-attention (MSSA), the compression step of the white-box transformers (CRATE and its
descendants CRATE-alpha and CRATE-MAE): one bias-free projection U_k^T z per head is used as query, key and value.

Papers: Yu et al., NeurIPS 2023 (arXiv 2306.01129) and arXiv 2311.13110. The layout (``qkv`` = [U_1 .. U_K]^T,
``proj`` = W_out with optional bias) is the one ratelab's CRATE checkpoints and official-checkpoint converters use.
timm has no shared-q/k/v attention, so this layer is ratelab's own.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ratelab.kernels.attention import attention

__all__ = ["MSSA"]


class MSSA(nn.Module):
    """Multi-head subspace self-attention. (B, N, d) -> (B, N, d).

    Args:
        dim: token width d.
        num_heads: subspaces K.
        head_dim: subspace dimension p.
        out_bias: bias of the output map W_out (CRATE: yes; CRATE-alpha: no).

    Attributes:
        attn_backend: ``"auto"`` / ``"sdpa"`` (fused) or ``"ref"`` (explicit softmax).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, out_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, num_heads * head_dim, bias=False)  # U = [U_1 .. U_K]^T, shared q = k = v
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=out_bias)
        self.attn_backend = "auto"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """U_k^T z for every head: (B, N, d) -> (B, K, N, p)."""
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, d) -> (B, N, d), and the (B, K, N, N) weights with ``return_attn`` (explicit softmax path)."""
        w = self.project(x)
        if return_attn:
            out, attn = attention(w, w, w, scale=self.scale, return_attn=True)
        else:
            out = attention(w, w, w, scale=self.scale, backend=self.attn_backend)
        B, K, N, p = out.shape
        out = self.proj(out.transpose(1, 2).reshape(B, N, K * p))
        return (out, attn) if return_attn else out
