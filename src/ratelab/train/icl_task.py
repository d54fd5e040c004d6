"""In-context classification on synthetic few-shot sequences (task ``"icl"``).

:class:`ICLTask` trains a causal sequence model (e.g. ``icl_gpt_small``) on :mod:`ratelab.data.fewshot` sequences
``x_1, y_1, ..., x_n, y_n``: every sequence draws a fresh task (class centers and label words), and the loss is the
cross-entropy of the label token ``y_i`` predicted at the position of ``x_i`` -- over the whole label vocabulary,
averaged over all n positions, so one sequence trains 0-, 1-, ..., (n-1)-shot prediction at once.

The generated stream fits the trainer's map-style data model directly: :class:`~ratelab.data.fewshot.FewShotSequences`
makes item ``i`` a pure function of ``(seed, i)``, so sharding, shuffling and bitwise resumption work unchanged.
``cfg.dataset`` is ignored; ``cfg.dataset_kwargs`` may override fields of :class:`~ratelab.data.fewshot.FewShotConfig`
(e.g. ``noise_std=0.7``), which is how ``ratelab train --task icl`` sets the task distribution.

Evaluation reports ``val_loss``, ``val_acc`` (all positions) and ``val_acc_{k}shot`` for k in (0, 1, 2, 4, 8, 16)
below the sequence length, with argmax over the whole vocabulary (restricted label-word probabilities and
calibration are measured by the ``icl-calibration`` recipe, not here).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.dist import DistInfo, all_reduce_sum
from ratelab.data.fewshot import FewShotConfig, FewShotSequences
from ratelab.train.config import TrainConfig
from ratelab.train.tasks import register_task

__all__ = ["EVAL_SHOTS", "ICLTask"]

EVAL_SHOTS = (0, 1, 2, 4, 8, 16)


@register_task("icl")
class ICLTask:
    """Train a model to classify in context (see the module docstring).

    Args:
        fewshot: the task distribution (default :class:`FewShotConfig()`); ``cfg.dataset_kwargs`` override it.
        train_sequences: length of the (indexable) training stream; one epoch = ``train_sequences // batch_size``
            steps, so set ``max_steps`` in the config for the run length.
        val_sequences: number of held-out sequences (another seed) for evaluation; 0 = no evaluation.
    """

    def __init__(self, fewshot: FewShotConfig | None = None, train_sequences: int = 1 << 20,
                 val_sequences: int = 512) -> None:
        if train_sequences < 1 or val_sequences < 0:
            raise ValueError(f"ICLTask: train_sequences must be >= 1 and val_sequences >= 0, got "
                             f"{train_sequences}, {val_sequences}")
        self.fewshot = fewshot if fewshot is not None else FewShotConfig()
        self.train_sequences, self.val_sequences = int(train_sequences), int(val_sequences)
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def resolved_fewshot(self, cfg: TrainConfig) -> FewShotConfig:
        """The task's :class:`FewShotConfig` with ``cfg.dataset_kwargs`` applied."""
        names = {f.name for f in fields(FewShotConfig)}
        bad = sorted(set(cfg.dataset_kwargs) - names)
        if bad:
            raise ValueError(f"dataset_kwargs: unknown few-shot option(s) {bad} for task 'icl'; valid: {sorted(names)}")
        return replace(self.fewshot, **cfg.dataset_kwargs)

    def build_datasets(self, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
        from ratelab.train.data import derive_seed

        self.fewshot = self.resolved_fewshot(cfg)
        self.train_dataset = FewShotSequences(self.fewshot, self.train_sequences, seed=cfg.seed)
        # A seed derived from (seed, tag) that no training index maps to the same stream.
        val_seed = derive_seed(cfg.seed, 0x1C1)
        self.val_dataset = FewShotSequences(self.fewshot, self.val_sequences, val_seed) if self.val_sequences else None
        return self.train_dataset, self.val_dataset

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from ratelab.core.registry import create_model

        fs = self.fewshot
        kw: dict[str, Any] = {"input_dim": fs.input_dim, "vocab_size": fs.vocab_size, **cfg.model_kwargs}
        kw.setdefault("max_pairs", max(32, fs.n_pairs))
        return create_model(cfg.model, **kw)

    def training_step(self, model: nn.Module, batch: Any, cfg: TrainConfig) -> tuple[torch.Tensor, dict[str, Any]]:
        """x (B, n, d), y (B, n) -> mean next-label cross-entropy over all B * n positions."""
        x, y = batch[0], batch[1]
        logits = model(x, y)  # (B, n, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), label_smoothing=cfg.label_smoothing)
        correct = (logits.detach().argmax(-1) == y).float()
        return loss, {"acc": correct.mean(), "acc_last": correct[:, -1].mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, dist: DistInfo) -> dict[str, float]:
        n_pairs = self.fewshot.n_pairs
        loss_sum = torch.zeros((), dtype=torch.float64, device=dist.device)
        correct = torch.zeros(n_pairs, dtype=torch.float64, device=dist.device)
        count = torch.zeros((), dtype=torch.float64, device=dist.device)
        for batch in loader:
            x, y = batch[0], batch[1]
            logits = model(x, y).float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == y).double().sum(0)
            count += y.shape[0]
        total = all_reduce_sum(torch.cat([loss_sum[None], count[None], correct]))
        loss_sum, count, correct = total[0].item(), total[1].item(), total[2:]
        if count == 0:
            return {}
        out = {"val_loss": loss_sum / (count * n_pairs), "val_acc": correct.sum().item() / (count * n_pairs)}
        for k in EVAL_SHOTS:
            if k < n_pairs:
                out[f"val_acc_{k}shot"] = correct[k].item() / count
        return out
