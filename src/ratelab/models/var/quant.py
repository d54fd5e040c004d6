"""VAR's multi-scale residual vector quantizer (Tian et al., NeurIPS 2024, arXiv 2404.02905, Alg. 1 and 2).

A latent ``f`` (B, C, H, W) is quantized coarse to fine: at scale k the residual ``r`` is area-downsampled to
p_k x p_k, every position takes its nearest code of ONE codebook shared by all scales, the code map is
bicubic-upsampled back to H x W and refined by a phi conv, and the result is added to ``f_hat`` and subtracted from
``r``. The last scale (p_K = H) needs no resize. phi is ``(1 - r) h + r conv3x3(h)`` with ``r = quant_resi``;
scales share a few phi convs by where the scale sits in [0, 1] (:func:`phi_schedule`).

State-dict keys are those of FoundationVision/VAR ``models/quant.py`` (``embedding.weight``,
``quant_resi.qresi_ls.{j}.weight`` / ``.bias`` for the partially shared phi, ``ema_vocab_hit_SV``), so the released
tokenizer loads as it is.

Deviations from the official ``VectorQuantizer2``:

* the usage buffer ``ema_vocab_hit_SV`` is not updated by :meth:`forward` (the official one updates it only under
  ``torch.distributed``, with a momentum keyed on a counter that is not saved); the ``vqvae`` task updates it from
  the per-scale hit counts :meth:`forward` returns, with a counter it checkpoints;
* one scale (``len(patch_nums) == 1``) is allowed: it sits at position 0 (the official division by
  ``len - 1`` fails).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MultiScaleQuantizer", "Phi", "phi_schedule", "phi_ticks"]


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] of ``num_phi`` shared phi convs: ``linspace(1/(3K), 1 - 1/(3K), K)`` for K = 4 and
    ``linspace(1/(2K), 1 - 1/(2K), K)`` otherwise (the official rule, in float64 as numpy computes it there)."""
    k = num_phi
    lo = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(lo, 1 - lo, k)


def phi_schedule(num_scales: int, share_quant_resi: int = 4, default_qresi_counts: int = 0) -> tuple[int, ...]:
    """Index of the phi conv each scale uses.

    Scale ``si`` (0-based) of ``num_scales`` sits at ``si / (num_scales - 1)`` and takes the phi whose tick
    (:func:`phi_ticks`) is nearest, the first one on a tie (``argmin``). ``share_quant_resi=1`` is one phi for all;
    ``0`` is non-shared with ``default_qresi_counts or num_scales`` convs (then the rule is the identity map
    when the counts agree).

    >>> phi_schedule(10)
    (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    """
    if num_scales <= 0:
        raise ValueError(f"num_scales must be positive, got {num_scales}")
    if share_quant_resi == 1:
        return (0,) * num_scales
    k = (default_qresi_counts or num_scales) if share_quant_resi == 0 else share_quant_resi
    ticks = phi_ticks(k)
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(int(np.argmin(np.abs(ticks - at))))
    return tuple(out)


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): a 3x3 conv (with bias) blended with the identity."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + super().forward(h) * self.ratio


class _PartiallyShared(nn.Module):
    # Holds the convs under ``qresi_ls`` (the official module's attribute name, hence its state-dict keys).
    def __init__(self, convs: list[nn.Module]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(convs)


class _Shared(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.qresi = conv


class MultiScaleQuantizer(nn.Module):
    """The shared codebook, the phi convs and the coarse-to-fine residual quantization (see the module docstring).

    Args:
        vocab_size: codebook entries V.
        channels: code width C_vae.
        patch_nums: p_1..p_K, coarse to fine; p_K is the latent side.
        quant_resi: phi blend ratio r (0: identity phi, no parameters).
        share_quant_resi: number of phi convs (0 = one per scale, 1 = one for all).
        default_qresi_counts: with ``share_quant_resi=0``, the number of convs (0 = one per scale).
        using_znorm: cosine instead of L2 nearest neighbour.
        beta: commitment weight.
    """

    def __init__(self, vocab_size: int, channels: int, patch_nums: Sequence[int], *, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0, using_znorm: bool = False,
                 beta: float = 0.25) -> None:
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.Cvae, self.v_patch_nums = channels, self.patch_nums  # the official attribute names
        self.using_znorm, self.beta = using_znorm, beta

        def make() -> nn.Module:
            return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        n = len(self.patch_nums)
        if share_quant_resi == 0:
            self.quant_resi: nn.Module = nn.ModuleList([make() for _ in range(default_qresi_counts or n)])
            self._convs = list(self.quant_resi)
        elif share_quant_resi == 1:
            self.quant_resi = _Shared(make())
            self._convs = [self.quant_resi.qresi]
        else:
            self.quant_resi = _PartiallyShared([make() for _ in range(share_quant_resi)])
            self._convs = list(self.quant_resi.qresi_ls)
        self.phi_index = phi_schedule(n, share_quant_resi, default_qresi_counts)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(n, vocab_size))
        self.embedding = nn.Embedding(vocab_size, channels)

    def extra_repr(self) -> str:
        return f"patch_nums={self.patch_nums}, phi_index={self.phi_index}, znorm={self.using_znorm}, beta={self.beta}"

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int) -> nn.Module:
        """The phi conv of scale ``si`` (0-based)."""
        return self._convs[self.phi_index[si]]

    # ---- the pieces ---------------------------------------------------------------------------------------------
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C) vectors -> (N,) index of the nearest code (squared L2, or cosine with ``using_znorm``)."""
        e = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(e.T, dim=0), dim=1)
        # |z|^2 + |e|^2 - 2 z.e in one addmm: the distance's argmin without an (N, V, C) difference tensor.
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(e.square(), dim=1)
        d = torch.addmm(d, z, e.T, beta=1, alpha=-2)
        return torch.argmin(d, dim=1)

    def _down(self, r: torch.Tensor, si: int, size: tuple[int, int]) -> torch.Tensor:
        if si == self.num_scales - 1:
            return r
        return F.interpolate(r, size=size, mode="area")

    def _up(self, h: torch.Tensor, si: int, size: tuple[int, int]) -> torch.Tensor:
        if si == self.num_scales - 1:
            return h
        return F.interpolate(h, size=size, mode="bicubic")

    def code_map(self, idx: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """(B, p^2) indices -> (B, C, p, p) code vectors."""
        b, n = idx.shape
        p = side if side is not None else round(n ** 0.5)
        if p * p != n:
            raise ValueError(f"a token map of {n} entries is not square")
        return self.embedding(idx).transpose(1, 2).reshape(b, self.channels, p, p)

    def _check_latent(self, f: torch.Tensor) -> None:
        last = self.patch_nums[-1]
        if f.ndim != 4 or f.shape[1] != self.channels or f.shape[-2:] != (last, last):
            raise ValueError(f"latent of shape {tuple(f.shape)} does not fit: expected (B, {self.channels}, {last}, "
                             f"{last}) (the last of patch_nums={self.patch_nums}); the image side must be "
                             f"{last} x the tokenizer's downsampling")

    # ---- training -----------------------------------------------------------------------------------------------
    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``f`` with gradients for training.

        Returns:
            ``(f_hat_st, vq_loss, hits)``: the straight-through reconstruction ``sg(f_hat) - sg(f) + f`` (the
            encoder gets the decoder's gradient as if quantization were the identity), the mean over scales of
            ``beta |sg(f_hat_k) - f|^2 + |f_hat_k - sg(f)|^2`` (commitment; codebook and phi), and the (K, V) hit
            counts of this batch (float).
        """
        # Nearest-code search and residual sums in fp32 even under autocast (the official code disables it too):
        # bf16 distances would pick other codes.
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self._forward(f.float())

    def _forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_latent(f)
        b, c, h, w = f.shape
        f_ng = f.detach()
        rest = f_ng.clone()
        f_hat = torch.zeros_like(rest)
        loss = f.new_zeros(())
        hits = []
        for si, pn in enumerate(self.patch_nums):
            z = self._down(rest, si, (pn, pn)).permute(0, 2, 3, 1).reshape(-1, c)
            idx = self.nearest(z)
            hits.append(torch.bincount(idx, minlength=self.vocab_size).float())
            code = self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
            hk = self.phi(si)(self._up(code, si, (h, w)).contiguous())
            f_hat = f_hat + hk
            rest = rest - hk
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_ng)
        loss = loss / self.num_scales
        return (f_hat.detach() - f_ng) + f, loss, torch.stack(hits)

    # ---- inference ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def f_to_idx(self, f: torch.Tensor, *, to_fhat: bool = False) -> list[torch.Tensor]:
        """Latent (B, C, H, W) -> per scale the (B, p_k^2) token indices, or with ``to_fhat`` the cumulative
        (B, C, H, W) reconstruction after each scale."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            return self._f_to_idx(f.float(), to_fhat)

    def _f_to_idx(self, f: torch.Tensor, to_fhat: bool) -> list[torch.Tensor]:
        self._check_latent(f)
        b, c, h, w = f.shape
        rest = f.detach().clone()
        f_hat = torch.zeros_like(rest)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = self._down(rest, si, (pn, pn)).permute(0, 2, 3, 1).reshape(-1, c)
            idx = self.nearest(z)
            code = self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
            hk = self.phi(si)(self._up(code, si, (h, w)).contiguous())
            f_hat = f_hat + hk
            rest = rest - hk
            out.append(f_hat.clone() if to_fhat else idx.reshape(b, pn * pn))
        return out

    @torch.no_grad()
    def scale_inputs(self, f: torch.Tensor) -> list[torch.Tensor]:
        """The vectors each scale quantizes (the area-downsampled residual), one (B * p_k^2, C) tensor per scale:
        the pool a dead code is restarted from."""
        f = f.float()
        self._check_latent(f)
        b, c, h, w = f.shape
        rest = f.detach().clone()
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = self._down(rest, si, (pn, pn)).permute(0, 2, 3, 1).reshape(-1, c)
            out.append(z)
            idx = self.nearest(z)
            code = self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2)
            rest = rest - self.phi(si)(self._up(code, si, (h, w)).contiguous())
        return out

    def idx_to_fhat(self, idx_list: Sequence[torch.Tensor], *, all_scales: bool = False) -> torch.Tensor | list:
        """Token maps of every scale -> ``f_hat`` (B, C, H, W) (or, with ``all_scales``, the list after each)."""
        self._check_scales(idx_list)
        last = self.patch_nums[-1]
        f_hat = None
        outs = []
        for si, idx in enumerate(idx_list):
            hk = self.phi(si)(self._up(self.code_map(idx, self.patch_nums[si]), si, (last, last)))
            f_hat = hk if f_hat is None else f_hat + hk
            if all_scales:
                outs.append(f_hat.clone())
        return outs if all_scales else f_hat

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing input of VAR: for k = 1..K-1, ``f_hat_k`` (the sum of the first k phi-refined,
        upsampled code maps) area-downsampled to p_{k+1}, flattened and concatenated: (B, L - p_1^2, C).
        ``None`` with one scale."""
        self._check_scales(idx_list)
        last = self.patch_nums[-1]
        f_hat = None
        nxt = []
        for si in range(self.num_scales - 1):
            code = self.code_map(idx_list[si], self.patch_nums[si])
            # Scales before the last are always upsampled here, even when p_k == p_K (the official code does too).
            hk = self.phi(si)(F.interpolate(code, size=(last, last), mode="bicubic"))
            f_hat = hk if f_hat is None else f_hat + hk
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(nxt, dim=1) if nxt else None

    def next_var_input(self, si: int, f_hat: torch.Tensor | None, code: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampling step: add scale ``si``'s (B, C, p, p) code map to ``f_hat`` and return
        ``(f_hat, next_input)`` where ``next_input`` is ``f_hat`` area-downsampled to p_{si+1} (B, C, p', p'), or
        ``f_hat`` itself at the last scale. ``f_hat=None`` starts from zero."""
        last = self.patch_nums[-1]
        if si != self.num_scales - 1:
            hk = self.phi(si)(F.interpolate(code, size=(last, last), mode="bicubic"))
        else:
            hk = self.phi(si)(code)
        f_hat = hk if f_hat is None else f_hat + hk
        if si == self.num_scales - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    # official method names (FoundationVision/VAR models/quant.py), so code written against it runs unchanged
    def idxBl_to_var_input(self, gt_ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor | None:  # noqa: N802
        return self.idx_to_var_input(gt_ms_idx_Bl)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,  # noqa: N803
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: N803
        if SN != self.num_scales:
            raise ValueError(f"SN={SN}: the quantizer has {self.num_scales} scales")
        return self.next_var_input(si, f_hat, h_BChw)

    def _check_scales(self, idx_list: Sequence[torch.Tensor]) -> None:
        if len(idx_list) != self.num_scales:
            raise ValueError(f"got {len(idx_list)} token maps, the tokenizer has {self.num_scales} scales "
                             f"(patch_nums={self.patch_nums})")
        for si, (idx, pn) in enumerate(zip(idx_list, self.patch_nums, strict=True)):
            if idx.ndim != 2 or idx.shape[1] != pn * pn:
                raise ValueError(f"token map {si} has shape {tuple(idx.shape)}, expected (B, {pn * pn})")
