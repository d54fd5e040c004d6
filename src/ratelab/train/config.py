"""Typed training configuration and its command-line mapping.

:class:`TrainConfig` is a dataclass tree: flat run fields plus two sections -- ``task`` (the task's own registered
config dataclass, chosen by its ``name``) and ``plugins`` (one config dataclass per enabled plugin). Each field's
``metadata["help"]`` is its documentation and the ``--help`` text of its ``ratelab train --kebab-case`` option;
section fields are set with dotted options (``--task.eps 0.5``) or ``--set task.eps=0.5``. The generic machinery
(type checks without ``eval``, dotted overrides, files) is :mod:`ratelab.core.config`; every error is a
:class:`~ratelab.core.errors.ConfigError` naming the key or option.

What may change when a run is resumed is :data:`RESUMABLE_CHANGES`; any other difference between a resumed run's
settings and the saved ones is an error (see :meth:`TrainConfig.resume_diff`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, fields
from typing import Any

from ratelab.core.config import (
    add_dataclass_args,
    apply_overrides,
    config_diff,
    config_field,
    dataclass_from_dict,
    dataclass_to_dict,
    load_config_file,
    parse_dotted_options,
    parse_value,
    validate_dataclass,
)
from ratelab.core.errors import ConfigError

__all__ = [
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "add_config_args",
    "config_from_args",
    "load_config_file",
    "parse_value",
]

_f = config_field

# Settings that may differ between a run and its resumption. The run length (epochs / max_steps) may grow or shrink:
# the learning-rate schedule keeps the length it was built with (steps past its end run at min_lr), the change is
# logged. The others do not change what is computed (or change it only as a device change would).
RESUMABLE_CHANGES = (
    "epochs",
    "max_steps",
    "out_dir",
    "resume",
    "progress",
    "log_every",
    "ckpt_every",
    "eval_every",
    "eval_batch_size",
    "num_workers",
    "device",
    "data_root",
    "deterministic",
    "validate_data",
    "compile",
)


def _resolve_task(value: Any, key: str) -> Any:
    from ratelab.train.tasks import resolve_task_config

    return resolve_task_config(value, key)


def _resolve_plugins(value: Any, key: str) -> Any:
    from ratelab.train.plugins import resolve_plugin_configs

    return resolve_plugin_configs(value, key)


@dataclass
class TrainConfig:
    """Everything one training run needs. Saved as ``out_dir/config.json`` and inside every checkpoint."""

    # ---- what to train -----------------------------------------------------------------------------------------
    task: Any = _f(
        None,
        "Task section: its name (what the model learns and how it is evaluated; see `ratelab train --list-tasks`) "
        "and the task's own options, e.g. --task mcr2 --task.eps 0.5.",
        resolve=lambda v, key: _resolve_task(v, key),
    )
    plugins: dict = _f(
        {},
        "Trainer plugins by name with their options, e.g. --plugin NAME or --set plugins.NAME.option=VALUE.",
        resolve=lambda v, key: _resolve_plugins(v, key),
    )
    model: str = _f("crate_nano_patch4_16", "Registered model name (see `ratelab models`).")
    model_kwargs: dict = _f({}, "Extra keyword arguments for create_model, as JSON or key=value pairs.")
    num_classes: int | None = _f(None, "Classifier width; default: the dataset's number of classes.")
    init_from: str | None = _f(
        None,
        "Start from these weights (run dir, model.safetensors, trainer checkpoint or an official file of the "
        "model's family): same-shape tensors copied, the position embedding resampled to the new grid, the "
        "prefixes in init_reinit left freshly initialized (ratelab.core.init_from; CRATE-alpha's light recipe).",
    )
    init_reinit: str = _f(
        "",
        "Comma-separated parameter-name prefixes kept at their fresh initialization with init_from, e.g. "
        "'patch_embed,head' to fine-tune at a smaller patch size on another label set.",
    )
    # ---- data --------------------------------------------------------------------------------------------------
    dataset: str = _f("digits", "Dataset name for ratelab.data.build_dataset.")
    data_root: str | None = _f(None, "Directory holding the dataset files (dataset-specific default when unset).")
    img_size: int | None = _f(None, "Input resolution; default: the dataset's native size.")
    augment: bool | None = _f(None, "Training-set augmentation on/off; default: the dataset's own default.")
    dataset_kwargs: dict = _f({}, "Extra keyword arguments for build_dataset, as JSON or key=value pairs.")
    num_workers: int = _f(0, "DataLoader worker processes. 0 keeps resume bitwise exact (augmentation RNG in-process).")
    validate_data: bool = _f(
        True,
        "Check the dataset's files before training (image headers, no decoding: about 25 us a file), so that a bad "
        "file fails at once, named, instead of mid-run. --no-validate-data skips it (huge datasets).",
    )
    # ---- length and batch --------------------------------------------------------------------------------------
    epochs: int = _f(10, "Number of passes over the training set.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs for the run length).")
    batch_size: int = _f(64, "GLOBAL batch size per optimizer step (split evenly across ranks and micro-steps).")
    accum_steps: int = _f(1, "Gradient accumulation: split each rank's share of a batch into this many micro-steps.")
    eval_batch_size: int | None = _f(None, "Global evaluation batch size; default: batch_size.")
    # ---- optimization ------------------------------------------------------------------------------------------
    optimizer: str = _f("adamw", "Optimizer.", choices=("adamw", "lion"))
    lr: float = _f(1e-3, "Peak learning rate (reached after warmup).")
    weight_decay: float = _f(0.05, "Decoupled weight decay (not applied to biases, norms, embeddings/tokens).")
    betas: tuple[float, float] | None = _f(None, "Optimizer betas 'b1,b2'; default (0.9,0.999) AdamW, (0.9,0.99) Lion.")
    warmup_epochs: float = _f(1.0, "Linear warmup length in epochs.")
    warmup_steps: int | None = _f(None, "Linear warmup length in steps (overrides warmup_epochs).")
    min_lr: float = _f(0.0, "Learning rate at the end of the cosine decay.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss (0 = off).")
    grad_clip: float = _f(0.0, "Clip gradients to this global L2 norm (0 = off).")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the weights with this decay (0 = off).")
    amp: str = _f(
        "auto",
        "Mixed precision: auto = bf16 autocast on CUDA and none on CPU.",
        choices=("auto", "bf16", "fp16", "none"),
    )
    # ---- distribution ------------------------------------------------------------------------------------------
    strategy: str = _f(
        "ddp",
        "Data-parallel strategy under torchrun: ddp (replicated weights) or fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded per block). Ignored in a single process.",
        choices=("ddp", "fsdp"),
    )
    activation_checkpointing: bool = _f(False, "Recompute each block's activations in the backward pass (less memory).")
    compile: bool = _f(
        False,
        "torch.compile the model (in place, so checkpoint keys are unchanged) before the data-parallel wrapper; "
        "inductor generates C++/OpenMP on CPU (needs a C++ compiler) and Triton on CUDA. The first steps pay the "
        "compilation (tens of seconds to minutes). Not with strategy fsdp or a plugin that wraps the model or owns "
        "the backward (differential privacy).",
    )
    # ---- run management ----------------------------------------------------------------------------------------
    seed: int = _f(0, "Seed for model init, data order and augmentation.")
    out_dir: str = _f("runs/train", "Run directory: config.json, metrics.jsonl, checkpoints/, model.safetensors.")
    ckpt_every: int = _f(500, "Write checkpoints/last.pt every this many optimizer steps (0 = only at the end).")
    eval_every: int = _f(1, "Evaluate every this many epochs (the end of the run is always evaluated; 0 = only then).")
    log_every: int = _f(50, "Log training metrics every this many optimizer steps.")
    resume: bool = _f(
        False,
        "Continue the run in out_dir exactly (its saved config is used; an error if out_dir has no checkpoint).",
    )
    save_init: bool = _f(False, "Also save the initial weights to out_dir/init/ (model.safetensors).")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N (under torchrun, cuda means cuda:LOCAL_RANK).")
    progress: bool = _f(True, "Show a tqdm progress bar on rank 0.")
    seeded_augmentation: bool = _f(
        True,
        "Draw each sample's augmentation from a seed of (seed, epoch, index), so N processes (and any num_workers) "
        "see exactly the augmentation one process sees. Off: one RNG stream per rank (the pre-v2 behaviour).",
    )
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms for the run (slower on GPU).")

    def __post_init__(self) -> None:
        validate_dataclass(self)

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Coerce and check every field (types, choices, ranges, the sections).

        Raises:
            ConfigError: naming the offending field.
        """
        validate_dataclass(self)

    def check(self) -> None:
        """Ranges and cross-field rules (called by :meth:`validate` after the type checks)."""
        for name in ("epochs", "batch_size", "log_every", "accum_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "eval_batch_size", "num_classes", "img_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name}: must be positive, got {v}")
        for name in ("lr", "weight_decay", "warmup_epochs", "min_lr", "grad_clip", "num_workers", "ckpt_every",
                     "eval_every"):
            v = getattr(self, name)
            if v < 0 or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.betas is not None and not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas: each must be in [0, 1), got {self.betas}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: must not exceed lr ({self.lr}), got {self.min_lr}")

    # ---- serialization ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists; the sections become mappings)."""
        return dataclass_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a (nested) dict; unknown keys and ill-typed values are errors naming the key and ``source``."""
        return dataclass_from_dict(cls, d, source=source)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> TrainConfig:
        return cls.from_dict(json.loads(text), source=source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (``task=`` and ``plugins=`` replace whole sections)."""
        d = self.to_dict()
        for k, v in changes.items():
            d[k] = dataclass_to_dict(v)
        return type(self).from_dict(d, source="replace")

    def with_overrides(self, overrides: list[tuple[str, str]], *, source: str = "--set") -> TrainConfig:
        """A validated copy with dotted ``[(key, text)]`` overrides applied (``("task.eps", "0.5")``)."""
        return type(self).from_dict(apply_overrides(type(self), self.to_dict(), overrides), source=source)

    def resume_diff(self, saved: TrainConfig) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
        """Compare with the saved config of the run being resumed.

        Returns:
            ``(forbidden, allowed)``: lists of ``(dotted key, saved value, this value)``; ``allowed`` holds the
            differences in :data:`RESUMABLE_CHANGES`.
        """
        forbidden, allowed = [], []
        for key, old, new in config_diff(saved, self):
            if key == "resume":
                continue
            (allowed if key.split(".")[0] in RESUMABLE_CHANGES else forbidden).append((key, old, new))
        return forbidden, allowed


# ---- command line ----------------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """Add ``--config FILE``, one ``--kebab-case`` option per top-level field, ``--plugin NAME`` and ``--set K=V``.

    Dotted options (``--task.eps 0.5``) are not declared (their keys depend on the task); pass the leftovers of
    ``parser.parse_known_args`` to :func:`config_from_args` as ``extra``.
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="JSON or YAML file of config fields (sections as mappings); explicit options override it.",
    )
    add_dataclass_args(parser, config_cls)
    parser.add_argument("--plugin", dest="plugin_names", action="append", default=argparse.SUPPRESS,
                        metavar="NAME", help="enable a trainer plugin with its default options (repeatable)")
    parser.add_argument("--set", dest="set_items", action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                        help="set any config key by its dotted path, e.g. --set task.eps=0.5 (repeatable)")


def given_options(args: argparse.Namespace, extra: list[str] | None = None,
                  config_cls: type = TrainConfig) -> list[tuple[str, Any]]:
    """Every setting given on the command line, in order of precedence: ``[(dotted key, value or text)]``."""
    names = {f.name for f in fields(config_cls)}
    out: list[tuple[str, Any]] = [(k, v) for k, v in vars(args).items() if k in names]
    for name in getattr(args, "plugin_names", None) or []:
        out.append((f"plugins.{name}", {}))
    for item in getattr(args, "set_items", None) or []:
        if "=" not in item:
            raise ConfigError(f"--set: expected KEY=VALUE (e.g. --set task.eps=0.5), got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    out.extend(parse_dotted_options(list(extra or [])))
    return out


def config_from_args(
    args: argparse.Namespace,
    config_cls: type = TrainConfig,
    *,
    extra: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Any:
    """Layer ``base`` (or the dataclass defaults) < ``--config`` file < options < ``--set`` / dotted options.

    Args:
        args: the parsed namespace of a parser built with :func:`add_config_args`.
        config_cls: the config dataclass.
        extra: unparsed dotted options (``["--task.eps", "0.5"]``).
        base: a starting mapping (e.g. a saved run's config when resuming).

    Raises:
        ConfigError: a bad file, key or value; the message names the option, the dotted key or the file.
    """
    values: dict[str, Any] = dict(base or {})
    source = "command line"
    cfg_file = getattr(args, "config", None)
    if cfg_file:
        values = _deep_update(values, load_config_file(cfg_file))
        source = f"--config {cfg_file} / command line"
    given = given_options(args, extra, config_cls)
    try:
        values = apply_overrides(config_cls, values, [(k, v) for k, v in given])
        return config_cls.from_dict(values, source=source)
    except ConfigError as e:
        # Name the option the user typed: "command line: min_lr: ..." -> "--min-lr: ...".
        msg = str(e)
        for name in sorted({k for k, _ in given}, key=len, reverse=True):
            if f"{source}: {name}:" in msg:
                opt = "--" + name.replace("_", "-") if "." not in name else "--" + name
                msg = msg.replace(f"{source}: {name}:", f"{opt}:", 1)
                break
        raise ConfigError(msg) from None


def _deep_update(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
