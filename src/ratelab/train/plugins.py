"""Trainer plugins: code that wraps the model, the optimizer or the data sampling, and carries checkpoint state.

A plugin is how a training *regime* that cuts across tasks enters the one :class:`~ratelab.train.Trainer` without
edits to it. Differential privacy is the motivating case: opacus replaces the model (per-sample gradients), the
optimizer (clipping + noise) and the sampler (Poisson sampling), keeps an accountant that must survive a resume,
and forbids logging raw gradient statistics. Each hook below has a no-op default; the trainer calls them in this
order:

1. ``setup(trainer)`` after the task built the model (bare, on the device), before any wrapping.
2. ``wrap_model(model) -> model`` before the data-parallel wrapper (DDP/FSDP).
3. ``wrap_optimizer(optimizer, model) -> optimizer`` for each optimizer after it is built (schedules are built on
   the returned object).
4. ``batch_sampler(n, *, global_batch, rank, world_size, seed, epoch, start_step) -> Sampler | None`` for each
   epoch's training batches (None: the trainer's default fixed-size sampler). Batches may vary in size and be
   empty; see :class:`ratelab.train.data.PoissonBatchSampler`.
5. ``on_step_end(trainer) -> metrics`` after every optimizer step; ``epoch_metrics(trainer) -> metrics`` at every
   evaluation (logged as ``kind: "eval"`` rows and returned by ``fit``; e.g. the privacy budget spent).
6. ``state_dict()`` / ``load_state_dict(state)``: saved in every checkpoint under ``plugins/<name>``.
7. ``backward(losses, *, scaler)`` instead of the trainer's own backward, for a plugin with ``per_sample_loss``:
   the trainer then calls ``training_step(..., per_sample=True)`` (the task must declare
   ``Task.per_sample_loss``), checks that it returned a ``(n,)`` vector of per-example losses for the micro-batch
   and hands it over; the plugin accumulates whatever it wants into ``p.grad`` (DP-SGD: the clipped per-example
   gradients, summed -- not weighted by the micro-batch's share). ``scaler`` is the fp16 ``GradScaler`` or None.
   The trainer logs ``losses.mean()`` as the loss.

Class attributes: ``allows_grad_stats`` (False: the trainer never computes or logs the norm of raw gradients, and
``grad_clip`` must be 0 because the plugin clips), ``step_on_empty_batch`` (True: an empty global batch still takes
an optimizer step with zero gradients -- DP-SGD adds its noise there; False: the step is skipped and neither the
schedule nor EMA advance), ``per_sample_loss`` (True: hook 7 replaces the trainer's backward; one plugin at most).
Instance attribute ``max_micro_batch`` (int or None): the largest micro-batch per rank; a local batch is split into
``max(accum_steps, ceil(n / max_micro_batch))`` micro-batches (physical batches of a huge logical one).

Register with ``@register_plugin("name", config=ConfigDataclass)``; enable with
``TrainConfig(plugins={"name": {...}})``, ``--plugin name`` or ``--set plugins.name.option=value``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn as nn

from ratelab.core.config import dataclass_from_dict, validate_dataclass
from ratelab.core.errors import ConfigError, UnknownNameError, did_you_mean

__all__ = ["PLUGINS", "Plugin", "build_plugins", "register_plugin", "resolve_plugin_configs"]

PLUGINS: dict[str, type] = {}


@dataclasses.dataclass
class _NoOptions:
    """A plugin without options."""


def register_plugin(name: str, *, config: type | None = None) -> Callable[[type], type]:
    """Class decorator registering a :class:`Plugin` subclass under ``name`` with its config dataclass."""

    def deco(cls: type) -> type:
        if name in PLUGINS:
            raise ValueError(f"plugin {name!r} is already registered (by {PLUGINS[name].__module__})")
        cls.Config = config if config is not None else _NoOptions
        cls.plugin_name = name
        PLUGINS[name] = cls
        return cls

    return deco


def resolve_plugin_configs(value: Any, key: str = "plugins") -> dict[str, Any]:
    """``{name: config}`` from a mapping of names to option mappings (or instances), or a list of names.

    Raises:
        UnknownNameError: an unregistered plugin name.
        ConfigError: a bad option, naming ``plugins.<name>.<option>``.
    """
    if value is None:
        return {}
    if isinstance(value, (list, tuple)):
        value = {n: {} for n in value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of plugin names to options, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for name, opts in value.items():
        if name not in PLUGINS:
            raise UnknownNameError(f"{key}: unknown plugin {name!r}{did_you_mean(name, PLUGINS)}; registered: "
                                   f"{sorted(PLUGINS)}")
        cfg_cls = PLUGINS[name].Config
        sub = f"{key}.{name}"
        if isinstance(opts, cfg_cls):
            validate_dataclass(opts, prefix=sub)
            out[name] = opts
        else:
            out[name] = dataclass_from_dict(cfg_cls, opts or {}, prefix=sub)
    return out


class Plugin:
    """Base class of trainer plugins (see the module docstring for the hooks and their order)."""

    Config: ClassVar[type] = _NoOptions
    plugin_name: ClassVar[str] = ""
    allows_grad_stats: ClassVar[bool] = True
    step_on_empty_batch: ClassVar[bool] = False
    per_sample_loss: ClassVar[bool] = False
    max_micro_batch: int | None = None

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def setup(self, trainer: Any) -> None:
        return None

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: Any, model: nn.Module) -> Any:
        return optimizer

    def batch_sampler(self, n: int, *, global_batch: int, rank: int, world_size: int, seed: int, epoch: int,
                      start_step: int) -> Any:
        return None

    def backward(self, losses: Any, *, scaler: Any = None) -> None:
        raise NotImplementedError(f"plugin {self.plugin_name!r} sets per_sample_loss but has no backward()")

    def on_step_end(self, trainer: Any) -> dict[str, float]:
        return {}

    def epoch_metrics(self, trainer: Any) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def build_plugins(configs: dict[str, Any], extra: list[Plugin] | None = None) -> list[Plugin]:
    """Instantiate the configured plugins (in config order), then append already-built ones (``extra``)."""
    plugins = [PLUGINS[name](cfg) for name, cfg in configs.items()]
    for p in extra or []:
        if not isinstance(p, Plugin):
            raise TypeError(f"plugins must be Plugin instances, got {type(p).__name__}")
        plugins.append(p)
    names = [p.plugin_name or type(p).__name__ for p in plugins]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"plugins: {dup} given twice")
    return plugins
