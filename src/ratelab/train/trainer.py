"""The one training loop of ratelab: ``Trainer(cfg, task).fit()``.

The trainer owns devices, the data-parallel strategy (DDP or FSDP2), mixed precision, gradient accumulation,
optimizers, schedules, EMA, plugins, checkpoints, logging and resumption; the :class:`~ratelab.train.tasks.Task`
owns data, model, loss and evaluation. Extension points, so that no family needs edits here:

* Task hooks (:class:`~ratelab.train.tasks.Task`): ``configure_optimizers`` (several optimizers stepped in the
  task's order), ``setup(device, dist)`` (frozen auxiliary modules), ``state_dict``/``load_state_dict`` (task
  state in every checkpoint), ``evaluate(model, ctx)`` (runs with or without a validation set), ``batch_size``.
* Plugins (:mod:`ratelab.train.plugins`): wrap the model, the optimizer and the sampler, add checkpoint state, may
  forbid raw-gradient statistics (differential privacy) and may step on empty batches.
* Strategies (:mod:`ratelab.train.strategy`): ``single``, ``ddp``, ``fsdp``; checkpoints through the strategy.

One *step* is one logical (global) batch: ``accum_steps`` micro-batches per rank, one optimizer step per optimizer.
Batches may vary in size and be empty (Poisson sampling): every micro-batch's mean loss is weighted by its share of
the global batch, so the update is the gradient of the global mean loss whatever the split; an empty global batch
skips the optimizer step (schedule and EMA do not advance) unless a plugin asks to step on it.

Reproducibility contract (CPU, ``num_workers`` any): a run killed at any point and resumed with ``resume=True``
ends with bitwise the same weights as an uninterrupted run. What makes it hold:

* the data order of epoch ``e`` is a function of ``(seed, e)`` (:mod:`ratelab.train.data`), and a resumed epoch
  skips the batches it already consumed without loading them;
* with ``seeded_augmentation`` (default) every item's augmentation is drawn under a seed of ``(seed, epoch,
  index)``, so it does not depend on the process, worker or batch that loads it: N data-parallel processes see the
  augmentation one process sees (any remaining difference is float summation order), and so does any
  ``num_workers``;
* checkpoints hold every RNG state that training consumes (dropout and the like), taken between steps;
* evaluation runs inside a saved-and-restored RNG state, so evaluating (or not) never shifts the training stream;
* running averages of logged metrics, task state and plugin state are checkpointed too;
* an exception that ends :meth:`Trainer.fit` (a corrupt image, a failing evaluation, a plugin) first writes an
  emergency checkpoint of the last completed step (one process; see ``_save_emergency_checkpoint``), so a run
  resumed after the fix ends as the uninterrupted one would.

Dropout and drop-path draw from each rank's own stream, so with them on, N processes differ from one process.

Files in ``out_dir``: ``config.json`` (the resolved config), ``metrics.jsonl`` (one JSON object per line: ``kind`` =
train, eval, resume, diverged or failed, ``step``, ``epoch``, ...), ``checkpoints/last.pt`` (``checkpoints/last/`` under
FSDP), ``model.safetensors`` + ``model_config.json`` (final raw weights; :func:`ratelab.core.checkpoint.load_model`
reads the directory), ``ema/`` (final EMA weights, if enabled), ``init/`` (with ``save_init``),
``final_metrics.json``, ``tb/`` (TensorBoard, only when the ``tensorboard`` package is installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader

from ratelab.core.checkpoint import atomic_write_text, load_torch_file, model_config, save_model
from ratelab.core.dist import DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from ratelab.core.errors import CheckpointError, ConfigError, TrainingDiverged
from ratelab.core.seeding import capture_rng_state, derive_seed, restore_rng_state, seed_everything
from ratelab.train.config import TrainConfig
from ratelab.train.data import (
    DeviceLoader,
    EvalShardSampler,
    SeededItems,
    ShardedBatchSampler,
    collate_or_none,
    to_device,
)
from ratelab.train.ema import ModelEma
from ratelab.train.optim import build_optimizer
from ratelab.train.plugins import Plugin, build_plugins
from ratelab.train.schedule import WarmupCosine
from ratelab.train.strategy import build_strategy
from ratelab.train.tasks import EvalContext, OptimizerSpec, split_batch

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "Trainer",
    "TrainingDiverged",
    "capture_rng_state",
    "read_checkpoint_config",
    "restore_rng_state",
    "seed_everything",
]

CHECKPOINT_FORMAT_VERSION = 2
_REQUIRED_TASK_METHODS = ("build_datasets", "build_model", "training_step")


# ---- running averages --------------------------------------------------------------------------------------------


class _Meter:
    """Sums of per-step scalars over a window (log interval or epoch), averaged over steps and ranks on demand."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v).to(self.device, torch.float64)
            self.sums[k] = self.sums[k] + t if k in self.sums else t.clone()
        self.count += 1

    def _reduced(self) -> dict[str, float]:
        # Collective under DDP: every rank calls it at the same step. With variable-size batches a rank can have
        # held no examples (no task metrics) in the window, so the key set is the union over ranks (missing = 0).
        keys = set(self.sums)
        if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            parts: list[Any] = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(parts, sorted(keys))
            keys = set().union(*map(set, parts))
        if not keys:
            return {}
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        ordered = sorted(keys)
        stacked = all_reduce_mean(torch.stack([self.sums.get(k, zero).reshape(()) for k in ordered]))
        return dict(zip(ordered, stacked.tolist()))

    def means(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        return {k: v / self.count for k, v in self._reduced().items()}

    def state_dict(self) -> dict[str, Any]:
        # Rank-averaged sums: after loading them on every rank, mean_r(c + x_r) = c + mean_r(x_r) keeps the
        # eventual average exact under DDP.
        return {"count": self.count, "sums": self._reduced()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in state["sums"].items()}


# ---- checkpoint helpers ------------------------------------------------------------------------------------------


def read_checkpoint_config(out_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The checkpoint of the run in ``out_dir`` and its saved config (as a dict), without loading any weights.

    Raises:
        ConfigError: ``out_dir`` holds no checkpoint (the message says what was looked for).
        CheckpointError: the checkpoint is unreadable or was not written by the ratelab trainer.
    """
    ckpt_dir = Path(out_dir) / "checkpoints"
    for cand in (ckpt_dir / "last.pt", ckpt_dir / "last" / "extra.pt", ckpt_dir / ".last.old" / "extra.pt"):
        if cand.is_file():
            state = load_torch_file(cand, what="training checkpoint", mmap=True)
            if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
                raise CheckpointError(f"{cand}: no saved config inside; it was not written by the ratelab trainer")
            return cand, state["config"]
    if not Path(out_dir).exists():
        raise ConfigError(f"resume: the run directory {out_dir} does not exist (check --out-dir)")
    raise ConfigError(f"resume: {out_dir} holds no checkpoint ({ckpt_dir}/last.pt or last/); nothing to resume. "
                      "Start the run without --resume.")


def _clean_stale_temporaries(out_dir: Path) -> list[Path]:
    # Atomic writes go through ".<name>.<random>.tmp" files in the target directory; a killed writer leaves one.
    removed = []
    for d in (out_dir, out_dir / "checkpoints", out_dir / "ema", out_dir / "init"):
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                if f.is_file():
                    f.unlink(missing_ok=True)
                    removed.append(f)
    return removed


def _call_training_step(task: Any, wants_optimizer: bool, model: nn.Module, batch: Any, cfg: TrainConfig,
                        name: str, per_sample: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    kwargs: dict[str, Any] = {"per_sample": True} if per_sample else {}
    if wants_optimizer:
        kwargs["optimizer"] = name
    return task.training_step(model, batch, cfg, **kwargs)


# ---- trainer -----------------------------------------------------------------------------------------------------


class Trainer:
    """Train ``task`` as configured by ``cfg``; works unchanged in one process and under torchrun.

    Construction builds datasets, model, strategy wrapper, optimizers, schedules and (with ``cfg.resume``) loads the
    last checkpoint; :meth:`fit` runs the loop and returns the final metrics.

    Args:
        cfg: the run configuration. Its ``task`` section is taken from ``task.config`` (the task object is the
            authority on its own options); a ``cfg.task`` that names another task, or other options, is an error.
        task: a :class:`~ratelab.train.tasks.Task` (or an object with ``build_datasets``, ``build_model`` and
            ``training_step``; the optional hooks then take their defaults).
        plugins: plugin objects in addition to those configured in ``cfg.plugins``.

    Attributes:
        model: the bare (unwrapped) model being trained.
        ema_model: the EMA copy (``cfg.ema_decay > 0``) or None.
        optimizers: ``{name: optimizer}`` in stepping order; ``optimizer`` is the first.
        dist: this process's :class:`~ratelab.core.dist.DistInfo`; strategy: the data-parallel strategy.
        step, epoch: logical steps done; current 0-based epoch. optimizer_steps: updates actually taken.

    Raises:
        ConfigError: the global batch does not divide over ranks and micro-steps or exceeds the training set;
            ``out_dir`` already holds a checkpoint and ``resume`` is off; ``resume`` is on and there is no
            checkpoint; a resumed run's settings differ from the saved ones (each differing key is named).

    Example:
        >>> cfg = TrainConfig(model="crate_nano_patch4_16", dataset="digits", epochs=60, out_dir="runs/x")
        >>> result = Trainer(cfg, ClassificationTask()).fit()
        >>> result["val_acc"]
    """

    def __init__(self, cfg: TrainConfig, task: Any, *, plugins: list[Plugin] | None = None) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        missing = [m for m in _REQUIRED_TASK_METHODS if not callable(getattr(task, m, None))]
        if missing:
            raise TypeError(f"task {type(task).__name__} does not implement {missing} (see ratelab.train.Task)")
        cfg.validate()
        cfg = self._adopt_task_config(cfg, task)
        self.cfg, self.task = cfg, task
        had_pg = torch_dist.is_available() and torch_dist.is_initialized()
        self.dist: DistInfo = init_distributed(cfg.device)
        self._owns_process_group = not had_pg and self.dist.distributed
        world = self.dist.world_size
        if cfg.batch_size % world:
            raise ConfigError(f"batch_size: the global batch {cfg.batch_size} is not divisible by the {world} ranks; "
                              f"use a multiple of {world}")
        if cfg.accum_steps > 1 and not getattr(task, "supports_accumulation", True):
            raise ConfigError(f"accum_steps: task {cfg.task.name!r} computes its loss over the whole batch "
                              f"({type(task).__name__}.supports_accumulation is False); use accum_steps=1")
        if cfg.batch_size // world < cfg.accum_steps:
            raise ConfigError(f"accum_steps: {cfg.accum_steps} micro-steps need at least that many examples per rank "
                              f"(the global batch {cfg.batch_size} gives {cfg.batch_size // world})")
        self.device = self.dist.device
        self.strategy = build_strategy(cfg.strategy, self.dist)
        self.out_dir = Path(cfg.out_dir)
        found = self.strategy.checkpoint_exists(self.out_dir)
        if cfg.resume and found is None:
            read_checkpoint_config(self.out_dir)  # raises the explanatory error
        if not cfg.resume and found is not None:
            raise ConfigError(f"out_dir: {found} already exists; pass resume=True (--resume) to continue that run, "
                              "or choose another out_dir (or delete it)")
        self.ckpt_path = self.strategy.checkpoint_path(self.out_dir)
        if self.dist.is_main:
            _clean_stale_temporaries(self.out_dir)

        self.plugins = build_plugins(cfg.plugins, plugins)
        self._grad_stats = all(p.allows_grad_stats for p in self.plugins)
        if not self._grad_stats and cfg.grad_clip > 0:
            names = [p.plugin_name for p in self.plugins if not p.allows_grad_stats]
            raise ConfigError(f"grad_clip: plugin(s) {names} clip gradients themselves; set grad_clip=0")
        self._loss_plugin = self._per_sample_plugin(task)
        limits = [p.max_micro_batch for p in self.plugins if p.max_micro_batch]
        self._max_micro = min(limits) if limits else None
        self.amp_dtype, self.scaler = self._resolve_amp(cfg.amp)
        if self.scaler is not None and self.strategy.name == "fsdp":
            raise ConfigError("amp: fp16 loss scaling is not supported with strategy 'fsdp'; use amp=bf16 (FSDP's "
                              "bf16 parameter policy on GPU)")

        # Same seed on every rank: identical datasets and initial weights.
        seed_everything(cfg.seed)
        self.train_dataset, self.val_dataset = task.build_datasets(cfg)
        if cfg.validate_data:
            self._validate_data()
        self.steps_per_epoch = len(self._batch_sampler(epoch=0, start_step=0))
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size: the global batch {cfg.batch_size} is larger than the training set "
                              f"({len(self.train_dataset)} items)")
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        self.schedule_steps = self.total_steps
        self.warmup_steps = min(warmup, self.total_steps)
        eval_batch = cfg.eval_batch_size or cfg.batch_size
        self.local_eval_batch = max(1, eval_batch // world)

        model = task.build_model(cfg)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(task).__name__}.build_model returned {type(model).__name__}, not an nn.Module")
        if cfg.init_from and not cfg.resume:
            # A resumed run's weights come from its checkpoint; the start it was initialized from is history.
            from ratelab.core.init_from import init_from

            report = init_from(model, cfg.init_from, reinit=cfg.init_reinit.split(","))
            if self.dist.is_main:
                print(f"[train] {report.line()}", flush=True)
        self.model = model.to(self.device)
        if callable(getattr(task, "setup", None)):
            task.setup(self.device, self.dist)
        for p in self.plugins:
            p.setup(self)
        if cfg.ema_decay > 0 and self.strategy.name == "fsdp":
            raise ConfigError("ema_decay: EMA is not supported with strategy 'fsdp' (the average would need the "
                              "full weights on every rank); use ddp or turn EMA off")
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if cfg.compile:
            self._compile_model()
        wrapped: nn.Module = self.model
        for p in self.plugins:
            wrapped = p.wrap_model(wrapped)
        fsdp_bf16 = self.strategy.name == "fsdp" and self.amp_dtype == torch.bfloat16 and self.device.type == "cuda"
        self.wrapped = self.strategy.wrap(
            wrapped,
            find_unused_parameters=bool(getattr(task, "ddp_find_unused_parameters", False)),
            activation_checkpointing=cfg.activation_checkpointing,
            mixed_precision="bf16" if fsdp_bf16 else "none",
        )
        if fsdp_bf16:
            self.amp_dtype = None  # FSDP's parameter dtype policy replaces autocast
        self.specs = self._build_optimizers()
        self.optimizers = {s.name: s.optimizer for s in self.specs}
        self.optimizer = self.specs[0].optimizer
        self.scheduler = self.specs[0].scheduler
        self._wants_optimizer = len(self.specs) > 1 or "optimizer" in inspect.signature(task.training_step).parameters
        self._params = {s.name: [p for g in s.optimizer.param_groups for p in g["params"]] for s in self.specs}

        self.step = 0
        self.optimizer_steps = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._window = _Meter(self.device)
        self._epoch_meter = _Meter(self.device)
        self._last_epoch_train: dict[str, float] = {}
        self._last_eval: dict[str, float] = {}
        self._last_eval_step = -1
        self._last_ckpt_step: int | None = None
        # Between the first optimizer step of a step and the end of its bookkeeping the state is half-updated; an
        # exception then has no consistent state to save (see _save_emergency_checkpoint).
        self._mid_update = False
        self._step_rng: tuple[torch.Tensor, Any] | None = None
        self._elapsed_before = 0.0
        self.resumed_from: int | None = None
        self._resume_changes: list[tuple[str, Any, Any]] = []
        self._lr = self.optimizer.param_groups[0]["lr"]
        self._t_start = time.perf_counter()
        extra = self._load_checkpoint(found) if cfg.resume else None

        # The training RNG stream (dropout and the like) starts here; each rank gets its own.
        if extra is None:
            seed_everything(derive_seed(cfg.seed, self.dist.rank, 1) % 2**32)
        else:
            self._restore_rng(extra["rng"])
        self._pbar: Any = None
        self._jsonl: Any = None
        self._tb: Any = None

    @property
    def ema_model(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    # ---- setup helpers -----------------------------------------------------------------------------------------
    @staticmethod
    def _adopt_task_config(cfg: TrainConfig, task: Any) -> TrainConfig:
        own = getattr(task, "config", None)
        if own is None or not hasattr(own, "name"):
            return cfg  # a duck-typed task without a config: cfg.task stays as given
        if cfg.task == own:
            return cfg
        # A cfg that names no task, or only the task's name, takes the object's options.
        if cfg.task not in (type(cfg)().task, type(own)()):
            from ratelab.core.config import config_diff

            diff = ", ".join(f"task.{k}: cfg {a!r} vs task object {b!r}" for k, a, b in config_diff(cfg.task, own))
            raise ConfigError(f"task: the config's task section differs from the task object ({diff}); set one")
        return cfg.replace(task=own)

    def _per_sample_plugin(self, task: Any) -> Plugin | None:
        owners = [p for p in self.plugins if p.per_sample_loss]
        if not owners:
            return None
        if len(owners) > 1:
            raise ConfigError(f"plugins: {[p.plugin_name for p in owners]} all take over the backward pass "
                              "(per_sample_loss); enable one of them")
        if not getattr(task, "per_sample_loss", False):
            raise ConfigError(
                f"plugins.{owners[0].plugin_name}: needs per-example losses, and task {type(task).__name__} does "
                "not provide them: its loss is not declared a sum of per-example terms (Task.per_sample_loss = "
                "True with training_step(..., per_sample=True) returning a (n,) vector; see docs/privacy.md). "
                "Losses that couple the examples of a batch (contrastive, batch statistics) cannot be clipped per "
                "example.")
        self._per_sample_kw = "per_sample" in inspect.signature(task.training_step).parameters
        return owners[0]

    def _resolve_amp(self, amp: str) -> tuple[torch.dtype | None, Any]:
        dev = self.device.type
        if amp == "auto":
            amp = "bf16" if dev == "cuda" else "none"
        if amp == "fp16" and dev != "cuda":
            raise ConfigError(f"amp: fp16 (with loss scaling) needs CUDA, the device is {self.device}; use bf16 or "
                              "none")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        return dtype, scaler

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _compile_model(self) -> None:
        """``cfg.compile``: compile the raw model in place (``nn.Module.compile``: no ``_orig_mod.`` key prefix)."""
        if self.strategy.name == "fsdp":
            raise ConfigError("compile: not supported with strategy 'fsdp' (FSDP2 must shard the module before it is "
                              "compiled); use ddp or drop --compile")
        owners = [p.plugin_name or type(p).__name__ for p in self.plugins
                  if type(p).wrap_model is not Plugin.wrap_model or p.per_sample_loss]
        if owners:
            raise ConfigError(f"compile: plugin(s) {owners} wrap the model or take over its backward (per-example "
                              "gradients), which torch.compile cannot trace through; drop --compile")
        # Static shapes: a new batch size or length recompiles instead of tracing symbolic sizes, which inductor
        # 2.14 cannot order the strides of in the Mamba-2 mixer ("cannot determine truth value of Relational").
        self.model.compile(dynamic=False)

    def _build_optimizers(self) -> list[OptimizerSpec]:
        cfg = self.cfg
        hook = getattr(self.task, "configure_optimizers", None)
        specs = hook(self.model, cfg) if callable(hook) else None
        if specs is None:
            opt = build_optimizer(self.model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=cfg.betas)
            specs = [OptimizerSpec("main", opt)]
        specs = list(specs)
        names = [s.name for s in specs]
        if not specs or len(set(names)) != len(names) or not all(isinstance(s, OptimizerSpec) for s in specs):
            raise TypeError(f"{type(self.task).__name__}.configure_optimizers must return OptimizerSpecs with "
                            f"distinct names, got {names}")
        for s in specs:
            for p in self.plugins:
                s.optimizer = p.wrap_optimizer(s.optimizer, self.model)
            if s.scheduler is None:
                s.scheduler = WarmupCosine(s.optimizer, warmup_steps=self.warmup_steps,
                                           total_steps=self.schedule_steps, min_lr=cfg.min_lr)
        return specs

    def _batch_sampler(self, *, epoch: int, start_step: int) -> Any:
        common = dict(global_batch=self.cfg.batch_size, rank=self.dist.rank, world_size=self.dist.world_size,
                      seed=self.cfg.seed, epoch=epoch, start_step=start_step)
        for p in getattr(self, "plugins", []):
            sampler = p.batch_sampler(len(self.train_dataset), **common)
            if sampler is not None:
                return sampler
        return ShardedBatchSampler(len(self.train_dataset), **common)

    def _train_loader(self) -> DataLoader:
        sampler = self._batch_sampler(epoch=self.epoch, start_step=self.batch_in_epoch)
        self._fixed_size = bool(getattr(sampler, "fixed_size", False))
        data = self.train_dataset
        if self.cfg.seeded_augmentation:
            data = SeededItems(data, seed=self.cfg.seed, epoch=self.epoch)
        # An explicit generator: DataLoader otherwise draws its worker base seed from the global RNG, which would
        # shift the training stream when a resumed run creates its loader mid-epoch.
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, self.dist.rank, 2))
        return DataLoader(
            data,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=g,
            collate_fn=collate_or_none,
        )

    def _eval_loader(self, dataset: Any) -> DeviceLoader:
        sampler = EvalShardSampler(
            len(dataset), batch_size=self.local_eval_batch, rank=self.dist.rank, world_size=self.dist.world_size
        )
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, 3))
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=g,
        )
        return DeviceLoader(loader, self.device)

    def _validate_data(self) -> None:
        from ratelab.data.common import validate_dataset

        t0 = time.perf_counter()
        for ds in {id(d): d for d in (self.train_dataset, self.val_dataset) if d is not None}.values():
            validate_dataset(ds)
        took = time.perf_counter() - t0
        if took > 30 and self.dist.is_main:
            print(f"[train] checking the dataset's files took {took:.0f} s (--no-validate-data skips it)", flush=True)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming if configured) and return the final metrics.

        Returns:
            ``val_loss``, ``val_acc`` (task-specific eval keys, plus ``*_ema`` with EMA, plus plugin metrics),
            ``train_loss`` and the other training metrics averaged over the last (possibly partial) epoch,
            ``steps``, ``optimizer_steps``, ``epochs`` (completed, fractional), ``time_s`` (summed over resumed
            segments), ``lr``, ``out_dir``.

        Raises:
            TrainingDiverged: the loss or gradient became non-finite; the last checkpoint is kept.
            Exception: anything else raised while training (a data item, the task, an evaluation, a plugin), after
                an emergency checkpoint of the last completed step was written (one process only; see
                :meth:`_save_emergency_checkpoint`).
        """
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            if self.cfg.deterministic:
                if self.device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            return self._fit()
        except (Exception, KeyboardInterrupt) as e:
            self._save_emergency_checkpoint(e)
            raise
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            self._close_loggers()
            self.strategy.close()
            if self._owns_process_group:
                cleanup()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._open_loggers()
        if self.dist.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            self._print(
                f"[train] {cfg.model}: {n_params / 1e6:.3f}M params | {len(self.train_dataset)} train, "
                f"{len(self.val_dataset) if self.val_dataset is not None else 0} val | "
                f"{self.steps_per_epoch} steps/epoch x {math.ceil(self.total_steps / self.steps_per_epoch)} epochs = "
                f"{self.total_steps} steps | world {self.dist.world_size} ({self.strategy.name}), device "
                f"{self.device}, amp {self.amp_dtype or 'none'}"
                + (f", accum {cfg.accum_steps}" if cfg.accum_steps > 1 else "")
                + (f" | resumed at step {self.step}" if self.resumed_from is not None else "")
            )
            for key, old, new in self._resume_changes:
                self._print(f"[train] resume: {key} changed {old!r} -> {new!r}"
                            + (f" (the learning-rate schedule keeps its length of {self.schedule_steps} steps)"
                               if key in ("epochs", "max_steps") else ""))
        from tqdm.auto import tqdm

        self._t_start = time.perf_counter()
        self._pbar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                          disable=not (cfg.progress and self.dist.is_main), file=sys.stderr)
        self._snapshot_step_rng()
        if self.batch_in_epoch == self.steps_per_epoch:
            # Only an emergency checkpoint stops here: the end-of-epoch evaluation failed. Finish that epoch.
            self._end_epoch()
        while self.step < self.total_steps:
            for batch in self._train_loader():
                self._train_step(batch)
                self._pbar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log_train()
                if self.batch_in_epoch == self.steps_per_epoch:
                    self._end_epoch()
                if self.step >= self.total_steps:
                    break
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
        self._pbar.close()
        if self._last_eval_step != self.step:
            self._evaluate_and_log()
        self.save_checkpoint()
        result = self._result()
        self._save_final_weights()
        if self.dist.is_main:
            atomic_write_text(json.dumps(result, indent=2), self.out_dir / "final_metrics.json")
            self._print("[train] done: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "out_dir"))
        barrier()
        return result

    def _save_final_weights(self) -> None:
        named = getattr(self.model, "model_name", None) is not None
        sd = self.strategy.full_state_dict(self.wrapped)  # collective
        if not self.dist.is_main:
            return
        if not named:
            # A model built directly (a recipe's timm baseline) has no registry name to rebuild it from, so
            # model.safetensors + model_config.json cannot describe it; its weights are the checkpoint's "model"
            # entry. Nothing for the user to do, so nothing is printed.
            return
        save_model(self.model, self.out_dir, state_dict=sd)
        if self.ema is not None:
            save_model(self.ema.module, self.out_dir / "ema")

    # ---- one step ----------------------------------------------------------------------------------------------
    def _global_count(self, n_local: int) -> int:
        if self._fixed_size:
            return self.cfg.batch_size
        if not self.dist.distributed:
            return n_local
        return int(all_reduce_sum(torch.tensor(float(n_local), device=self.device, dtype=torch.float64)).item())

    def _micro_batches(self, batch: Any, n_local: int) -> list[tuple[Any, int]]:
        if n_local == 0:
            return []
        k = self.cfg.accum_steps
        if self._max_micro:
            k = max(k, -(-n_local // self._max_micro))
        k = min(k, n_local)
        q, r = divmod(n_local, k)
        sizes = [q + (i < r) for i in range(k)]
        parts = split_batch(batch, sizes) if k > 1 else [batch]
        return list(zip(parts, sizes))

    def _train_step(self, batch: Any) -> None:
        cfg, world = self.cfg, self.dist.world_size
        self.wrapped.train()
        batch = to_device(batch, self.device) if batch is not None else None
        n_local = self.task.batch_size(batch) if batch is not None else 0
        n_global = self._global_count(n_local)
        if n_global == 0:
            self._empty_step()
            return
        micro = self._micro_batches(batch, n_local)
        # Variable-size batches under DDP: a rank may hold fewer micro-batches (or none), so DDP's in-backward
        # all-reduce cannot be used; gradients are summed explicitly after the micro-steps.
        manual_sync = self.dist.distributed and not self._fixed_size
        if manual_sync and self.strategy.name != "ddp":
            raise ConfigError(f"strategy: variable-size batches need strategy 'ddp', not {self.strategy.name!r}")
        values: dict[str, Any] = {}
        loss_total = torch.zeros((), device=self.device)
        for spec in self.specs:
            spec.optimizer.zero_grad(set_to_none=True)
            spec_loss = torch.zeros((), device=self.device)
            for i, (mb, n_mb) in enumerate(micro):
                last = i == len(micro) - 1 and not manual_sync
                sync = contextlib.nullcontext() if last or not self.dist.distributed else \
                    self.strategy.no_sync(self.wrapped)
                with sync:
                    with self._autocast():
                        loss, metrics = _call_training_step(self.task, self._wants_optimizer, self.wrapped, mb, cfg,
                                                            spec.name, self._loss_plugin is not None and
                                                            self._per_sample_kw)
                    if self._loss_plugin is not None:
                        loss = self._per_sample_backward(loss, n_mb)
                    else:
                        if (isinstance(loss, torch.Tensor) and loss.ndim == 1
                                and getattr(self.task, "per_sample_loss", False)):
                            loss = loss.mean()  # a task that returns its per-example losses
                        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                            raise TypeError(
                                f"{type(self.task).__name__}.training_step must return a scalar loss tensor, got "
                                f"{type(loss).__name__}"
                                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                        # Weight = this micro-batch's share of the global batch; DDP/FSDP average over the ranks,
                        # so the sum over ranks and micro-batches is the global mean. Integer arithmetic first: the
                        # common case (one micro-batch of B / world) gets exactly 1.0.
                        weight = (n_mb * (1 if manual_sync else world)) / n_global
                        scaled = loss * weight if weight != 1.0 else loss
                        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                share = n_mb / n_local
                spec_loss = spec_loss + loss.detach().float() * share if share != 1.0 else loss.detach().float()
                prefix = "" if len(self.specs) == 1 else f"{spec.name}_"
                for k, v in metrics.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                    v = v.to(self.device)
                    values[prefix + k] = values[prefix + k] + v * share if prefix + k in values else v * share
            if manual_sync:
                self._all_reduce_grads(self._params[spec.name])
            if len(self.specs) > 1:
                values[f"{spec.name}_loss"] = spec_loss
            if spec is self.specs[0]:
                loss_total = spec_loss
            self._optimizer_step(spec, spec_loss, values)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(self.model)
        self._end_step({"loss": loss_total, **values})

    def _per_sample_backward(self, losses: Any, n_mb: int) -> torch.Tensor:
        # The plugin's backward replaces the weighted mean: it sees every example's own loss (DP-SGD clips each).
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (n_mb,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise TypeError(f"{type(self.task).__name__}.training_step(..., per_sample=True) must return a ({n_mb},) "
                            f"vector of per-example losses for this micro-batch of {n_mb}, got {got}")
        self._loss_plugin.backward(losses, scaler=self.scaler)
        return losses.detach().float().mean()

    def _end_step(self, values: dict[str, Any]) -> None:
        # One logical batch consumed (with or without an update): advance the data position, add plugin metrics.
        self._mid_update = True
        self.step += 1
        self.batch_in_epoch += 1
        for p in self.plugins:
            values.update(p.on_step_end(self))
        self._window.add(values)
        self._epoch_meter.add(values)
        self._snapshot_step_rng()
        self._mid_update = False

    def _optimizer_step(self, spec: OptimizerSpec, loss: torch.Tensor, values: dict[str, Any]) -> None:
        params = self._params[spec.name]
        if self.scaler is not None:
            self.scaler.unscale_(spec.optimizer)
        grad_norm = self.strategy.grad_norm(params).float() if self._grad_stats else None
        # One host sync per step: is anything non-finite on any rank? (With fp16 loss scaling an inf gradient is
        # routine -- the scaler skips the step -- so only the loss counts there.)
        bad = (~torch.isfinite(loss)).float()
        if self.scaler is None and grad_norm is not None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        if self.dist.distributed:
            bad = all_reduce_sum(bad)
        if bad.item() > 0:
            self._diverged(loss, grad_norm)
        clip = spec.grad_clip if spec.grad_clip is not None else self.cfg.grad_clip
        if clip > 0 and grad_norm is not None:
            self.strategy.clip_grads_with_norm_(params, clip, grad_norm)
        if spec is self.specs[0]:
            self._lr = spec.optimizer.param_groups[0]["lr"]
        self._mid_update = True
        if self.scaler is not None:
            self.scaler.step(spec.optimizer)
            self.scaler.update()
        else:
            spec.optimizer.step()
        spec.scheduler.step()
        if grad_norm is not None:
            values["grad_norm" if len(self.specs) == 1 else f"{spec.name}_grad_norm"] = grad_norm

    def _all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = all_reduce_sum(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p))
            offset += n

    def _empty_step(self) -> None:
        # Nothing was sampled on any rank. Without a plugin that must act (DP-SGD adds noise to a zero gradient),
        # no update happens: the schedule and EMA stay where they are, only the data position advances.
        if any(p.step_on_empty_batch for p in self.plugins):
            self._mid_update = True
            for spec in self.specs:
                spec.optimizer.zero_grad(set_to_none=True)  # as every step: wrappers (opacus) reset their state
                for p in self._params[spec.name]:
                    p.grad = torch.zeros_like(p)
                spec.optimizer.step()
                spec.scheduler.step()
            self.optimizer_steps += 1
            if self.ema is not None:
                self.ema.update(self.model)
        self._end_step({"empty_batches": 1.0})

    def _diverged(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        step = self.step + 1
        kept = (
            f"the last good checkpoint {self.ckpt_path} (step {self._last_ckpt_step}) was left untouched"
            if self._last_ckpt_step is not None
            else "no checkpoint had been written yet"
        )
        gn = grad_norm.item() if grad_norm is not None else float("nan")
        msg = (
            f"training diverged at step {step} (epoch {self.epoch}): loss = {loss.item():.6g}, gradient norm = "
            f"{gn:.6g} (non-finite on at least one rank); {kept}. Try a lower lr (now {self.cfg.lr:g}), gradient "
            f"clipping (grad_clip=1.0), a longer warmup, or amp='none'."
        )
        self._write_row({"kind": "diverged", "step": step, "epoch": self.epoch, "loss": loss.item(), "grad_norm": gn})
        raise TrainingDiverged(msg, step=step, loss=loss.item())

    def _end_epoch(self) -> None:
        # The epoch's meter is reset only after the evaluation, so that an evaluation that raises leaves the state
        # of the epoch's last step: an emergency checkpoint saves it and the resumed run repeats the evaluation.
        epoch_train = self._epoch_meter.means()  # collective
        every = self.cfg.eval_every
        if (every and (self.epoch + 1) % every == 0) or self.step >= self.total_steps:
            self._evaluate_and_log()
        self._last_epoch_train = epoch_train
        self._epoch_meter.reset()
        self.epoch += 1
        self.batch_in_epoch = 0

    # ---- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The task's evaluation (and of the EMA model) plus plugin metrics, leaving every RNG untouched.

        Runs with or without a validation set (``ctx.loader`` is None then: sample-based evaluation still runs).
        """
        rng = capture_rng_state()
        try:
            out = self._eval_model(self.model, "")
            if self.ema is not None:
                out.update({f"{k}_ema": v for k, v in self._eval_model(self.ema.module, "ema").items()})
            for p in self.plugins:
                out.update(p.epoch_metrics(self))
        finally:
            restore_rng_state(rng)
        return out

    def _eval_model(self, model: nn.Module, tag: str) -> dict[str, float]:
        hook = getattr(self.task, "evaluate", None)
        if not callable(hook):
            return {}
        was_training = model.training
        model.eval()
        try:
            loader = self._eval_loader(self.val_dataset) if self.val_dataset is not None else None
            ctx = EvalContext(loader=loader, out_dir=self.out_dir, step=self.step, epoch=self.epoch, dist=self.dist,
                              device=self.device, tag=tag)
            with torch.no_grad(), self._autocast():
                return dict(hook(model, ctx))
        finally:
            model.train(was_training)

    def _evaluate_and_log(self) -> None:
        metrics = self.evaluate()
        self._last_eval, self._last_eval_step = metrics, self.step
        if metrics:
            self._write_row({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics})
            self._print(
                f"[eval] step {self.step} epoch {self.epoch}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            )

    # ---- logging -----------------------------------------------------------------------------------------------
    def _open_loggers(self) -> None:
        if not self.dist.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cfg.to_json(), self.out_dir / "config.json")
        path = self.out_dir / "metrics.jsonl"
        if self.resumed_from is None:
            path.write_text("")
        elif path.exists():
            # Drop rows a killed run wrote after its last checkpoint; the resumed run writes them again.
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and _row_step(ln) <= self.step]
            atomic_write_text("".join(ln + "\n" for ln in keep), path)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in _close_loggers)
        if self.resumed_from is not None and self._resume_changes:
            self._write_row({"kind": "resume", "step": self.step, "epoch": self.epoch,
                             "changed": {k: [a, b] for k, a, b in self._resume_changes}})
        if self.cfg.save_init and self.resumed_from is None and getattr(self.model, "model_name", None):
            save_model(self.model, self.out_dir / "init")
        if importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step or None)
            except ImportError:
                self._tb = None

    def _close_loggers(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write_row(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main or self._jsonl is None:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "kind") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def _print(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if self._pbar is not None and not self._pbar.disable:
            self._pbar.write(msg, file=sys.stderr)
        else:
            print(msg, flush=True)

    def _log_train(self) -> None:
        means = self._window.means()  # collective
        self._window.reset()
        row = {"kind": "train", "step": self.step, "epoch": self.epoch, "lr": self._lr, **means,
               "time_s": round(self._elapsed(), 3)}
        self._write_row(row)
        if self._pbar is not None and not self._pbar.disable:
            self._pbar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", lr=f"{self._lr:.2e}", refresh=False)
        elif self.dist.is_main:
            self._print(
                f"[train] step {self.step}/{self.total_steps} epoch {self.epoch}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("kind", "step", "epoch"))
            )

    def _elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t_start

    def _result(self) -> dict[str, Any]:
        train = self._epoch_meter.means() if self._epoch_meter.count else self._last_epoch_train
        out: dict[str, Any] = dict(self._last_eval)
        out.update({f"train_{k}" if k != "loss" else "train_loss": v for k, v in train.items()})
        out.update(
            {
                "steps": self.step,
                "optimizer_steps": self.optimizer_steps,
                "epochs": self.step / self.steps_per_epoch,
                "time_s": round(self._elapsed(), 3),
                "lr": self.optimizer.param_groups[0]["lr"],
                "out_dir": str(self.out_dir),
            }
        )
        if self.resumed_from is not None:
            out["resumed_from_step"] = self.resumed_from
        return out

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _snapshot_step_rng(self) -> None:
        # torch's CPU and CUDA streams at the end of the last completed step: a step that fails after its forward
        # passes drew dropout from them, and the resumed run must draw the same numbers again. Cheap (about 1 us);
        # numpy's and Python's streams are not snapshotted (30 us a step): ratelab draws from them in no step.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._step_rng = (torch.get_rng_state(), cuda)

    def _save_emergency_checkpoint(self, error: BaseException) -> None:
        """After an exception in :meth:`fit`: write the checkpoint of the last completed step, if it is consistent.

        Consistent means the exception came between steps (data loading, evaluation, logging, a regular checkpoint)
        or inside a step before its first optimizer update (forward and backward of any micro-batch: gradients are
        not checkpointed). The data position, weights, optimizer, schedule, EMA, meters and torch's RNG streams
        are then those after the last completed step, so ``resume`` continues exactly as if nothing had happened.
        An exception during an update (between the first ``optimizer.step`` of a step and the end of its
        bookkeeping, e.g. in a plugin's ``on_step_end``) leaves half-updated state: nothing is written and the last
        regular checkpoint stays. ``TrainingDiverged`` never writes one (the last good checkpoint is kept on purpose).

        Only in a single process. A checkpoint under DDP/FSDP is collective (finiteness check, meter reductions,
        RNG gather, sharded writes) but an exception is raised on one rank, not necessarily on all: the others wait
        in the step's all-reduce or keep training, so a collective started by the failing rank alone would pair with
        the wrong collective or hang until the process-group timeout. There the last regular checkpoint
        (``ckpt_every``) is what survives, as the message says.
        """
        if isinstance(error, TrainingDiverged):
            return
        if self._pbar is not None:
            self._pbar.close()
        last = (f"{self.ckpt_path} (step {self._last_ckpt_step})" if self._last_ckpt_step is not None
                else "none was written")
        what = f"[train] {type(error).__name__} after step {self.step} (epoch {self.epoch})"
        if self.dist.distributed:
            # Every failing rank says so: the others may be blocked in a collective and never get here.
            _warn(f"{what} on rank {self.dist.rank}: no emergency checkpoint with {self.dist.world_size} ranks "
                  f"(saving is collective and the other ranks may not have failed); the last checkpoint is {last}")
            return
        if self.step == 0 or self._last_ckpt_step == self.step:
            if self._last_ckpt_step is not None:
                _warn(f"{what}: the checkpoint {self.ckpt_path} (step {self.step}) is current; after fixing the "
                      f"cause, continue with `ratelab train --out-dir {self.out_dir} --resume`")
            return
        if self._mid_update:
            _warn(f"{what}: it came in the middle of an update, so there is no consistent state to save; the last "
                  f"checkpoint is {last}")
            return
        try:
            if self._step_rng is not None:
                rng = capture_rng_state()
                rng["torch"], cuda = self._step_rng
                if cuda is not None:
                    rng["cuda"] = cuda
                restore_rng_state(rng)
            path = self.save_checkpoint()
        except Exception as e:  # noqa: BLE001 -- the original exception is what the caller must see
            _warn(f"{what}: could not write an emergency checkpoint ({type(e).__name__}: {e}); the last checkpoint "
                  f"is {last}")
            return
        self._write_row({"kind": "failed", "step": self.step, "epoch": self.epoch,
                         "error": f"{type(error).__name__}: {error}", "checkpoint": str(path)})
        _warn(f"{what}: wrote the emergency checkpoint {path} (the state after step {self.step}); after fixing the "
              f"cause, continue with `ratelab train --out-dir {self.out_dir} --resume`")

    def save_checkpoint(self) -> Path:
        """Write the training checkpoint through the strategy, atomically (every rank must call it)."""
        if not self.strategy.all_finite(self.model.parameters()):  # collective; works on sharded parameters
            msg = (
                f"training diverged before step {self.step}: the weights contain NaN/inf; not overwriting "
                f"{self.ckpt_path} (step {self._last_ckpt_step}). Try a lower lr or grad_clip=1.0."
            )
            raise TrainingDiverged(msg, step=self.step, loss=float("nan"))
        window, epoch_meter = self._window.state_dict(), self._epoch_meter.state_dict()  # collectives
        rng = capture_rng_state()
        if self.dist.distributed:
            gathered: list[Any] = [None] * self.dist.world_size
            torch_dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        extra = {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "schedulers": {s.name: s.scheduler.state_dict() for s in self.specs},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "task_state": self.task.state_dict() if callable(getattr(self.task, "state_dict", None)) else {},
            "plugins": {p.plugin_name or type(p).__name__: p.state_dict() for p in self.plugins},
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "schedule_steps": self.schedule_steps,
            "world_size": self.dist.world_size,
            "rng": rng_states,
            "data_order": {"seed": self.cfg.seed, "epoch": self.epoch, "skip_batches": self.batch_in_epoch},
            "meters": {"window": window, "epoch": epoch_meter, "last_epoch_train": self._last_epoch_train},
            "last_eval": {"step": self._last_eval_step, "metrics": self._last_eval},
            "elapsed_s": self._elapsed(),
            "config": self.cfg.to_dict(),
            "model_config": _model_config_or_none(self.model),
        }
        self.strategy.save_checkpoint(self.ckpt_path, model=self.wrapped, optimizers=self.optimizers, extra=extra)
        self._last_ckpt_step = self.step
        return self.ckpt_path

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        _, saved_cfg = read_checkpoint_config(self.out_dir)
        try:
            saved = TrainConfig.from_dict(saved_cfg, source=f"{path} (saved config)")
        except ConfigError as e:
            raise CheckpointError(f"resume: {e}") from None
        forbidden, allowed = self.cfg.resume_diff(saved)
        if forbidden:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in forbidden)
            raise ConfigError(
                f"resume: these settings differ from the run saved in {path}: {detail}. Resume with the saved "
                f"settings (`ratelab train --out-dir {self.out_dir} --resume` takes them from the checkpoint), "
                f"or start a new run in another out_dir")
        self._resume_changes = allowed
        extra = self.strategy.load_checkpoint(path, model=self.wrapped, optimizers=self.optimizers)
        version = extra.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version}, this ratelab resumes {CHECKPOINT_FORMAT_VERSION}")
        if extra["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"resume: {path} was written with {extra['steps_per_epoch']} steps per epoch, now "
                              f"{self.steps_per_epoch} (did the dataset change?)")
        # The schedule keeps the length it was built with, whatever the run length is now.
        self.schedule_steps = int(extra["schedule_steps"])
        for s in self.specs:
            s.scheduler.load_state_dict(extra["schedulers"][s.name])
        if self.scaler is not None and extra.get("scaler") is not None:
            self.scaler.load_state_dict(extra["scaler"])
        if self.ema is not None:
            if extra.get("ema") is None:
                raise ConfigError("resume: ema_decay is on but the saved run had no EMA")
            self.ema.load_state_dict(extra["ema"])
        if callable(getattr(self.task, "load_state_dict", None)):
            self.task.load_state_dict(extra.get("task_state") or {})
        states = extra.get("plugins") or {}
        for p in self.plugins:
            key = p.plugin_name or type(p).__name__
            if key not in states:
                raise ConfigError(f"resume: plugin {key!r} is enabled but the saved run did not use it")
            p.load_state_dict(states[key])
        self.step, self.epoch, self.batch_in_epoch = extra["step"], extra["epoch"], extra["batch_in_epoch"]
        self.optimizer_steps = int(extra["optimizer_steps"])
        self._window.load_state_dict(extra["meters"]["window"])
        self._epoch_meter.load_state_dict(extra["meters"]["epoch"])
        self._last_epoch_train = dict(extra["meters"]["last_epoch_train"])
        self._last_eval_step = extra["last_eval"]["step"]
        self._last_eval = dict(extra["last_eval"]["metrics"])
        self._elapsed_before = float(extra["elapsed_s"])
        self._last_ckpt_step = self.step
        self.resumed_from = self.step
        self._lr = self.optimizer.param_groups[0]["lr"]
        return extra

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.dist.world_size:
            restore_rng_state(states[self.dist.rank])
        else:
            # Another world size: the data order and the seeded augmentation are still exact (they depend on seed,
            # epoch and index only), but per-rank training streams (dropout) cannot be carried over.
            seed_everything(derive_seed(self.cfg.seed, self.dist.rank, self.step) % 2**32)
            if self.dist.is_main:
                print(f"[train] resumed with {self.dist.world_size} ranks from a checkpoint written by {len(states)}: "
                      "dropout RNG streams re-seeded", flush=True)


def _model_config_or_none(model: nn.Module) -> dict[str, Any] | None:
    try:
        return model_config(model)
    except CheckpointError:
        return None


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # unreadable (torn) line from a killed run: drop it


def _warn(msg: str) -> None:
    # stderr, beside the error the caller prints: where the work went matters as much as what failed.
    print(msg, file=sys.stderr, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
