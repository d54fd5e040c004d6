"""Tasks: what the :class:`~ratelab.train.Trainer` trains, decoupled from how it trains.

A task builds the datasets and the model, computes the loss of one batch and evaluates a model. The trainer owns
everything else (devices, DDP/FSDP, precision, accumulation, optimizers, schedules, checkpoints, logging), so new
objectives (MAE, VQ tokenizers, VAR, captioning) are new tasks, not new trainers.

Every task registers a typed config dataclass (a :class:`TaskConfig` subclass) with its name; ``TrainConfig.task``
holds an instance, so task options are set from YAML (``task: {name: mcr2, eps: 0.5}``) or the command line
(``--task mcr2 --task.eps 0.5``), saved in every checkpoint and checked on resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.config import dataclass_from_dict, validate_dataclass
from ratelab.core.dist import DistInfo, all_reduce_sum
from ratelab.core.errors import ConfigError, UnknownNameError, did_you_mean

__all__ = [
    "TASKS",
    "ClassificationConfig",
    "ClassificationTask",
    "EvalContext",
    "OptimizerSpec",
    "Task",
    "TaskConfig",
    "batch_length",
    "build_task",
    "register_task",
    "resolve_task_config",
    "split_batch",
]


@dataclass
class TaskConfig:
    """Base of every task's config: ``name`` selects the registered task."""

    name: str = "classification"


@dataclass(frozen=True)
class EvalContext:
    """What :meth:`Task.evaluate` gets besides the model.

    Attributes:
        loader: this rank's shard of the validation set, batches already on ``device`` (None: the task has no
            validation set; sample-based evaluation such as generation grids still runs).
        out_dir: the run directory (write figures under it, e.g. ``out_dir / "samples" / f"step{step}.png"``).
        step: optimizer steps done; epoch: the 0-based epoch just finished.
        dist: this process's :class:`~ratelab.core.dist.DistInfo`; device: where to compute.
        tag: ``""`` for the trained weights, ``"ema"`` for the EMA copy (the trainer suffixes its keys).
    """

    loader: Any
    out_dir: Path
    step: int
    epoch: int
    dist: DistInfo
    device: torch.device
    tag: str = ""


@dataclass
class OptimizerSpec:
    """One optimizer of a task that needs several (e.g. a VQ-GAN's generator and discriminator).

    Attributes:
        name: key of the optimizer in checkpoints and logs; passed to ``training_step(..., optimizer=name)``.
        optimizer: built on the parameters of the model the task gets in :meth:`Task.configure_optimizers`.
        scheduler: optional; anything with ``step()``, ``state_dict()``, ``load_state_dict()`` (default: the
            trainer's warmup-cosine schedule for this optimizer, from the run's lr settings).
        grad_clip: per-optimizer clipping norm (default: the run's ``grad_clip``).
    """

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    grad_clip: float | None = None


TASKS: dict[str, type] = {}


def register_task(name: str, *, config: type | None = None) -> Callable[[type], type]:
    """Class decorator: make a task constructible by name, with its config dataclass.

    Args:
        name: ``TrainConfig.task.name`` / ``ratelab train --task NAME``.
        config: a :class:`TaskConfig` subclass whose ``name`` defaults to ``name`` (default: a bare
            :class:`TaskConfig` for tasks without options).
    """

    def deco(cls: type) -> type:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered (by {TASKS[name].__module__})")
        cfg_cls = config if config is not None else getattr(cls, "Config", None)
        if cfg_cls is None or cfg_cls is TaskConfig:
            cfg_cls = dataclasses.make_dataclass(f"{cls.__name__}Config", [("name", str, dataclasses.field(
                default=name))], bases=(TaskConfig,))
        if not (dataclasses.is_dataclass(cfg_cls) and issubclass(cfg_cls, TaskConfig)):
            raise TypeError(f"task {name!r}: config must be a TaskConfig dataclass, got {cfg_cls!r}")
        if cfg_cls().name != name:
            raise TypeError(f"task {name!r}: {cfg_cls.__name__}.name defaults to {cfg_cls().name!r}, not {name!r}")
        cls.Config = cfg_cls
        cls.task_name = name
        TASKS[name] = cls
        return cls

    return deco


def _ensure_tasks() -> None:
    # The built-in tasks register on import of ratelab.train; a config can be resolved before that.
    import ratelab.train  # noqa: F401


def resolve_task_config(value: Any, key: str = "task") -> TaskConfig:
    """A task config instance from None (classification), a name, a mapping with ``name`` or an instance.

    Raises:
        UnknownNameError: unknown task name ("did you mean").
        ConfigError: unknown or ill-typed task option, naming ``task.<option>``.
    """
    _ensure_tasks()
    if value is None:
        value = "classification"
    if isinstance(value, TaskConfig):
        name = value.name
        if name not in TASKS:
            raise _unknown(name)
        if not isinstance(value, TASKS[name].Config):
            raise ConfigError(f"{key}: task {name!r} takes {TASKS[name].Config.__name__}, got {type(value).__name__}")
        validate_dataclass(value, prefix=key)
        return value
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a task name or a mapping with 'name', got {type(value).__name__}")
    name = value.get("name", "classification")
    if not isinstance(name, str) or name not in TASKS:
        raise _unknown(str(name))
    return dataclass_from_dict(TASKS[name].Config, dict(value), prefix=key)


def _unknown(name: str) -> UnknownNameError:
    return UnknownNameError(f"task: unknown task {name!r}{did_you_mean(name, TASKS)}; registered tasks: "
                            f"{sorted(TASKS)}")


def build_task(cfg_or_name: Any = None, **kwargs: Any) -> Task:
    """Instantiate a registered task from a :class:`TrainConfig`, a task config, a mapping or a name.

    ``kwargs`` go to the task's constructor (datasets, or option values when a name is given).

    Raises:
        UnknownNameError: unknown name (the message lists the registered ones).
    """
    task_cfg = getattr(cfg_or_name, "task", cfg_or_name) if not isinstance(cfg_or_name, (str, dict)) else cfg_or_name
    if isinstance(task_cfg, str) and kwargs:
        options = {k: v for k, v in kwargs.items() if k in {f.name for f in dataclasses.fields(_cls(task_cfg).Config)}}
        task_cfg = {"name": task_cfg, **options}
        kwargs = {k: v for k, v in kwargs.items() if k not in options}
    task_cfg = resolve_task_config(task_cfg)
    return TASKS[task_cfg.name](task_cfg, **kwargs)


def _cls(name: str) -> type:
    _ensure_tasks()
    if name not in TASKS:
        raise _unknown(name)
    return TASKS[name]


# ---- batches -------------------------------------------------------------------------------------------------


def batch_length(batch: Any) -> int:
    """Number of examples in a collated batch: the leading size of its first tensor (0 for ``None``)."""
    if batch is None:
        return 0
    t = _first_tensor(batch)
    if t is None:
        raise TypeError(f"cannot tell the number of examples in a batch of type {type(batch).__name__}; "
                        "override Task.batch_size")
    return int(t.shape[0])


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in items:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Split every tensor of a batch along dim 0 into consecutive chunks of ``sizes`` (other leaves are shared)."""
    if isinstance(batch, torch.Tensor):
        return list(torch.split(batch, list(sizes)))
    if isinstance(batch, dict):
        parts = {k: split_batch(v, sizes) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(len(sizes))]
    if isinstance(batch, (list, tuple)):
        cols = [split_batch(v, sizes) for v in batch]
        rows = [[c[i] for c in cols] for i in range(len(sizes))]
        if hasattr(batch, "_fields"):
            return [type(batch)(*r) for r in rows]
        return [type(batch)(r) for r in rows]
    return [batch] * len(sizes)


# ---- the base class ------------------------------------------------------------------------------------------


class Task:
    """Base class of the trainer's tasks; subclasses implement the first three methods, the rest are optional hooks.

    The trainer calls, in order:

    1. ``build_datasets(cfg) -> (train, val)``: map-style datasets; ``val`` may be None.
    2. ``build_model(cfg) -> nn.Module``: the bare model on CPU (it may use attributes of the datasets built in 1).
       Build it with :func:`ratelab.create_model` so that it can be saved and reloaded by name.
    3. ``setup(device, dist)``: move frozen auxiliary modules (a tokenizer, a feature extractor) to the device.
    4. ``configure_optimizers(model, cfg) -> list[OptimizerSpec] | None``: None (default) = one optimizer built by
       the trainer from the run's settings. Several specs are stepped in the order given, each with its own
       ``training_step(model, batch, cfg, optimizer=spec.name)`` call, backward and step.
    5. ``training_step(model, batch, cfg[, optimizer=name]) -> (loss, metrics)`` per micro-batch, in train mode under
       autocast. ``batch`` is the collated local (micro-)batch, on the device. ``model`` may be wrapped (DDP/FSDP,
       plugins): call ``model(...)``. ``loss`` is the MEAN over the examples of this micro-batch (a scalar tensor):
       the trainer weights micro-batches by their share of the global batch, so variable and uneven batches average
       correctly. ``metrics`` maps names to scalars (detached).
    6. ``evaluate(model, ctx) -> metrics`` in eval mode under ``torch.no_grad`` with ``ctx`` an
       :class:`EvalContext`; the task reduces across ranks itself so that every rank returns the global numbers.
       Keys should start with ``val_``. ``ctx.loader`` is None without a validation set.
    7. ``state_dict()`` / ``load_state_dict(state)``: task state that must survive a resume (e.g. codebook-usage
       counters); saved in every checkpoint.

    Class attributes: ``supports_accumulation`` (False for losses over the whole batch, e.g. MCR², where micro-batches
    would change the objective: ``accum_steps > 1`` is then an error), ``ddp_find_unused_parameters``,
    ``per_sample_loss`` (True: the loss is a mean of per-example terms, each a function of its own example only, and
    ``training_step(model, batch, cfg, per_sample=True)`` returns the ``(n,)`` vector of those terms instead of their
    mean; what DP-SGD clips, see :mod:`ratelab.train.privacy_plugin` and docs/privacy.md).
    """

    Config: ClassVar[type] = TaskConfig
    task_name: ClassVar[str] = ""
    supports_accumulation: ClassVar[bool] = True
    ddp_find_unused_parameters: ClassVar[bool] = False
    per_sample_loss: ClassVar[bool] = False

    def __init__(self, config: TaskConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError(f"{type(self).__name__}: pass either a config or options, not both")
        if config is None:
            config = dataclass_from_dict(self.Config, {"name": self.task_name, **options}, prefix="task")
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__}: config must be {self.Config.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # Task options read as attributes (task.eps); only reached when normal lookup fails.
        cfg = self.__dict__.get("config")
        if cfg is not None and name in {f.name for f in dataclasses.fields(cfg)}:
            return getattr(cfg, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        raise NotImplementedError

    def build_model(self, cfg: Any) -> nn.Module:
        raise NotImplementedError

    def training_step(self, model: nn.Module, batch: Any, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def setup(self, device: torch.device, dist: DistInfo) -> None:
        return None

    def configure_optimizers(self, model: nn.Module, cfg: Any) -> list[OptimizerSpec] | None:
        return None

    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state to load, got keys {sorted(state)}")

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch`` (the trainer's weighting of micro-batches uses it)."""
        return batch_length(batch)


# ---- classification -------------------------------------------------------------------------------------------


@dataclass
class ClassificationConfig(TaskConfig):
    """Options of supervised classification (label smoothing stays the run-level ``label_smoothing``)."""

    name: str = "classification"


def _dataset_kwargs(cfg: Any) -> dict[str, Any]:
    return {"root": cfg.data_root, "img_size": cfg.img_size, "seed": cfg.seed, **cfg.dataset_kwargs}


@register_task("classification", config=ClassificationConfig)
class ClassificationTask(Task):
    """Supervised image classification with (label-smoothed) cross-entropy.

    Datasets come from :func:`ratelab.data.build_dataset` (``cfg.dataset``, splits ``"train"`` and ``"val"``)
    unless given here. The model is ``create_model(cfg.model, num_classes, img_size, in_chans, **cfg.model_kwargs)``
    where each of the three is taken, in order of preference, from ``cfg.model_kwargs``, the config field
    (``num_classes``, ``img_size``) and the training dataset's attribute of the same name.

    Args:
        config: the task config (default: :class:`ClassificationConfig`).
        train_dataset: optional dataset to use instead of building ``cfg.dataset``'s train split. Items are
            ``(image (C, H, W) float32, int label)``.
        val_dataset: optional validation dataset (used only together with ``train_dataset``; None = no eval).
    """

    per_sample_loss = True

    def __init__(self, config: ClassificationConfig | None = None, *, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None) -> None:
        super().__init__(config)
        if val_dataset is not None and train_dataset is None:
            raise ValueError("ClassificationTask: val_dataset was given without train_dataset")
        self._given = train_dataset is not None
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset

    # ---- data and model -----------------------------------------------------------------------------------
    def build_datasets(self, cfg: Any) -> tuple[Dataset, Dataset | None]:
        if not self._given:
            from ratelab.data import build_dataset

            common = _dataset_kwargs(cfg)
            self.train_dataset = build_dataset(cfg.dataset, "train", augment=cfg.augment, **common)
            self.val_dataset = build_dataset(cfg.dataset, "val", **common)
        return self.train_dataset, self.val_dataset

    def model_kwargs(self, cfg: Any) -> dict[str, Any]:
        """The keyword arguments :meth:`build_model` passes to ``create_model`` (after :meth:`build_datasets`)."""
        ds = self.train_dataset
        kw = dict(cfg.model_kwargs)
        for name, value in (("num_classes", cfg.num_classes), ("img_size", cfg.img_size), ("in_chans", None)):
            if name not in kw:
                kw[name] = value if value is not None else getattr(ds, name, None)
        return kw

    def build_model(self, cfg: Any) -> nn.Module:
        from ratelab import create_model

        if self.train_dataset is None:
            raise RuntimeError("ClassificationTask.build_model: call build_datasets first")
        return create_model(cfg.model, **self.model_kwargs(cfg))

    # ---- training and evaluation --------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any, cfg: Any,
                      per_sample: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, C, H, W) images and (B,) labels -> mean cross-entropy over the micro-batch (``per_sample``: the (B,)
        per-example cross-entropies), and accuracy."""
        x, y = batch[0], batch[1]
        logits = model(x)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing,
                               reduction="none" if per_sample else "mean")
        acc = (logits.detach().argmax(dim=-1) == y).float().mean()
        return loss, {"acc": acc}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Plain (unsmoothed) cross-entropy and top-1 accuracy over the whole validation set (all ranks)."""
        from ratelab.eval.classification import classification_sums

        if ctx.loader is None:
            return {}
        sums = classification_sums(model, ctx.loader, device=ctx.device)
        total = all_reduce_sum(torch.stack([sums["loss_sum"], sums["correct"], sums["n"]]).double())
        loss_sum, correct, n = total.tolist()
        if n == 0:
            return {}
        return {"val_loss": loss_sum / n, "val_acc": correct / n}
