"""Masked-autoencoder mechanics shared by CRATE-MAE and the matched ViT-MAE: the fixed 2-D sin-cos position table,
MAE's per-sample random masking, patchify / unpatchify and the masked-patch loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv 2111.06377); the conventions are
those of its reference code (facebookresearch/mae ``models_mae.py``, ``util/pos_embed.py``), which CRATE-MAE's
official code reuses. This module is an independent implementation of them:

* masking: ``ids_shuffle = argsort(noise)`` per image (ascending: small noise is kept), ``ids_restore =
  argsort(ids_shuffle)``, the first ``int(N * (1 - mask_ratio))`` of ``ids_shuffle`` are kept; ``mask`` is 1 on
  removed patches, in the original patch order;
* a patch is flattened as (row, column, channel) -- MAE's ``nchpwq -> nhwpqc`` -- for any channel count;
* loss: per-patch mean squared error, averaged over masked patches only; with ``norm_pix_loss`` each target patch
  is standardized by its own mean and (unbiased) variance, eps 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ratelab.layers.patch import patchify

__all__ = ["MaskedAutoencoderMixin", "check_mask_ratio", "mae_loss", "patchify", "random_masking",
           "sincos_pos_embed_2d", "unpatchify"]


def sincos_pos_embed_2d(
    dim: int,
    grid: tuple[int, int],
    *,
    cls_token: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table: (1, [1 +] h*w, dim), tokens row-major, a zero row first for [CLS].

    For the patch at row r, column c the first ``dim/2`` channels encode c and the last ``dim/2`` encode r (MAE's
    table puts the column first); each half is ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k/(dim/4))``,
    k = 0 .. dim/4 - 1. Computed in float64 and rounded once (the reference computes in float32, so tables agree to
    float32 rounding; loaded checkpoints keep their own table).

    Raises:
        ValueError: ``dim`` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim/2)
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)  # token t = r * w + c
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([table.new_zeros(1, dim), table], dim=0)
    return table.to(dtype).unsqueeze(0)


def check_mask_ratio(mask_ratio: float) -> float:
    """``mask_ratio`` as a float in [0, 1]; anything else is a ``ValueError``."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be a number in [0, 1], got {mask_ratio!r}")
    return float(mask_ratio)


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking, as indices.

    Args:
        batch: images B.
        num_patches: patches N per image.
        mask_ratio: fraction to remove; ``int(N * (1 - mask_ratio))`` patches are kept (MAE's rounding).
        noise: (B, N) scores fixing the masking (the lowest ``len_keep`` of each row are kept); default
            ``torch.rand`` from the global generator.
        device: where the indices live (default: ``noise``'s device, else the default device).

    Returns:
        ``(ids_keep, mask, ids_restore)``: (B, len_keep) indices of the kept patches in shuffled order, (B, N) float
        mask (1 = removed) in the original order, and (B, N) ``ids_restore`` = ``argsort(argsort(noise))``.

    Raises:
        ValueError: bad ``mask_ratio``, or ``noise`` of another shape.
    """
    ratio = check_mask_ratio(mask_ratio)
    len_keep = int(num_patches * (1 - ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    else:
        if tuple(noise.shape) != (batch, num_patches):
            raise ValueError(f"noise must have shape (B, N) = ({batch}, {num_patches}), got {tuple(noise.shape)}")
        noise = noise.to(device) if device is not None else noise
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # MAE builds [0]*len_keep + [1]*(N - len_keep) in shuffled order and gathers it back with ids_restore: a patch
    # is removed exactly when its rank in the shuffle is len_keep or more.
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, mask, ids_restore


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, h*w, p*p*C) patches -> (B, C, h*p, w*p) images; the inverse of :func:`patchify`.

    ``grid`` (h, w) defaults to the square one (an error when h*w is not a square).
    """
    B, L, D = x.shape
    p, C = patch_size, in_chans
    if D != p * p * C:
        raise ValueError(f"unpatchify: patch vectors of {D} values, expected patch_size^2 * in_chans = {p * p * C}")
    if grid is None:
        side = math.isqrt(L)
        if side * side != L:
            raise ValueError(f"unpatchify: {L} patches are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != L:
        raise ValueError(f"unpatchify: grid {grid} has {h * w} patches, got {L}")
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, C, h * p, w * p)


def mae_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE. ``target``/``pred`` (B, N, P), ``mask`` (B, N), 1 = masked.

    With no masked patch the mean is 0/0 (NaN), as in MAE; the models' ``forward`` refuses such a ratio up front.
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


class MaskedAutoencoderMixin:
    """MAE's patch, loss and initialization methods, shared by CRATE-MAE and ViT-MAE.

    The model sets ``patch_size``, ``in_chans``, ``grid_size`` (construction grid), ``norm_pix_loss``,
    ``grad_checkpointing`` and has ``patch_embed`` (timm ``PatchEmbed``), ``cls_token``, ``mask_token``,
    ``pos_embed`` and ``decoder_pos_embed`` (fixed sin-cos tables, ``requires_grad=False`` parameters as in MAE, so
    that parameter counts include them).
    """

    patch_size: int
    in_chans: int
    grid_size: tuple[int, int]
    norm_pix_loss: bool
    grad_checkpointing: bool

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C) patches, (row, column, channel) inside a patch (MAE's order)."""
        self._check_images(imgs)
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W); ``grid`` (h, w) defaults to the construction grid, else a square one."""
        if grid is None and x.shape[1] == self.grid_size[0] * self.grid_size[1]:
            grid = self.grid_size
        return unpatchify(x, self.patch_size, self.in_chans, grid)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over masked patches (``mask`` 1); per-patch normalized targets with
        ``norm_pix_loss``."""
        return mae_loss(self.patchify(imgs), pred, mask, norm_pix_loss=self.norm_pix_loss)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    def init_weights(self) -> None:
        """MAE's initialization: sin-cos tables, the conv stem as a flattened Linear (xavier-uniform), [CLS] and
        mask token N(0, 0.02), every ``nn.Linear`` xavier-uniform with zero bias, LayerNorms (1, 0). Parameters
        that are not Linears (CRATE's dictionaries) keep their own init, as in the official code."""
        with torch.no_grad():
            for table in (self.pos_embed, self.decoder_pos_embed):
                table.copy_(sincos_pos_embed_2d(table.shape[-1], self.grid_size, device=table.device))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _check_images(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        p = self.patch_size
        if imgs.shape[2] % p or imgs.shape[3] % p:
            raise ValueError(f"image size {imgs.shape[2]}x{imgs.shape[3]} is not divisible by patch size {p}")

    def _grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size

    def _patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        self._check_images(imgs)
        return self.patch_embed(imgs)  # (B, N, d)

    def _check_masks_something(self, imgs: torch.Tensor, mask_ratio: float) -> None:
        h, w = self._grid(imgs)
        ratio = check_mask_ratio(mask_ratio)
        if int(h * w * (1 - ratio)) == h * w:
            raise ValueError(f"mask_ratio={mask_ratio} masks none of the {h * w} patches: the loss, a mean over "
                             "masked patches, is undefined (use forward_encoder or forward_features for features)")

    def _table(self, table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # The construction grid uses the stored table (a loaded checkpoint's own); another grid gets its exact table.
        if tuple(grid) == tuple(self.grid_size):
            return table
        return sincos_pos_embed_2d(table.shape[-1], grid, dtype=table.dtype, device=table.device)

    def _run(self, blk: nn.Module, z: torch.Tensor) -> torch.Tensor:
        return checkpoint(blk, z, use_reentrant=False) if self.grad_checkpointing and self.training else blk(z)
