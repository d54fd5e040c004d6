"""Next-scale sampling for VAR and M-VAR: CFG ramp, top-k / top-p, batch doubling, the residual f_hat update.

The loop of the official ``autoregressive_infer_cfg`` (FoundationVision/VAR ``models/var.py``, ``helpers.py``; the
same in OliverRensu/MVAR), re-written. At scale k (0-based ``si``, K scales, ``r = si / (K - 1)``):

1. run the blocks on this scale's tokens only, for the batch doubled with the null class (CFG);
2. ``t = cfg r``: ``logits = (1 + t) logits_cond - t logits_uncond`` (no guidance at 1x1, ``cfg`` at the last);
3. top-k (drop logits below the k-th largest), top-p (sort ascending, drop the tokens whose cumulative softmax mass
   is <= 1 - p, never the argmax), one multinomial draw per token;
4. ``f_hat += phi_k(Up(e[idx]))`` and the next input ``word_embed(Down(f_hat, p_{k+1}))`` + level/position
   embedding, duplicated for CFG (the *codec*'s job: :class:`ResidualCodec`).

``more_smooth`` (visualisation only): Gumbel-softmax with tau = max(0.27 (1 - 0.95 r), 0.005) on the top-k / top-p
filtered logits x (1 + r), and the soft code ``softmax @ E``.

Deviations: ``cfg == 0`` skips the doubled batch (exact: the unconditional half has weight 0); the seed drives a
private ``torch.Generator`` on the model's device; ``labels`` may mix classes and the null class (unconditional rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ratelab.core.errors import ConfigError

__all__ = [
    "Generation",
    "ResidualCodec",
    "ScaleCodec",
    "codec_from_tokenizer",
    "filter_logits",
    "gumbel_softmax",
    "generate",
    "sample_top_k_top_p",
    "top_k_top_p_mask",
]


# ---- top-k / top-p --------------------------------------------------------------------------------------------
def top_k_top_p_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Boolean mask (same shape as ``logits`` (..., V)) of the tokens that REMAIN after top-k then top-p.

    top-k keeps every logit >= the k-th largest (ties at the threshold stay, as in the official code); top-p sorts
    ascending and removes the tokens whose cumulative probability (after top-k) is <= 1 - p, always keeping the
    most likely one. ``top_k <= 0`` / ``top_p <= 0`` disable a filter.
    """
    V = logits.shape[-1]
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k > 0:
        k = min(int(top_k), V)
        kth = logits.topk(k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        keep &= logits >= kth
    if top_p > 0:
        masked = logits.masked_fill(~keep, float("-inf"))
        sorted_logits, order = masked.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep &= ~drop
    return keep


def sample_top_k_top_p(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of ``logits`` (B, l, V) from the softmax restricted by :func:`top_k_top_p_mask`: (B, l)."""
    return _draw(filter_logits(logits, top_k, top_p), generator)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits`` with -inf outside :func:`top_k_top_p_mask` (what the official sampler leaves in its logits)."""
    return logits.masked_fill(~top_k_top_p_mask(logits, top_k, top_p), float("-inf"))


def _draw(masked: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    B, l, V = masked.shape
    probs = masked.float().softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the last axis, drawing the noise from ``generator``."""
    g = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + g) / tau).softmax(dim=-1)


# ---- codec: codebook + residual update -----------------------------------------------------------------------
class ScaleCodec(Protocol):
    """What generation needs from a tokenizer: codebook rows and the next-scale update."""

    patch_nums: Sequence[int]

    def codebook(self) -> torch.Tensor:  # (V, C_vae)
        ...

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` (B, C_vae, p_si, p_si) the codes of scale ``si`` -> ``(f_hat, next (B, C_vae, p_{si+1}, ..)``;
        at the last scale ``next`` is ``f_hat``."""
        ...


class ResidualCodec:
    """VAR's residual update from a codebook and optional phi convs (the quantizer's ``get_next_autoregressive_input``).

    Args:
        embedding: (V, C_vae) codebook.
        patch_nums: the scale sides.
        phi: ``phi(si, h) -> h`` applied to the upsampled codes of scale ``si`` (``None``: the identity, i.e.
            ``quant_resi = 0``), e.g. the tokenizer's partially shared convs.
    """

    def __init__(self, embedding: torch.Tensor, patch_nums: Sequence[int],
                 phi: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.embedding = embedding
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.phi = phi

    def codebook(self) -> torch.Tensor:
        return self.embedding

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, H = len(self.patch_nums), self.patch_nums[-1]
        if si != K - 1:
            h = F.interpolate(h, size=(H, H), mode="bicubic")
        if self.phi is not None:
            h = self.phi(si, h)
        f_hat = f_hat + h
        if si == K - 1:
            return f_hat, f_hat
        p = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(p, p), mode="area")


class _TokenizerCodec:
    """Adapter for a tokenizer's quantizer: ratelab's ``next_var_input(si, f_hat, h)`` or the official
    ``get_next_autoregressive_input(si, K, f_hat, h)``."""

    def __init__(self, quant: Any) -> None:
        self.quant = quant
        self.patch_nums = tuple(quant.patch_nums)

    def codebook(self) -> torch.Tensor:
        return self.quant.embedding.weight

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.quant, "next_var_input"):
            return self.quant.next_var_input(si, f_hat, h)
        return self.quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h)


def codec_from_tokenizer(tok: Any) -> ScaleCodec:
    """The :class:`ScaleCodec` of a tokenizer: a codec passes through; otherwise the tokenizer's ``quantize`` (or
    the tokenizer itself) must have an ``embedding`` codebook, ``patch_nums`` and ``next_var_input`` (ratelab's
    :class:`~ratelab.models.var.quant.MultiScaleQuantizer`) or ``get_next_autoregressive_input`` (official)."""
    if hasattr(tok, "next_input") and hasattr(tok, "codebook"):
        return tok
    for q in (getattr(tok, "quantize", None), tok):
        if q is not None and hasattr(q, "embedding") and hasattr(q, "patch_nums") and (
                hasattr(q, "next_var_input") or hasattr(q, "get_next_autoregressive_input")):
            return _TokenizerCodec(q)
    raise ConfigError(f"tokenizer {type(tok).__name__} has no quantizer with embedding/patch_nums/next_var_input: "
                      "pass codec=ResidualCodec(...) instead")


# ---- the loop ------------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """Result of :func:`generate`.

    Attributes:
        idx_list: K tensors (B, p_k^2) of token ids, coarse to fine (the tokenizer's ``idx_to_img`` input).
        f_hat: (B, C_vae, p_K, p_K) the accumulated feature map.
        images: (B, 3, H, W) in [0, 1] when a tokenizer was given (``(fhat_to_img(f_hat) + 1) / 2``), else None.
        logits: with ``return_logits``, the guided logits (B, p_k^2, V) each scale was sampled from.
        inputs: with ``return_logits``, the next-scale inputs (B, p_{k+1}^2, C_vae) fed to the model (teacher-forcing
            equivalent: ``torch.cat(inputs, 1)`` is ``x_BLCv_wo_first_l``).
    """

    idx_list: list[torch.Tensor]
    f_hat: torch.Tensor
    images: torch.Tensor | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)


def _labels(model: Any, labels: Any, batch_size: int | None, generator: torch.Generator | None) -> torch.Tensor:
    device, n = model.pos_embed.device, model.num_classes
    if labels is None:
        if batch_size is None:
            raise ConfigError("generate: give labels or batch_size (random classes)")
        return torch.randint(0, n, (batch_size,), generator=generator, device=device)
    if isinstance(labels, int):
        if batch_size is None:
            raise ConfigError("generate: an int label needs batch_size")
        return torch.full((batch_size,), n if labels < 0 else labels, device=device, dtype=torch.long)
    labels = torch.as_tensor(labels, device=device).long()
    if labels.ndim != 1 or labels.numel() == 0:
        raise ConfigError(f"generate: labels must be a non-empty (B,) sequence of class ids, got shape "
                          f"{tuple(labels.shape)}")
    if int(labels.max()) > n:
        raise ConfigError(f"generate: labels must be class ids in [0, {n}) or {n} / -1 (unconditional), got "
                          f"{int(labels.max())}")
    return torch.where(labels < 0, torch.full_like(labels, n), labels)  # -1: unconditional (the null class)


@torch.no_grad()
def generate(
    model: Any,
    labels: torch.Tensor | Sequence[int] | int | None = None,
    *,
    batch_size: int | None = None,
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    seed: int | None = None,
    more_smooth: bool = False,
    state_carry: bool | None = None,
    tokenizer: Any = None,
    codec: ScaleCodec | None = None,
    return_logits: bool = False,
) -> Generation:
    """Sample token pyramids from a VAR / M-VAR model.

    Args:
        model: a :class:`~ratelab.models.var.var.ScaleAR` (VAR or M-VAR).
        labels: (B,) class ids; -1 (or ``num_classes``) = unconditional; an int with ``batch_size``; ``None`` =
            random classes (as the official code).
        cfg: guidance weight at the last scale (ramped linearly from 0 at the first).
        top_k, top_p: filters (0 disables; the FID protocol is 900 / 0.96).
        seed: seeds a private generator (labels, sampling, Gumbel noise); ``None`` uses the global RNG.
        more_smooth: Gumbel-softmax soft codes (visualisation only).
        state_carry: M-VAR only: carry the Mamba state across scales (default) or re-scan the prefix (official).
        tokenizer: decodes the images and, unless ``codec`` is given, provides the codec.
        codec: codebook + residual update (:class:`ResidualCodec`); needed when no tokenizer is given.
        return_logits: keep the per-scale logits and inputs (for tests and analysis).
    """
    if codec is None:
        if tokenizer is None:
            raise ConfigError("generate needs a tokenizer or a codec (the codebook and residual update that turn "
                              "each scale's tokens into the next scale's input)")
        codec = codec_from_tokenizer(tokenizer)
    pn = tuple(model.patch_nums)
    if tuple(codec.patch_nums) != pn:
        raise ConfigError(f"generate: tokenizer patch_nums {tuple(codec.patch_nums)} != model patch_nums {pn}")
    E = codec.codebook()
    if E.shape != (model.vocab_size, model.c_vae):
        raise ConfigError(f"generate: codebook {tuple(E.shape)} does not fit the model (vocab_size="
                          f"{model.vocab_size}, c_vae={model.c_vae})")
    device = model.pos_embed.device
    gen = torch.Generator(device=device).manual_seed(int(seed)) if seed is not None else None
    labels = _labels(model, labels, batch_size, gen)
    B = labels.shape[0]
    double = cfg != 0
    cond = model.class_emb(torch.cat([labels, torch.full_like(labels, model.num_classes)]) if double else labels)
    B2 = cond.shape[0]
    lvl_pos = model.lvl_pos()
    x = cond[:, None].expand(B2, model.first_l, -1) + model.pos_start + lvl_pos[:, : model.first_l]
    f_hat = cond.new_zeros(B, model.c_vae, pn[-1], pn[-1])
    kw = {} if state_carry is None else {"state_carry": state_carry}
    state = model.gen_begin(B2, **kw)
    out = Generation(idx_list=[], f_hat=f_hat)
    K, cur = len(pn), 0
    try:
        for si, p in enumerate(pn):
            r = si / (K - 1) if K > 1 else 1.0
            cur += p * p
            h = model.gen_blocks(x, cond, si, state)
            logits = model.logits(h, cond).float()
            if double:
                t = cfg * r
                logits = (1 + t) * logits[:B] - t * logits[B:]
            # The official sampler filters its logits in place, so the Gumbel-softmax of more_smooth also sees only
            # the top-k / top-p survivors.
            masked = filter_logits(logits, top_k, top_p)
            idx = _draw(masked, gen)
            if more_smooth:
                tau = max(0.27 * (1 - 0.95 * r), 0.005)
                codes = gumbel_softmax(masked * (1 + r), tau, generator=gen) @ E.to(logits.dtype)
            else:
                codes = F.embedding(idx, E)
            out.idx_list.append(idx)
            if return_logits:
                out.logits.append(logits)
            f_hat, nxt = codec.next_input(si, f_hat, codes.transpose(1, 2).reshape(B, model.c_vae, p, p))
            if si != K - 1:
                nxt = nxt.flatten(2).transpose(1, 2)  # (B, p_{k+1}^2, C_vae)
                if return_logits:
                    out.inputs.append(nxt)
                x = model.word_embed(nxt.to(cond.dtype)) + lvl_pos[:, cur: cur + pn[si + 1] ** 2]
                if double:
                    x = x.repeat(2, 1, 1)
    finally:
        model.gen_end(state)
    out.f_hat = f_hat
    if tokenizer is not None and hasattr(tokenizer, "fhat_to_img"):
        out.images = tokenizer.fhat_to_img(f_hat).add(1).mul(0.5)
    return out
