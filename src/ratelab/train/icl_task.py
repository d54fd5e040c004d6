"""In-context classification on synthetic few-shot sequences (task ``"icl"``).

:class:`ICLTask` trains a causal sequence model (e.g. ``icl_gpt_small``) on :mod:`ratelab.data.fewshot` sequences
``x_1, y_1, ..., x_n, y_n``: every sequence draws a fresh task (class centers and label words), and the loss is the
cross-entropy of the label token ``y_i`` predicted at the position of ``x_i`` -- over the whole label vocabulary,
averaged over all n positions, so one sequence trains 0-, 1-, ..., (n-1)-shot prediction at once.

The generated stream fits the trainer's map-style data model directly: :class:`~ratelab.data.fewshot.FewShotSequences`
makes item ``i`` a pure function of ``(seed, i)``, so sharding, shuffling and bitwise resumption work unchanged.
``cfg.dataset`` is ignored; the task distribution is the task config's ``fewshot`` section
(``ratelab train --task icl --task.fewshot.noise_std 0.7``).

Evaluation reports ``val_loss``, ``val_acc`` (all positions) and ``val_acc_{k}shot`` for k in (0, 1, 2, 4, 8, 16)
below the sequence length, with argmax over the whole vocabulary (restricted label-word probabilities and
calibration are measured by the ``icl-calibration`` recipe, not here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.dist import all_reduce_sum
from ratelab.core.errors import ConfigError
from ratelab.data.fewshot import FewShotConfig, FewShotSequences
from ratelab.train.config import TrainConfig
from ratelab.train.tasks import EvalContext, Task, TaskConfig, register_task

__all__ = ["EVAL_SHOTS", "ICLTask", "ICLTaskConfig"]

EVAL_SHOTS = (0, 1, 2, 4, 8, 16)


@dataclass
class ICLTaskConfig(TaskConfig):
    """Options of the ``icl`` task (``--task icl --task.fewshot.noise_std 0.7 --task.val_sequences 256``).

    Attributes:
        fewshot: the task distribution (:class:`~ratelab.data.fewshot.FewShotConfig`).
        train_sequences: length of the (indexable) training stream; one epoch = ``train_sequences // batch_size``
            steps, so set ``max_steps`` in the run config for the run length.
        val_sequences: number of held-out sequences (another seed) for evaluation; 0 = no evaluation.
    """

    name: str = "icl"
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    train_sequences: int = 1 << 20
    val_sequences: int = 512

    def check(self) -> None:
        if self.train_sequences < 1 or self.val_sequences < 0:
            raise ValueError(f"train_sequences must be >= 1 and val_sequences >= 0, got "
                             f"{self.train_sequences}, {self.val_sequences}")


@register_task("icl", config=ICLTaskConfig)
class ICLTask(Task):
    """Train a model to classify in context (see the module docstring).

    Args:
        fewshot: the task distribution (default :class:`FewShotConfig()`), or a whole :class:`ICLTaskConfig`.
        train_sequences, val_sequences: see :class:`ICLTaskConfig`.
    """

    def __init__(self, fewshot: FewShotConfig | ICLTaskConfig | None = None, train_sequences: int | None = None,
                 val_sequences: int | None = None) -> None:
        if isinstance(fewshot, ICLTaskConfig):
            if train_sequences is not None or val_sequences is not None:
                raise TypeError("ICLTask: pass either an ICLTaskConfig or its fields, not both")
            super().__init__(fewshot)
        else:
            opts: dict[str, Any] = {"fewshot": fewshot if fewshot is not None else FewShotConfig()}
            if train_sequences is not None:
                opts["train_sequences"] = train_sequences
            if val_sequences is not None:
                opts["val_sequences"] = val_sequences
            try:
                super().__init__(None, **opts)
            except ConfigError as e:
                raise ConfigError(f"ICLTask: {e}") from None
        self.fewshot = self.config.fewshot
        self.train_sequences, self.val_sequences = self.config.train_sequences, self.config.val_sequences
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def build_datasets(self, cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
        from ratelab.core.seeding import derive_seed

        if cfg.dataset_kwargs:
            raise ConfigError(f"dataset_kwargs: task 'icl' generates its data; set the task distribution with "
                              f"--task.fewshot.OPTION (got {sorted(cfg.dataset_kwargs)})")
        self.train_dataset = FewShotSequences(self.fewshot, self.train_sequences, seed=cfg.seed)
        # A seed derived from (seed, tag) that no training index maps to the same stream.
        val_seed = derive_seed(cfg.seed, 0x1C1)
        self.val_dataset = FewShotSequences(self.fewshot, self.val_sequences, val_seed) if self.val_sequences else None
        return self.train_dataset, self.val_dataset

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from ratelab import create_model

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
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        loader, dist = ctx.loader, ctx.dist
        if loader is None:
            return {}
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
