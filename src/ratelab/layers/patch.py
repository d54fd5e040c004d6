"""Patchify and position-embedding resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), channels last inside each patch.

    The within-patch order (row, column, channel) is the one of the official CRATE stem, so its first LayerNorm and
    Linear weights load without permutation.
    """
    B, C, H, W = x.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int = 1,
    prefix_last: bool = False,
    old_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resample a (1, prefix + h*w, D) learned position embedding to a new patch grid.

    Prefix tokens ([CLS] and the like) keep their embedding. ``prefix_last`` handles models whose class token sits
    at the end of the sequence (Adventurer): the prefix is then split off the tail, not the head.
    """
    n_prefix = num_prefix_tokens
    if prefix_last:
        grid_part, prefix = pos_embed[:, : pos_embed.shape[1] - n_prefix], pos_embed[:, pos_embed.shape[1] - n_prefix :]
    else:
        prefix, grid_part = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    n_old = grid_part.shape[1]
    if old_grid is None:
        side = int(math.isqrt(n_old))
        if side * side != n_old:
            raise ValueError(f"cannot infer a square grid from {n_old} position embeddings; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    D = grid_part.shape[-1]
    orig_dtype = grid_part.dtype
    g = grid_part.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_grid, mode=mode, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(orig_dtype)
    return torch.cat([g, prefix], dim=1) if prefix_last else torch.cat([prefix, g], dim=1)
