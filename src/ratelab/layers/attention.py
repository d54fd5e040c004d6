"""Multi-head self-attention through :mod:`ratelab.kernels.attention` (ref and fast share one signature).

timm's ``Attention`` has the same ``qkv`` / ``proj`` key names, but it calls SDPA itself (no causal flag, block mask
or reference twin); this module routes every call through ratelab's kernel so that ``return_attn`` and the masks of
the kernel (causal with KV cache, block-diagonal, block-causal) are available to every family that uses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ratelab.kernels.attention import BACKENDS, attention

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention. (B, L, D) -> (B, L, D).

    Args:
        dim: token width D (``num_heads`` must divide it).
        num_heads: heads H.
        qkv_bias: bias of the fused q/k/v projection.
        proj_bias: bias of the output projection.
        is_causal: every call is causal (a decoder); masks given to :meth:`forward` are combined with it.

    Attributes:
        attn_backend: ``"auto"`` / ``"sdpa"`` (fused) or ``"ref"`` (explicit softmax), per module instance.
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True, is_causal: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SelfAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_backend = "auto"

    def set_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.attn_backend = backend

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        block_ids: torch.Tensor | None = None,
        block_causal: bool = False,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) -> (B, L, D), and the (B, H, L, L) weights with ``return_attn`` (reference path).

        Mask arguments as :func:`ratelab.kernels.attention.attention`.
        """
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        res = attention(
            q, k, v, is_causal=self.is_causal, attn_mask=attn_mask, block_ids=block_ids, block_causal=block_causal,
            backend=self.attn_backend, return_attn=return_attn,
        )  # fmt: skip
        out, w = res if return_attn else (res, None)
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))
        return (out, w) if return_attn else out
