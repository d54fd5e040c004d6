"""Classification evaluation: logits, accuracy and cross-entropy of a model on a dataset.

Pure functions of (model, data); nothing here imports the trainer. The model's train/eval mode is restored on exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["classification_sums", "evaluate_classifier", "predict"]


def _resolve(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is None:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    return torch.device(device)


class _EvalMode:
    """Put a module in eval mode and restore its previous mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def classification_sums(
    model: nn.Module, loader: Iterable[Any], *, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Sums over batches: cross-entropy, correct top-1 predictions, and count.

    Args:
        model: maps (B, C, H, W) images to (B, num_classes) logits.
        loader: yields ``(images, labels, ...)`` batches (extra items ignored); moved to ``device``.
        device: where to compute; default: the model's device.

    Returns:
        ``{"loss_sum", "correct", "n"}`` as float64 scalar tensors on ``device`` (ready for an all-reduce).
    """
    dev = _resolve(device, model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    n = torch.zeros((), dtype=torch.float64, device=dev)
    with _EvalMode(model):
        for batch in loader:
            x = batch[0].to(dev, non_blocking=True)
            y = torch.as_tensor(batch[1]).to(dev, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=-1) == y).sum().double()
            n += y.numel()
    return {"loss_sum": loss_sum, "correct": correct, "n": n}


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels for every item of ``dataset``, in order.

    Returns:
        ``(logits (N, num_classes) float32 on CPU, labels (N,) int64 on CPU)``.
    """
    dev = _resolve(device, model)
    logits, labels = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with _EvalMode(model):
        for batch in loader:
            logits.append(model(batch[0].to(dev)).float().cpu())
            labels.append(torch.as_tensor(batch[1]).cpu())
    if not logits:
        raise ValueError("predict: the dataset is empty")
    return torch.cat(logits), torch.cat(labels).long()


def evaluate_classifier(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device | None = None
) -> dict[str, float]:
    """Top-1 accuracy and mean (unsmoothed) cross-entropy of ``model`` on ``dataset``.

    Returns:
        ``{"acc", "loss", "n"}``.

    Raises:
        ValueError: the dataset is empty.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sums = classification_sums(model, DataLoader(dataset, batch_size=batch_size, shuffle=False), device=device)
    n = int(sums["n"].item())
    if n == 0:
        raise ValueError("evaluate_classifier: the dataset is empty")
    return {"acc": sums["correct"].item() / n, "loss": sums["loss_sum"].item() / n, "n": n}
