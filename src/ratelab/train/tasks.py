"""Tasks: what the :class:`~ratelab.train.Trainer` trains, decoupled from how it trains.

A task builds the datasets and the model, computes the loss of one batch and evaluates a model. The trainer owns
everything else (devices, DDP, precision, optimizer, schedule, checkpoints, logging), so new objectives (MCR^2,
MAE, VAR, captioning) are new tasks, not new trainers.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.dist import DistInfo, all_reduce_sum
from ratelab.core.registry import named_decorator
from ratelab.train.config import TrainConfig

__all__ = ["TASKS", "ClassificationTask", "Task", "build_task", "register_task"]


@runtime_checkable
class Task(Protocol):
    """What the trainer needs from a task. The trainer calls, in order:

    1. ``build_datasets(cfg) -> (train, val)``: map-style datasets; ``val`` may be None (no evaluation).
    2. ``build_model(cfg) -> nn.Module``: the bare model on CPU (it may use attributes of the datasets built in 1).
       Build it with :func:`ratelab.create_model` so that it can be saved and reloaded by name.
    3. ``training_step(model, batch, cfg) -> (loss, metrics)`` per optimizer step, in train mode under autocast.
       ``batch`` is the collated local shard, already on the device. ``model`` may be wrapped (DDP): call
       ``model(...)`` so gradient synchronization happens; reach the bare module with
       :func:`ratelab.core.checkpoint.unwrap_model` only for things that are not part of the forward pass.
       ``loss`` is a scalar tensor (mean over the local shard); ``metrics`` maps names to scalar tensors or floats
       (detached; the trainer averages them over steps and ranks).
    4. ``evaluate(model, loader, dist) -> metrics`` in eval mode under ``torch.no_grad``: ``model`` is the bare
       module, ``loader`` yields this rank's shard of the validation set (on ``dist.device``); the task must
       reduce across ranks itself (e.g. with :func:`ratelab.core.dist.all_reduce_sum`) so that every rank returns
       the global numbers. Keys should start with ``val_``.

    Optional attribute ``ddp_find_unused_parameters`` (default False) is passed to DDP.
    """

    def build_datasets(self, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]: ...

    def build_model(self, cfg: TrainConfig) -> nn.Module: ...

    def training_step(self, model: nn.Module, batch: Any, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]: ...

    def evaluate(self, model: nn.Module, loader: Any, dist: DistInfo) -> dict[str, float]: ...


TASKS: dict[str, type] = {}


def register_task(name: str):
    """Class decorator: make a task constructible by name (``TrainConfig.task``, ``ratelab train --task``)."""

    return named_decorator(TASKS, "task", name)


def build_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a registered task.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; registered tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


@register_task("classification")
class ClassificationTask:
    """Supervised image classification with (label-smoothed) cross-entropy.

    Datasets come from :func:`ratelab.data.build_dataset` (``cfg.dataset``, splits ``"train"`` and ``"val"``)
    unless given here. The model is ``create_model(cfg.model, num_classes, img_size, in_chans, **cfg.model_kwargs)``
    where each of the three is taken, in order of preference, from ``cfg.model_kwargs``, the config field
    (``num_classes``, ``img_size``) and the training dataset's attribute of the same name.

    Args:
        train_dataset: optional dataset to use instead of building ``cfg.dataset``'s train split. Items are
            ``(image (C, H, W) float32, int label)``.
        val_dataset: optional validation dataset (used only together with ``train_dataset``; None = no eval).
    """

    def __init__(self, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None) -> None:
        if val_dataset is not None and train_dataset is None:
            raise ValueError("ClassificationTask: val_dataset was given without train_dataset")
        self._given = train_dataset is not None
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset

    # ---- data and model -----------------------------------------------------------------------------------
    def build_datasets(self, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
        if not self._given:
            from ratelab.data import build_dataset

            common = {"root": cfg.data_root, "img_size": cfg.img_size, "seed": cfg.seed, **cfg.dataset_kwargs}
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = build_dataset(cfg.dataset, "val", **common)
        return self.train_dataset, self.val_dataset

    def model_kwargs(self, cfg: TrainConfig) -> dict[str, Any]:
        """The keyword arguments :meth:`build_model` passes to ``create_model`` (after :meth:`build_datasets`)."""
        ds = self.train_dataset
        kw = dict(cfg.model_kwargs)
        for name, value in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size), ("in_chans", None)):
            if name not in kw:
                kw[name] = value if value is not None else getattr(ds, name, None)
        return kw

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from ratelab.core.registry import create_model

        if self.train_dataset is None:
            raise RuntimeError("ClassificationTask.build_model: call build_datasets first")
        return create_model(cfg.model, **self.model_kwargs(cfg))

    # ---- training and evaluation --------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, H, W) images and (B,) labels -> mean cross-entropy over the local shard, and accuracy."""
        x, y = batch[0], batch[1]
        logits = model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        acc = (logits.detach().argmax(dim=-1) == y).float().mean()
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, dist: DistInfo) -> dict[str, float]:
        """Plain (unsmoothed) cross-entropy and top-1 accuracy over the whole validation set (all ranks)."""
        from ratelab.eval.classification import classification_sums

        sums = classification_sums(model, loader, device=dist.device)
        total = all_reduce_sum(torch.stack([sums["loss_sum"], sums["correct"], sums["n"]]).double())
        loss_sum, correct, n = total.tolist()
        if n == 0:
            return {}
        return {"val_loss": loss_sum / n, "val_acc": correct / n}
