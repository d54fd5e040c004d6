"""Linear probes of frozen encoder features, for any model with ``forward_features``.

An encoder's tokens are pooled two ways: the [CLS] token (``"cls"``) and the mean of the patch tokens (``"mean"``);
a model whose ``forward_features`` already returns one vector per image (``(B, d)``) gives that vector for either.
:func:`probe_encoder` extracts the pooled features of a fitting set and an evaluation set once (one forward pass per
batch, every pooling from the same tokens) and scores a multinomial logistic regression on each
(:func:`ratelab.eval.subspace.linear_probe`, scikit-learn's objective, standardized features).

How many prefix tokens a model has is read from ``num_prefix_tokens`` (timm's attribute), else 1 when it has a
``cls_token``, else 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ratelab.eval.subspace import linear_probe

__all__ = ["POOLS", "num_prefix_tokens", "pool_tokens", "pooled_features", "probe_encoder"]

POOLS = ("cls", "mean")


def num_prefix_tokens(model: nn.Module) -> int:
    """[CLS]-like tokens in front of the patch tokens of ``model.forward_features``."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    return 1 if isinstance(getattr(model, "cls_token", None), torch.Tensor) else 0


def pool_tokens(tokens: torch.Tensor, pool: str, n_prefix: int) -> torch.Tensor:
    """(B, N, d) tokens (or (B, d) features) -> (B, d) by ``pool``.

    Raises:
        ValueError: unknown ``pool``; ``"cls"`` on a model without a [CLS] token; no patch tokens for ``"mean"``.
    """
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
    if tokens.ndim == 2:
        return tokens
    if tokens.ndim != 3:
        raise ValueError(f"forward_features returned shape {tuple(tokens.shape)}; expected (B, N, d) or (B, d)")
    if pool == "cls":
        if n_prefix < 1:
            raise ValueError("pool 'cls': the model has no [CLS] token (num_prefix_tokens == 0); use pool 'mean'")
        return tokens[:, 0]
    if tokens.shape[1] <= n_prefix:
        raise ValueError(f"pool 'mean': no patch tokens after the {n_prefix} prefix token(s)")
    return tokens[:, n_prefix:].mean(dim=1)


@torch.no_grad()
def pooled_features(model: nn.Module, data: Dataset | Any, *, pools: Sequence[str] = POOLS, batch_size: int = 256,
                    device: str | torch.device = "cpu", max_items: int | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pooled ``forward_features`` of a dataset (items ``(image, label, ...)``, read in order) or a loader.

    Returns:
        ``({pool: (n, d) float32 on CPU}, labels (n,) int64 on CPU)``.
    """
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features; a linear probe needs an encoder")
    was_training = model.training
    model.eval()
    n_prefix = num_prefix_tokens(model)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data
    feats: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
    labels, seen = [], 0
    try:
        for batch in loader:
            x, y = batch[0], torch.as_tensor(batch[1])
            if max_items is not None:
                x, y = x[: max_items - seen], y[: max_items - seen]
            tokens = model.forward_features(x.to(device)).float()
            for p in pools:
                feats[p].append(pool_tokens(tokens, p, n_prefix).cpu())
            labels.append(y.cpu())
            seen += len(y)
            if max_items is not None and seen >= max_items:
                break
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("pooled_features: the data yielded no batch")
    return {p: torch.cat(v) for p, v in feats.items()}, torch.cat(labels).long()


def probe_encoder(model: nn.Module, fit_data: Dataset | Any, eval_data: Dataset | Any, *,
                  pools: Sequence[str] = POOLS, C: float = 1.0, batch_size: int = 256,
                  device: str | torch.device = "cpu", max_fit: int | None = None) -> dict[str, float]:
    """Linear-probe accuracy of frozen pooled features: fit on ``fit_data``, score on ``eval_data``.

    A pooling the model cannot give (``"cls"`` without a [CLS] token) is left out rather than failing the call.

    Returns:
        ``{"probe_acc_<pool>": eval accuracy, "probe_train_acc_<pool>": fit accuracy}`` per pooling.
    """
    n_prefix = num_prefix_tokens(model)
    pools = [p for p in pools if not (p == "cls" and n_prefix == 0)]
    if not pools:
        raise ValueError("probe_encoder: no pooling applies to this model")
    ftr, ytr = pooled_features(model, fit_data, pools=pools, batch_size=batch_size, device=device,
                               max_items=max_fit)
    fte, yte = pooled_features(model, eval_data, pools=pools, batch_size=batch_size, device=device)
    out: dict[str, float] = {}
    for p in pools:
        r = linear_probe(ftr[p], ytr, fte[p], yte, C=C)
        out[f"probe_acc_{p}"] = float(r["test_acc"])
        out[f"probe_train_acc_{p}"] = float(r["train_acc"])
    return out
