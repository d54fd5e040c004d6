"""VAR: next-scale prediction over a multi-scale residual token pyramid.

Paper: Tian, Jiang, Yuan, Peng, Wang, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", NeurIPS 2024 (arXiv 2404.02905). Architecture, initialization and sampling follow the official code
(FoundationVision/VAR ``models/var.py``, ``basic_var.py``, ``helpers.py``, ``models/__init__.py``), re-written:

    sos        = class_emb[y] + pos_start                         position 0 (p_1 = 1)
    x_{1..}    = word_embed(x_BLCv_wo_first_l)                    Linear(C_vae -> C) of the downsampled f_hat
    x         += lvl_embed[scale(t)] + pos_embed[t]                every position
    block      : (g1, g2, s1, s2, b1, b2) = ada_lin(SiLU(c))      6 chunks, in this order
                 x += DropPath(g1 * Attn(LN(x)(1 + s1) + b1))      block-causal over scales
                 x += DropPath(g2 * MLP(LN(x)(1 + s2) + b2))       GELU-tanh, hidden 4C
    logits     = head(LN(x)(1 + s) + b),  (s, b) = head_adaln(SiLU(c))

Attention: ``qkv`` without bias plus a learned q-bias, a learned v-bias and a fixed zero k-bias; with
``attn_l2_norm`` q and k are L2-normalized per head and q is scaled by ``exp(min(logit_scale_h, ln 100))`` (init
ln 4, softmax scale 1), otherwise the scale is ``0.25 / sqrt(head_dim)``. The block-causal mask is the block form of
:func:`ratelab.kernels.attention.attention` (``block_ids`` = scale of each token, ``block_causal=True``); generation
uses a per-layer KV cache instead (a query of scale k sees the cache of scales < k and its own scale: no mask).

Sizes (``var_d12 ... var_d30``): C = 64 depth, heads = depth, drop-path 0.1 depth / 24, LayerNorm eps 1e-6;
133M / 310M / 601M / 1.03B / 2.01B parameters at 1000 classes, V = 4096, C_vae = 32.

Deviations from the official code, all deliberate:

* Label dropout (the null class with probability ``cond_drop_rate``) only in ``train()`` mode; the official
  ``forward`` also drops labels in eval mode, which makes a teacher-forced validation loss random.
* The buffers ``attn_bias_for_masking``, ``lvl_1L`` and ``attn.zero_k_bias`` are not saved (recomputed from
  ``patch_nums``); the converter checks the official ones and drops them.
* No shared AdaLN (``saln``, the 512 px d36 model only), no progressive training (``prog_si``), no fused kernels.
* Generation needs a *codec* (the tokenizer's codebook and phi update, see :mod:`ratelab.models.var.sampling`),
  is seeded by a private generator, and skips the CFG batch doubling when ``cfg == 0`` (exact: the unconditional
  half then has weight 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ratelab.core.errors import ConfigError
from ratelab.core.registry import register_model
from ratelab.kernels.attention import attention
from ratelab.layers.intermediates import check_output_fmt, pack_intermediates, resolve_indices
from ratelab.models.var.config import VAR_VARIANTS, VARConfig

__all__ = ["VAR", "AdaLNHead", "ScaleAttention", "VARBlock", "ScaleAR", "modulate"]


def modulate(x: torch.Tensor, ln: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``LN(x) (1 + scale) + shift`` with (B, 1, C) scale/shift broadcast over tokens."""
    return ln(x) * (1 + scale) + shift


class ScaleAttention(nn.Module):
    """VAR's self-attention: q/v biases, a zero k bias, optional L2-normalized q/k. (B, L, C) -> (B, L, C).

    The mask is given per call as scale ids (``block_ids``) with ``block_causal`` (VAR) or block-diagonal (M-VAR);
    ``kv_cache`` (a dict, filled in place) makes the call attend to the keys of earlier calls too.
    """

    def __init__(self, dim: int, num_heads: int, *, attn_l2_norm: bool, backend: str = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        # Fixed zeros (a k bias would cancel in the softmax); kept as a buffer so the bias is one cat away.
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        if attn_l2_norm:
            self.logit_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_logit_scale = math.log(100.0)
        self.scale = 1.0 if attn_l2_norm else 0.25 / math.sqrt(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, C) -> q, k, v each (B, H, L, head_dim), normalized and scaled when ``attn_l2_norm``."""
        B, L, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.logit_scale.clamp(max=self.max_logit_scale).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        block_ids: torch.Tensor | None = None,
        block_causal: bool = False,
        kv_cache: dict[str, torch.Tensor] | None = None,
        return_attn: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv_heads(x)
        if kv_cache is not None:
            if "k" in kv_cache:
                k = torch.cat([kv_cache["k"], k], dim=2)
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
        causal = block_causal and block_ids is not None  # cached keys are all of earlier scales: no mask then
        out = attention(q, k, v, scale=self.scale, block_ids=block_ids, block_causal=causal, backend=self.backend,
                        return_attn=return_attn)
        if return_attn:
            out, w = out
            return self.proj(out.transpose(1, 2).flatten(2)), w
        return self.proj(out.transpose(1, 2).flatten(2))


def _mlp(dim: int, ratio: float) -> nn.Module:
    from timm.layers import Mlp  # deferred: `import timm` costs seconds and every create_model would pay it

    return Mlp(dim, round(dim * ratio), act_layer=lambda: nn.GELU(approximate="tanh"))  # keys fc1, fc2


def _drop_path(p: float) -> nn.Module:
    from timm.layers import DropPath

    return DropPath(p) if p > 0 else nn.Identity()


class VARBlock(nn.Module):
    """AdaLN self-attention block: 6 modulation chunks (g1, g2, s1, s2, b1, b2). (B, L, C), (B, C) -> (B, L, C)."""

    n_chunks = 6

    def __init__(self, cfg: VARConfig, drop_path: float = 0.0, *, backend: str = "auto") -> None:
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.ln = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Linear(C, self.n_chunks * C)  # applied to SiLU(cond)
        self.attn = ScaleAttention(C, cfg.num_heads, attn_l2_norm=cfg.attn_l2_norm, backend=backend)
        self.mlp = _mlp(C, cfg.mlp_ratio)
        self.drop_path = _drop_path(drop_path)

    def chunks(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ada_lin(F.silu(cond)).view(-1, 1, self.n_chunks, self.C).unbind(2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, *, block_ids: torch.Tensor | None = None,
                kv_cache: dict[str, torch.Tensor] | None = None, return_attn: bool = False) -> Any:
        g1, g2, s1, s2, b1, b2 = self.chunks(cond)
        a = self.attn(modulate(x, self.ln, s1, b1), block_ids=block_ids, block_causal=True, kv_cache=kv_cache,
                      return_attn=return_attn)
        a, w = a if return_attn else (a, None)
        x = x + self.drop_path(a * g1)
        x = x + self.drop_path(self.mlp(modulate(x, self.ln, s2, b2)) * g2)
        return (x, w) if return_attn else x


class AdaLNHead(nn.Module):
    """The class-conditioned LayerNorm before the head: ``LN(x)(1 + s) + b``, ``(s, b) = proj(SiLU(c))``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.C = dim
        self.ln = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        s, b = self.proj(F.silu(cond)).view(-1, 1, 2, self.C).unbind(2)
        return modulate(x, self.ln, s, b)


class ScaleAR(nn.Module):
    """What VAR and M-VAR share: the scale schedule, embeddings, head, init, loss inputs and the sampling loop.

    Subclasses set ``block_type`` (called as ``blk(x, cond, block_ids=..., return_attn=...)`` on the whole
    sequence) and implement the three generation hooks :meth:`gen_begin`, :meth:`gen_blocks`, :meth:`gen_end`.
    """

    cfg: VARConfig
    block_type: type[nn.Module] = VARBlock

    def __init__(self, cfg: VARConfig, *, backend: str = "auto", **block_kw: Any) -> None:
        super().__init__()
        self.cfg = cfg
        C, pn = cfg.embed_dim, cfg.patch_nums
        self.num_classes, self.vocab_size, self.c_vae = cfg.num_classes, cfg.vocab_size, cfg.c_vae
        self.patch_nums = tuple(pn)
        self.L = sum(p * p for p in pn)
        self.first_l = pn[0] ** 2
        self.begin_ends = []
        cur = 0
        for p in pn:
            self.begin_ends.append((cur, cur + p * p))
            cur += p * p
        self.register_buffer("scale_ids", torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]),
                             persistent=False)

        self.word_embed = nn.Linear(cfg.c_vae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # row num_classes: the null class (CFG)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_embed = nn.Parameter(torch.empty(1, self.L, C))  # one learned vector per position (pos_1LC)
        self.lvl_embed = nn.Embedding(len(pn), C)
        dpr = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            [self.block_type(cfg, dpr[i], backend=backend, **block_kw) for i in range(cfg.depth)]
        )
        self.head_adaln = AdaLNHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.init_weights()

    # ---- init (var.py init_weights, with the builder's automatic std) ------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: trunc-normal std sqrt(1/(3C)) on every Linear/Embedding and the position tables, zero
        biases; head x init_head, head AdaLN x init_adaln; attn.proj and fc2 / sqrt(2 depth); block AdaLN rows
        ``[0, 2C)`` x init_adaln_gamma and the rest x init_adaln. Mamba-2 convs (M-VAR) get trunc-normal std 0.02.

        The row split is VAR's (g1, g2 first); M-VAR's 9-chunk blocks inherit it unchanged, so their third gate g3
        is scaled like the shifts and scales (the official quirk, kept to match its training dynamics).
        """
        cfg, C = self.cfg, self.cfg.embed_dim
        std = math.sqrt(1 / (3 * C))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Conv1d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_embed):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_adaln.proj.weight.mul_(cfg.init_adaln)
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
            blk.mlp.fc2.weight.div_(math.sqrt(2 * cfg.depth))
            blk.ada_lin.weight[2 * C:].mul_(cfg.init_adaln)
            blk.ada_lin.weight[: 2 * C].mul_(cfg.init_adaln_gamma)

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C): level + position embedding of every position."""
        return self.lvl_embed(self.scale_ids)[None] + self.pos_embed

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cfg.cond_drop_rate <= 0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.cfg.cond_drop_rate
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def embed(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing input: ``(x (B, L, C), cond (B, C))``."""
        B = labels.shape[0]
        want = (B, self.L - self.first_l, self.c_vae)
        if x_BLCv_wo_first_l.ndim != 3 or tuple(x_BLCv_wo_first_l.shape) != want:
            raise ValueError(f"x_BLCv_wo_first_l must have shape {want} (B, L - p_1^2, C_vae) for patch_nums "
                             f"{self.patch_nums}, got {tuple(x_BLCv_wo_first_l.shape)}")
        cond = self.class_emb(labels)
        sos = cond[:, None].expand(B, self.first_l, -1) + self.pos_start
        x = torch.cat([sos, self.word_embed(x_BLCv_wo_first_l.to(cond.dtype))], dim=1)
        return x + self.lvl_pos(), cond

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_adaln(h, cond))

    def _check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.pos_embed.device).long()
        if labels.ndim != 1:
            raise ValueError(f"labels must be a (B,) tensor of class ids, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}] ({self.num_classes} = the null class), "
                             f"got min {int(labels.min())} max {int(labels.max())}")
        return labels

    def forward_features(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, C) after the last block, for these labels (no label dropout here)."""
        x, cond = self.embed(self._check_labels(labels), x_BLCv_wo_first_l)
        for blk in self.blocks:
            x = blk(x, cond, block_ids=self.scale_ids)
        return x

    def forward_head(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) from :meth:`forward_features`' hidden states and the same labels."""
        return self.logits(h, self.class_emb(self._check_labels(labels)))

    def forward_intermediates(
        self,
        labels: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        return_attn: bool = False,
    ) -> Any:
        """Block outputs (timm's convention) for the teacher-forcing input of :meth:`forward`.

        ``indices``: blocks to keep (``None`` all, n the last n, a list those); ``norm``: apply the head's
        class-conditioned LayerNorm; ``output_fmt``: ``"NLC"`` only, (B, L, C) in sequence order (coarse to fine);
        ``return_attn``: each kept block's (B, H, L, L) attention (explicit softmax path; block-causal for VAR,
        block-diagonal for M-VAR). Returns ``(final, intermediates[, attn])`` or the list alone with
        ``intermediates_only``; ``final`` is :meth:`forward_features`' output.
        """
        check_output_fmt(output_fmt, ("NLC",), type(self).__name__)
        take = resolve_indices(len(self.blocks), indices, what="block")
        x, cond = self.embed(self._check_labels(labels), x_BLCv_wo_first_l)
        inter: list[torch.Tensor] = []
        attn: list[torch.Tensor] | None = [] if return_attn else None
        for i, blk in enumerate(self.blocks):
            if attn is not None and i in take:
                x, a = blk(x, cond, block_ids=self.scale_ids, return_attn=True)
                attn.append(a)
            else:
                x = blk(x, cond, block_ids=self.scale_ids)
            if i in take:
                inter.append(self.head_adaln(x, cond) if norm else x)
        return pack_intermediates(x, inter, attn, intermediates_only=intermediates_only)

    def forward(self, labels: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V): position t predicts the token of its own scale.

        Args:
            labels: (B,) class ids (``num_classes`` = the null class); replaced by the null class with probability
                ``cond_drop_rate`` in train mode.
            x_BLCv_wo_first_l: (B, L - p_1^2, C_vae) the tokenizer's ``idx_to_var_input``.
        """
        labels = self.drop_labels(self._check_labels(labels))
        return self.forward_head(self.forward_features(labels, x_BLCv_wo_first_l), labels)

    # ---- generation hooks (see ratelab.models.var.sampling.generate) ------------------------------------------
    def gen_begin(self, batch: int, **kw: Any) -> Any:
        raise NotImplementedError

    def gen_blocks(self, x: torch.Tensor, cond: torch.Tensor, si: int, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def gen_end(self, state: Any) -> None:
        return None

    @torch.no_grad()
    def generate(self, labels: torch.Tensor | int | None = None, *, batch_size: int | None = None, **kw: Any):
        """Class-conditional (or unconditional) sampling; see :func:`ratelab.models.var.sampling.generate`."""
        from ratelab.models.var.sampling import generate

        return generate(self, labels, batch_size=batch_size, **kw)

    def extra_repr(self) -> str:
        return f"depth={self.cfg.depth}, embed_dim={self.cfg.embed_dim}, patch_nums={self.patch_nums}, L={self.L}"


class VAR(ScaleAR):
    """VAR transformer (see the module docstring). ``forward(labels, x_BLCv_wo_first_l) -> (B, L, V)``."""

    block_type = VARBlock

    @classmethod
    def checkpoint_filter_fn(cls, state_dict: dict[str, torch.Tensor], model: VAR) -> dict[str, torch.Tensor]:
        """Official (FoundationVision/VAR) or ratelab layout -> this model's keys."""
        from ratelab.models.var.convert import convert_var_checkpoint

        return convert_var_checkpoint(state_dict, model)

    def gen_begin(self, batch: int, **kw: Any) -> list[dict[str, torch.Tensor]]:
        if kw:
            raise ConfigError(f"VAR generation takes no options {sorted(kw)} (state_carry is M-VAR's)")
        return [{} for _ in self.blocks]  # one KV cache per layer

    def gen_blocks(self, x: torch.Tensor, cond: torch.Tensor, si: int, state: Any) -> torch.Tensor:
        for blk, cache in zip(self.blocks, state):
            x = blk(x, cond, kv_cache=cache)
        return x

    def gen_end(self, state: Any) -> None:
        for cache in state:
            cache.clear()


def build_config(base: VARConfig, **overrides: Any) -> VARConfig:
    """``base`` with overrides; a new ``depth`` re-derives width (64 depth), heads and drop-path like the builder
    unless those are given too."""
    import dataclasses

    if "patch_nums" in overrides and overrides["patch_nums"] is not None:
        overrides["patch_nums"] = tuple(int(p) for p in overrides["patch_nums"])
    if "depth" in overrides:
        d = overrides["depth"]
        overrides.setdefault("embed_dim", 64 * d)
        overrides.setdefault("num_heads", d)
        overrides.setdefault("drop_path", 0.1 * d / 24)
    known = {f.name for f in dataclasses.fields(base)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown {type(base).__name__} options {bad}; known: {sorted(known)}")
    try:
        return dataclasses.replace(base, **overrides)
    except ConfigError:
        raise
    except ValueError as e:  # the config's own check, naming the field
        raise ConfigError(f"{type(base).__name__}: {e}") from e


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    runtime = {k: kwargs.pop(k) for k in ("backend",) if k in kwargs}
    kwargs.pop("pretrained_cfg", None)
    for k in ("img_size", "in_chans"):  # create_model passes these for image models; VAR has no image input
        if kwargs.get(k) is not None:
            raise ConfigError(f"VAR/M-VAR models take no {k!r} (the tokenizer sets the resolution via patch_nums)")
        kwargs.pop(k, None)
    return kwargs, runtime


def _with_model_args(model: ScaleAR, arch: dict[str, Any]) -> ScaleAR:
    # What rebuilds the architecture through the entry point (JSON-able; num_classes included, as save_model adds it).
    model.model_args = {**{k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
                        "num_classes": model.num_classes}
    return model


def _create_var(variant: str, **kwargs: Any) -> VAR:
    arch, runtime = _split_kwargs(kwargs)
    return _with_model_args(VAR(build_config(VAR_VARIANTS[variant], **arch), **runtime), arch)


@register_model
def var_d12(**kwargs: Any) -> VAR:
    return _create_var("d12", **kwargs)


@register_model
def var_d16(**kwargs: Any) -> VAR:
    return _create_var("d16", **kwargs)


@register_model
def var_d20(**kwargs: Any) -> VAR:
    return _create_var("d20", **kwargs)


@register_model
def var_d24(**kwargs: Any) -> VAR:
    return _create_var("d24", **kwargs)


@register_model
def var_d30(**kwargs: Any) -> VAR:
    return _create_var("d30", **kwargs)


def scale_ids_for(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) scale index of every position for a schedule."""
    return torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
