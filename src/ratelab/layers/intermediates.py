"""Shared pieces of ``forward_intermediates`` (timm's convention), used by every model family.

``forward_intermediates(x, indices=None, norm=False, output_fmt=..., intermediates_only=False, return_attn=False)``
returns ``(final, intermediates)`` — ``final`` is what ``forward_features`` returns — or ``(final, intermediates,
attn)`` with ``return_attn``; with ``intermediates_only`` the ``final`` entry is left out (a bare list without
``return_attn``). See ``docs/models.md`` ("Model API").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["check_output_fmt", "collect_intermediates", "pack_intermediates", "resolve_indices", "split_tokens"]


def resolve_indices(num_layers: int, indices: int | Sequence[int] | None, *, what: str = "layer") -> list[int]:
    """Which layers to keep, as sorted absolute indices (timm's ``feature_take_indices`` rule).

    Args:
        num_layers: depth of the model.
        indices: ``None`` = every layer; an int n = the last n layers; a sequence = those layers (negative counts
            from the end; duplicates collapse, the result is in forward order).
        what: noun for the error message ("layer", "block", "stage").

    Raises:
        ValueError: n outside 1..num_layers, or an index outside -num_layers..num_layers-1 (the message names both).
    """
    if indices is None:
        return list(range(num_layers))
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(indices, str):
        raise ValueError(f"indices must be None, an int or a list of ints, got {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_layers:
            raise ValueError(f"indices={indices} out of range: the last n {what}s of a {num_layers}-{what} model, "
                             f"n in 1..{num_layers}")
        return list(range(num_layers - indices, num_layers))
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(
            f"indices {bad} out of range for a {num_layers}-{what} model (use {-num_layers}..{num_layers - 1})"
        )
    return sorted({i % num_layers for i in indices})


def check_output_fmt(output_fmt: str, supported: Sequence[str], model: str) -> None:
    """``ValueError`` naming the supported formats when ``output_fmt`` is not one of them."""
    if output_fmt not in supported:
        raise ValueError(f"{model}.forward_intermediates: output_fmt={output_fmt!r} is not supported; use one of "
                         f"{tuple(supported)}")


def split_tokens(
    t: torch.Tensor,
    output_fmt: str,
    *,
    num_prefix_tokens: int = 0,
    prefix_last: bool = False,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, N_prefix + h*w, C) tokens -> (spatial tokens in ``output_fmt``, prefix tokens or None).

    Args:
        t: layer output tokens, prefix tokens first (or last with ``prefix_last``, Adventurer's class token).
        output_fmt: ``"NLC"`` -> (B, h*w, C); ``"NCHW"`` -> (B, C, h, w) (needs ``grid``).
        num_prefix_tokens: [CLS]-like tokens to split off (timm: they are not part of the spatial intermediates).
        prefix_last: the prefix tokens sit at the end of the sequence.
        grid: (h, w) patch grid for ``"NCHW"``.
    """
    n = num_prefix_tokens
    if n:
        if prefix_last:
            spatial, prefix = t[:, : t.shape[1] - n], t[:, t.shape[1] - n :]
        else:
            prefix, spatial = t[:, :n], t[:, n:]
    else:
        spatial, prefix = t, None
    if output_fmt == "NCHW":
        if grid is None:
            raise ValueError("output_fmt='NCHW' needs the patch grid")
        B, _, C = spatial.shape
        spatial = spatial.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2).contiguous()
    return spatial, prefix


def collect_intermediates(
    z: torch.Tensor,
    blocks: Sequence[torch.nn.Module],
    take: Sequence[int],
    run_block: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    *,
    norm: Callable[[torch.Tensor], torch.Tensor] | None,
    output_fmt: str,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    prefix_last: bool = False,
    return_attn: bool = False,
    return_prefix_tokens: bool = False,
) -> tuple[torch.Tensor, list[Any], list[torch.Tensor] | None]:
    """Run ``blocks`` on the embedded tokens ``z`` and keep the layers in ``take``: the loop every family's
    ``forward_intermediates`` shares.

    A kept layer with ``return_attn`` runs as ``blk(z, return_attn=True) -> (z, attn)`` (each family's explicit
    attention or mixing matrix); every other layer goes through ``run_block`` (gradient checkpointing and the fast
    paths). Kept tokens are normalized by ``norm`` (None: not), split by :func:`split_tokens` and kept as spatial
    tokens or ``(spatial, prefix)`` pairs.

    Returns:
        ``(final tokens, intermediates, attention maps or None)``, for :func:`pack_intermediates`.
    """
    inter: list[Any] = []
    attn: list[torch.Tensor] | None = [] if return_attn else None
    for i, blk in enumerate(blocks):
        if attn is not None and i in take:
            z, a = blk(z, return_attn=True)
            attn.append(a)
        else:
            z = run_block(blk, z)
        if i in take:
            spatial, prefix = split_tokens(norm(z) if norm is not None else z, output_fmt,
                                           num_prefix_tokens=num_prefix_tokens, prefix_last=prefix_last, grid=grid)
            inter.append((spatial, prefix) if return_prefix_tokens else spatial)
    return z, inter, attn


def pack_intermediates(
    final: torch.Tensor,
    intermediates: list[Any],
    attn: list[torch.Tensor] | None,
    *,
    intermediates_only: bool,
) -> Any:
    """The return value of ``forward_intermediates`` for the flags given (see the module docstring)."""
    if intermediates_only:
        return intermediates if attn is None else (intermediates, attn)
    return (final, intermediates) if attn is None else (final, intermediates, attn)
