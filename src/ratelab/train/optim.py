"""Optimizers with the usual weight-decay split.

Weight decay shrinks weights towards zero; on biases, normalization gains and learned tokens/position embeddings it
only fights the model (they set scales and offsets, not feature directions), so they go to a group without decay.
A parameter is exempt when it is 1-D (biases, LayerNorm weights) or its name is in ``model.no_weight_decay()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["build_optimizer", "weight_decay_groups"]

DEFAULT_BETAS = {"adamw": (0.9, 0.999), "lion": (0.9, 0.99)}


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Args:
        model: the unwrapped model (names as in its ``state_dict``).
        weight_decay: decay of the first group.

    Returns:
        ``[{"params", "param_names", "weight_decay"}, ...]``; empty groups are dropped. ``param_names`` is kept for
        readability of optimizer state dicts and for tests.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append((name, p))
    groups = []
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append(
                {"params": [p for _, p in members], "param_names": [n for n, _ in members], "weight_decay": wd}
            )
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (torch) or Lion (timm) over :func:`weight_decay_groups`.

    Raises:
        ValueError: unknown optimizer name.
    """
    groups = weight_decay_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if name not in DEFAULT_BETAS:
        raise ValueError(f"optimizer: must be one of {sorted(DEFAULT_BETAS)}, got {name!r}")
    betas = tuple(betas) if betas is not None else DEFAULT_BETAS[name]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    from timm.optim import Lion

    return Lion(groups, lr=lr, betas=betas, weight_decay=weight_decay)
