"""The one training loop of ratelab: ``Trainer(cfg, task).fit()``.

The trainer owns devices, DDP, mixed precision, optimizer, schedule, EMA, checkpoints, logging and resumption; the
:class:`~ratelab.train.tasks.Task` owns data, model, loss and evaluation. One optimizer step per global batch.

Reproducibility contract (CPU, one process, ``num_workers=0``): a run killed at any point and resumed with
``resume=True`` ends with bitwise the same weights as an uninterrupted run. What makes it hold:

* the data order of epoch ``e`` is a function of ``(seed, e)`` (:mod:`ratelab.train.data`), and a resumed epoch
  skips the batches it already consumed without loading them;
* checkpoints hold every RNG state that training consumes (torch CPU and CUDA, numpy, ``random``), taken between
  steps; dataset augmentation draws from torch's global RNG in the main process;
* evaluation runs inside a saved-and-restored RNG state, so evaluating (or not) never shifts the training stream;
* running averages of logged metrics are checkpointed too, so logs and the returned metrics also match.

With ``num_workers > 0`` runs stay deterministic, but worker RNG streams restart when a run resumes mid-epoch, so
the augmentation of the rest of that epoch differs from an uninterrupted run. Under DDP with augmentation on, the
augmentation of a sample depends on which rank draws it, so DDP matches a single process only with augmentation off.

Files in ``out_dir``: ``config.json`` (at start), ``metrics.jsonl`` (one JSON object per line: ``kind`` = train,
eval or diverged, ``step``, ``epoch`` (0-based epoch the row belongs to), ...), ``checkpoints/last.pt``,
``model.safetensors`` + ``model_config.json`` (final raw weights; :func:`ratelab.core.checkpoint.load_model` reads
the directory), ``ema/`` (final EMA weights, if enabled), ``init/`` (with ``save_init``), ``final_metrics.json``,
``tb/`` (TensorBoard, only when the ``tensorboard`` package is installed).
"""

from __future__ import annotations

import contextlib
import importlib.util
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ratelab.core.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_text,
    load_state_dict_strict,
    model_config,
    save_model,
)
from ratelab.core.dist import DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from ratelab.core.errors import TrainingDiverged
from ratelab.core.seeding import capture_rng_state, restore_rng_state, seed_everything
from ratelab.train.config import TrainConfig
from ratelab.train.data import DeviceLoader, EvalShardSampler, ShardedBatchSampler, derive_seed, to_device
from ratelab.train.ema import ModelEma
from ratelab.train.optim import build_optimizer
from ratelab.train.schedule import WarmupCosine
from ratelab.train.tasks import Task

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "Trainer",
    "TrainingDiverged",
    "capture_rng_state",
    "restore_rng_state",
    "seed_everything",
]

CHECKPOINT_FORMAT_VERSION = 1
# Fields that define what is being trained; resuming with a different value would silently train something else.
_RESUME_MUST_MATCH = (
    "task",
    "model",
    "model_kwargs",
    "num_classes",
    "dataset",
    "img_size",
    "dataset_kwargs",
    "batch_size",
    "seed",
    "optimizer",
)


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
        # Collective under DDP: every rank calls it at the same step with the same keys.
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = all_reduce_mean(torch.stack([self.sums[k].reshape(()) for k in keys]))
        return dict(zip(keys, stacked.tolist()))

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


# ---- trainer -----------------------------------------------------------------------------------------------------


class Trainer:
    """Train ``task`` as configured by ``cfg``; works unchanged in one process and under torchrun.

    Construction builds datasets, model, optimizer, schedule and (with ``cfg.resume``) loads the last checkpoint;
    :meth:`fit` runs the loop and returns the final metrics.

    Args:
        cfg: the run configuration.
        task: an object following the :class:`~ratelab.train.tasks.Task` protocol.

    Attributes:
        model: the bare (unwrapped) model being trained.
        ema_model: the EMA copy (``cfg.ema_decay > 0``) or None.
        dist: this process's :class:`~ratelab.core.dist.DistInfo`.
        step, epoch: optimizer steps done; current 0-based epoch.

    Raises:
        ValueError: the global batch does not divide over the ranks or exceeds the training set; ``out_dir``
            already holds a checkpoint and ``resume`` is off; the checkpoint belongs to a different run.

    Example:
        >>> cfg = TrainConfig(model="crate_nano_patch4_16", dataset="digits", epochs=60, out_dir="runs/x")
        >>> result = Trainer(cfg, ClassificationTask()).fit()
        >>> result["val_acc"]
    """

    def __init__(self, cfg: TrainConfig, task: Task) -> None:
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if not isinstance(task, Task):
            raise TypeError(
                f"task {type(task).__name__} does not implement the Task protocol (build_datasets, "
                "build_model, training_step, evaluate)"
            )
        cfg.validate()
        self.cfg, self.task = cfg, task
        had_pg = torch_dist.is_available() and torch_dist.is_initialized()
        self.dist: DistInfo = init_distributed(cfg.device)
        self._owns_process_group = not had_pg and self.dist.distributed
        world = self.dist.world_size
        if cfg.batch_size % world:
            raise ValueError(
                f"batch_size: the global batch {cfg.batch_size} is not divisible by the {world} ranks; "
                f"use a multiple of {world}"
            )
        self.device = self.dist.device
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / "checkpoints" / "last.pt"
        resuming = cfg.resume and self.ckpt_path.is_file()
        if not cfg.resume and self.ckpt_path.exists():
            raise ValueError(
                f"out_dir: {self.ckpt_path} already exists; pass resume=True (--resume) to continue "
                "that run, or choose another out_dir (or delete it)"
            )

        self.amp_dtype, self.scaler = self._resolve_amp(cfg.amp)

        # Same seed on every rank: identical datasets and initial weights.
        seed_everything(cfg.seed)
        self.train_dataset, self.val_dataset = task.build_datasets(cfg)
        n_train = len(self.train_dataset)
        self.steps_per_epoch = n_train // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size: the global batch {cfg.batch_size} is larger than the training set ({n_train} items)"
            )
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(warmup, self.total_steps)
        eval_batch = cfg.eval_batch_size or cfg.batch_size
        self.local_eval_batch = max(1, eval_batch // world)

        model = task.build_model(cfg)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(task).__name__}.build_model returned {type(model).__name__}, not an nn.Module")
        self.model = model.to(self.device)
        self.ema = ModelEma(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.optimizer = build_optimizer(
            self.model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas
        )
        self.scheduler = WarmupCosine(
            self.optimizer, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_lr=cfg.min_lr
        )
        self._params = [p for p in self.model.parameters() if p.requires_grad]

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._window = _Meter(self.device)
        self._epoch_meter = _Meter(self.device)
        self._last_epoch_train: dict[str, float] = {}
        self._last_eval: dict[str, float] = {}
        self._last_eval_step = -1
        self._last_ckpt_step: int | None = None
        self._elapsed_before = 0.0
        self.resumed_from: int | None = None
        self._lr = self.optimizer.param_groups[0]["lr"]
        self._t_start = time.perf_counter()
        ckpt = self._load_checkpoint() if resuming else None

        if self.dist.distributed:
            dev_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model: nn.Module = DistributedDataParallel(
                self.model,
                device_ids=dev_ids,
                find_unused_parameters=bool(getattr(task, "ddp_find_unused_parameters", False)),
            )
        else:
            self.ddp_model = self.model

        # The training RNG stream starts here; each rank gets its own (augmentation must differ across ranks).
        if ckpt is None:
            seed_everything(derive_seed(cfg.seed, self.dist.rank, 1) % 2**32)
        else:
            self._restore_rng(ckpt["rng"])
        self._pbar: Any = None
        self._jsonl: Any = None
        self._tb: Any = None

    @property
    def ema_model(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    # ---- setup helpers -----------------------------------------------------------------------------------------
    def _resolve_amp(self, amp: str) -> tuple[torch.dtype | None, Any]:
        dev = self.device.type
        if amp == "auto":
            amp = "bf16" if dev == "cuda" else "none"
        if amp == "fp16" and dev != "cuda":
            raise ValueError(f"amp: fp16 (with loss scaling) needs CUDA, the device is {self.device}; use bf16 or none")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        return dtype, scaler

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _train_loader(self) -> DataLoader:
        sampler = ShardedBatchSampler(
            len(self.train_dataset),
            global_batch=self.cfg.batch_size,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=self.cfg.seed,
            epoch=self.epoch,
            start_step=self.batch_in_epoch,
        )
        # An explicit generator: DataLoader otherwise draws its worker base seed from the global RNG, which would
        # shift the augmentation stream when a resumed run creates its loader mid-epoch.
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, self.epoch, self.dist.rank, 2))
        return DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=g,
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

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming if configured) and return the final metrics.

        Returns:
            ``val_loss``, ``val_acc`` (task-specific eval keys, plus ``*_ema`` with EMA), ``train_loss`` and the
            other training metrics averaged over the last (possibly partial) epoch, ``steps``, ``epochs``
            (completed, fractional), ``time_s`` (summed over resumed segments), ``lr``, ``out_dir``.

        Raises:
            TrainingDiverged: the loss or gradient became non-finite; the last checkpoint is kept.
        """
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            if self.cfg.deterministic:
                if self.device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            return self._fit()
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            self._close_loggers()
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
                f"{self.steps_per_epoch} steps/epoch x {self.num_epochs} epochs = {self.total_steps} steps | "
                f"world {self.dist.world_size}, device {self.device}, amp {self.amp_dtype or 'none'}"
                + (f" | resumed at step {self.step}" if self.resumed_from is not None else "")
            )
        t_start = time.perf_counter()
        self._t_start = t_start
        from tqdm.auto import tqdm

        self._pbar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not (cfg.progress and self.dist.is_main),
            file=sys.stderr,
        )
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
        if self.dist.is_main:
            if getattr(self.model, "model_name", None) is not None:
                save_model(self.model, self.out_dir)
                if self.ema is not None:
                    save_model(self.ema.module, self.out_dir / "ema")
            else:
                self._print(
                    f"[train] {type(self.model).__name__} has no model_name (not built by create_model): "
                    f"weights are only in {self.ckpt_path}"
                )
            atomic_write_text(json.dumps(result, indent=2), self.out_dir / "final_metrics.json")
            self._print("[train] done: " + ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "out_dir"))
        barrier()
        return result

    def _train_step(self, batch: Any) -> None:
        cfg = self.cfg
        self.ddp_model.train()
        batch = to_device(batch, self.device)
        with self._autocast():
            loss, metrics = self.task.training_step(self.ddp_model, batch, cfg)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(
                f"{type(self.task).__name__}.training_step must return a scalar loss tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        grad_norm = (
            torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
        ).float()
        loss_d = loss.detach().float()
        # One host sync per step: is anything non-finite on any rank? (With fp16 loss scaling an inf gradient is
        # routine -- the scaler skips the step -- so only the loss counts there.)
        bad = (~torch.isfinite(loss_d)).float()
        if self.scaler is None:
            bad = bad + (~torch.isfinite(grad_norm)).float()
        if self.dist.distributed:
            bad = all_reduce_sum(bad)
        if bad.item() > 0:
            self._diverged(loss_d, grad_norm)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, cfg.grad_clip, grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self.batch_in_epoch += 1
        self._lr = lr
        values = {"loss": loss_d, "grad_norm": grad_norm, **metrics}
        self._window.add(values)
        self._epoch_meter.add(values)

    def _diverged(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        step = self.step + 1
        kept = (
            f"the last good checkpoint {self.ckpt_path} (step {self._last_ckpt_step}) was left untouched"
            if self._last_ckpt_step is not None
            else "no checkpoint had been written yet"
        )
        msg = (
            f"training diverged at step {step} (epoch {self.epoch}): loss = {loss.item():.6g}, gradient norm = "
            f"{grad_norm.item():.6g} (non-finite on at least one rank); {kept}. Try a lower lr (now {self.cfg.lr:g}"
            f"), gradient clipping (grad_clip=1.0), a longer warmup, or amp='none'."
        )
        self._write_row(
            {"kind": "diverged", "step": step, "epoch": self.epoch, "loss": loss.item(), "grad_norm": grad_norm.item()}
        )
        raise TrainingDiverged(msg, step=step, loss=loss.item())

    def _end_epoch(self) -> None:
        self._last_epoch_train = self._epoch_meter.means()
        self._epoch_meter.reset()
        every = self.cfg.eval_every
        if (every and (self.epoch + 1) % every == 0) or self.step >= self.total_steps:
            self._evaluate_and_log()
        self.epoch += 1
        self.batch_in_epoch = 0

    # ---- evaluation --------------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run the task's evaluation on the validation set (and the EMA model), leaving every RNG untouched."""
        if self.val_dataset is None:
            return {}
        rng = capture_rng_state()
        try:
            out = self._eval_model(self.model)
            if self.ema is not None:
                out.update({f"{k}_ema": v for k, v in self._eval_model(self.ema.module).items()})
        finally:
            restore_rng_state(rng)
        return out

    def _eval_model(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                return dict(self.task.evaluate(model, self._eval_loader(self.val_dataset), self.dist))
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
        row = {
            "kind": "train",
            "step": self.step,
            "epoch": self.epoch,
            "lr": self._lr,
            **means,
            "time_s": round(self._elapsed(), 3),
        }
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
    def save_checkpoint(self) -> Path:
        """Write ``out_dir/checkpoints/last.pt`` atomically (rank 0; every rank must call it)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(all_reduce_sum((~finite).float()).item() == 0):
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
        if self.dist.is_main:
            state = {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "world_size": self.dist.world_size,
                "rng": rng_states,
                "data_order": {"seed": self.cfg.seed, "epoch": self.epoch, "skip_batches": self.batch_in_epoch},
                "meters": {"window": window, "epoch": epoch_meter, "last_epoch_train": self._last_epoch_train},
                "last_eval": {"step": self._last_eval_step, "metrics": self._last_eval},
                "elapsed_s": self._elapsed(),
                "config": self.cfg.to_dict(),
                "model_config": _model_config_or_none(self.model),
            }
            atomic_torch_save(state, self.ckpt_path)
        barrier()
        self._last_ckpt_step = self.step
        return self.ckpt_path

    def _load_checkpoint(self) -> dict[str, Any]:
        path = self.ckpt_path
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the training checkpoint ({type(e).__name__}: {e})") from e
        version = ckpt.get("format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{path}: format_version {version}, this ratelab reads {CHECKPOINT_FORMAT_VERSION}")
        saved = ckpt["config"]
        diff = [k for k in _RESUME_MUST_MATCH if saved.get(k) != self.cfg.to_dict().get(k)]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(self.cfg, k)!r}" for k in diff)
            raise ValueError(f"resume: {path} belongs to a different run ({detail})")
        if ckpt["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"resume: {path} was written with {ckpt['steps_per_epoch']} steps per epoch, now "
                f"{self.steps_per_epoch} (did the dataset change?)"
            )
        load_state_dict_strict(self.model, ckpt["model"], source=str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema = ModelEma(self.model, self.cfg.ema_decay)  # EMA switched on at resume: start from here
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self._window.load_state_dict(ckpt["meters"]["window"])
        self._epoch_meter.load_state_dict(ckpt["meters"]["epoch"])
        self._last_epoch_train = dict(ckpt["meters"]["last_epoch_train"])
        self._last_eval_step = ckpt["last_eval"]["step"]
        self._last_eval = dict(ckpt["last_eval"]["metrics"])
        self._elapsed_before = float(ckpt["elapsed_s"])
        self._last_ckpt_step = self.step
        self.resumed_from = self.step
        self._lr = self.optimizer.param_groups[0]["lr"]
        return ckpt

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.dist.world_size:
            restore_rng_state(states[self.dist.rank])
        else:
            # Another world size: the data order is still exact (it depends on seed and epoch only), but per-rank
            # augmentation streams cannot be carried over.
            seed_everything(derive_seed(self.cfg.seed, self.dist.rank, self.step) % 2**32)
            if self.dist.is_main:
                print(
                    f"[train] resumed with {self.dist.world_size} ranks from a checkpoint written by "
                    f"{len(states)}: RNG streams re-seeded",
                    flush=True,
                )


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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
