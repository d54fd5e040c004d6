"""A small causal transformer that classifies in context (GPT-style, pre-LayerNorm).

Input: a sequence of (x, y) pairs, ``x`` (B, n, d) real vectors and ``y`` (B, n) label tokens in
``[0, vocab_size)``. The pairs are interleaved into 2n tokens ``x_1, y_1, x_2, y_2, ...``: an x token is a linear
map of the vector, a y token a row of an embedding table (plus, with ``label_sees_input``, a second linear map of
the x it labels), and both get a learned position embedding. Causal
self-attention means the output at the token of ``x_i`` sees ``x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i`` only, so it
predicts ``y_i`` from ``i - 1`` demonstrations: one sequence gives predictions at 0, 1, ..., n - 1 shots, like an
LM scoring a k-shot prompt at the answer position.

Outputs are logits over the whole label vocabulary at the x positions, (B, n, vocab_size). A classification task
uses K of those words; :meth:`ICLGPT.label_logits` restricts the logits to them (the analogue of an LM harness
keeping the verbalizer tokens and renormalizing over them: softmax of the restricted logits).

Attention runs through :func:`ratelab.kernels.attention.attention` with ``is_causal=True``: SDPA (backend
``"sdpa"``/``"auto"``) or the explicit masked softmax (backend ``"ref"``, the readable twin the tests compare
against), via :class:`ratelab.layers.attention.SelfAttention`.

Model API (docs/models.md, "Model API"): the input is the pair ``(x, y)``, so every method takes both:
``forward_features(x, y)`` -> (B, 2n, D) last-block hidden states BEFORE the final LayerNorm (as every family of the
library), ``forward_head(h)`` applies the norm and the head at the x positions, ``forward_intermediates(x, y, ...)``
follows timm's convention over the 2n tokens (``"NLC"`` only; there are no prefix tokens). The MLP stays an
``nn.Sequential`` (keys ``mlp.0`` / ``mlp.2``) rather than timm's ``Mlp`` (``mlp.fc1`` / ``mlp.fc2``), so saved
checkpoints keep loading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.builder import build_model_with_cfg
from ratelab.core.registry import register_model
from ratelab.kernels.attention import BACKENDS
from ratelab.layers.attention import SelfAttention
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices
from ratelab.models.icl_gpt.config import ICL_GPT_VARIANTS, ICLGPTConfig

__all__ = ["ICLGPT", "ICLGPTBlock"]


class ICLGPTBlock(nn.Module):
    """Pre-LN block: x + attn(LN x), then + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, is_causal=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, *, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> (B, T, D), and the (B, H, T, T) causal attention with ``return_attn``."""
        if return_attn:
            a, attn = self.attn(self.norm1(x), return_attn=True)
            x = x + a
            return x + self.mlp(self.norm2(x)), attn
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ICLGPT(nn.Module):
    """Causal transformer over interleaved (x, y) pairs; see the module docstring.

    Args:
        cfg: architecture.

    Attributes:
        cfg: the :class:`ICLGPTConfig`.
        vocab_size: output width (number of label words).
        num_features: hidden width D.
        model_args: set by the entry points (see :func:`ratelab.core.builder.build_model_with_cfg`).
    """

    num_prefix_tokens = 0

    def __init__(self, cfg: ICLGPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.num_features = D = cfg.embed_dim
        self.x_embed = nn.Linear(cfg.input_dim, D)
        self.y_embed = nn.Embedding(cfg.vocab_size, D)
        # Separate from x_embed so that a label token and an input token never look alike.
        self.y_input_embed = nn.Linear(cfg.input_dim, D) if cfg.label_sees_input else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 2 * cfg.max_pairs, D))
        self.blocks = nn.ModuleList(ICLGPTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.vocab_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def set_attn_backend(self, backend: str) -> None:
        """``"auto"``/``"sdpa"`` (fused ``scaled_dot_product_attention``) or ``"ref"`` (explicit masked softmax)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        for blk in self.blocks:
            blk.attn.set_backend(backend)

    def _tokens(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.cfg.input_dim:
            raise ValueError(f"ICLGPT: x must be (B, n, {self.cfg.input_dim}), got {tuple(x.shape)}")
        B, n, _ = x.shape
        if y.ndim != 2 or y.shape[0] != B or y.shape[1] not in (n, n - 1):
            raise ValueError(f"ICLGPT: y must be (B, n) or (B, n - 1) label tokens for x {tuple(x.shape)}, "
                             f"got {tuple(y.shape)}")
        if n > self.cfg.max_pairs:
            raise ValueError(f"ICLGPT: {n} pairs exceed max_pairs={self.cfg.max_pairs}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.vocab_size):
            raise ValueError(f"ICLGPT: label tokens must be in [0, {self.vocab_size}), got [{int(y.min())}, "
                             f"{int(y.max())}]")
        # The label after the last x is never seen by any x position (causality), so a missing one is padded.
        y_full = F.pad(y, (0, n - y.shape[1]))
        y_tok = self.y_embed(y_full.long())
        if self.y_input_embed is not None:
            y_tok = y_tok + self.y_input_embed(x)
        tok = torch.stack([self.x_embed(x), y_tok], dim=2).reshape(B, 2 * n, -1)
        return tok + self.pos_embed[:, : 2 * n]

    def forward_features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, n, d) inputs and (B, n) or (B, n - 1) label tokens -> (B, 2n, D) last-block hidden states (x_1, y_1,
        x_2, ...), before the final LayerNorm (:meth:`forward_head` applies it)."""
        h = self._tokens(x, y)
        for blk in self.blocks:
            h = blk(h)
        return h

    def forward_head(self, h: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 2n, D) hidden states -> (B, n, vocab_size) logits at the x positions (or the normalized states)."""
        h = self.norm(h)[:, 0::2]
        return h if pre_logits else self.head(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logits over the label vocabulary at every x position: (B, n, vocab_size); row i has seen i pairs."""
        return self.forward_head(self.forward_features(x, y))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        return_attn: bool = False,
    ) -> Any:
        """Block outputs without hooks, timm's convention; the input is the ``(x, y)`` pair of :meth:`forward`.

        Args:
            x: (B, n, d) input vectors.
            y: (B, n) or (B, n - 1) label tokens.
            indices: blocks to keep: ``None`` all, an int n the last n, a list those (negative from the end).
            norm: apply the final LayerNorm to each kept block's hidden states.
            output_fmt: ``"NLC"`` only: (B, 2n, D), all tokens in sequence order x_1, y_1, x_2, ...
            intermediates_only: return only the intermediates (and the attention maps with ``return_attn``).
            return_attn: also return each kept block's (B, H, 2n, 2n) causal attention (explicit softmax path).

        Returns:
            ``(final, intermediates)``, ``(final, intermediates, attn)`` with ``return_attn``, or the list alone with
            ``intermediates_only``. ``final`` (B, 2n, D) is what :meth:`forward_features` returns.
        """
        check_output_fmt(output_fmt, ("NLC",), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices, what="block")
        h = self._tokens(x, y)
        inter: list[torch.Tensor] = []
        attn: list[torch.Tensor] | None = [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            if return_attn and i in take:
                h, a = blk(h, return_attn=True)
                attn.append(a)
            else:
                h = blk(h)
            if i in take:
                inter.append(self.norm(h) if norm else h)
        return pack_intermediates(h, inter, attn, intermediates_only=intermediates_only)

    def label_logits(self, x: torch.Tensor, y: torch.Tensor, label_words: torch.Tensor) -> torch.Tensor:
        """Logits restricted to a task's K label words: (B, n, K); column c is ``label_words[c]``.

        Args:
            x, y: as in :meth:`forward`.
            label_words: (K,) or (B, K) token ids (distinct per row).
        """
        logits = self(x, y)
        lw = label_words.to(logits.device).long()
        if lw.ndim == 1:
            return logits[..., lw]
        if lw.ndim != 2 or lw.shape[0] != logits.shape[0]:
            raise ValueError(f"label_words must be (K,) or (B, K) with B={logits.shape[0]}, got {tuple(lw.shape)}")
        return torch.gather(logits, 2, lw[:, None, :].expand(-1, logits.shape[1], -1))


def _create(variant: str, **kwargs: Any) -> ICLGPT:
    if "num_classes" in kwargs:  # create_model's generic classifier-width argument = the label vocabulary here
        nc = kwargs.pop("num_classes")
        if "vocab_size" in kwargs and kwargs["vocab_size"] != nc:
            raise ValueError(f"icl_gpt: num_classes={nc} and vocab_size={kwargs['vocab_size']} disagree")
        kwargs["vocab_size"] = nc
    return build_model_with_cfg(ICLGPT, ICLGPTConfig, ICL_GPT_VARIANTS[variant], **kwargs)


@register_model
def icl_gpt_tiny(**kwargs: Any) -> ICLGPT:
    """2 x 32 causal transformer for synthetic in-context classification."""
    return _create("tiny", **kwargs)


@register_model
def icl_gpt_small(**kwargs: Any) -> ICLGPT:
    """3 x 64 causal transformer for synthetic in-context classification."""
    return _create("small", **kwargs)


@register_model
def icl_gpt_base(**kwargs: Any) -> ICLGPT:
    """4 x 128 causal transformer for synthetic in-context classification."""
    return _create("base", **kwargs)
