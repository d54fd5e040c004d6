"""One way every model family is built from a variant config and keyword arguments (timm's ``build_model_with_cfg``).

A family has a frozen config dataclass (the *architecture*: widths, depths, switches that change what is computed)
and a model class ``Model(cfg, *, runtime options...)`` (``num_classes``, ``img_size``, ``in_chans``, drop rates,
backends). Its registered entry points are one line each::

    @register_model
    def crate_tiny_patch16_224(**kwargs):
        return build_model_with_cfg(Crate, CrateConfig, CRATE_VARIANTS["tiny"], **{"patch_size": 16, **kwargs})

:func:`build_model_with_cfg` splits the keyword arguments into architecture overrides (applied with
``dataclasses.replace``, or the config's own ``override`` method when some fields are derived from others) and
runtime options (the model constructor's keyword parameters), rejects anything else with an error listing the valid
names, and stores ``model.model_args``: a JSON-able dict (every architecture field plus the runtime options) such
that ``entrypoint(**model.model_args)`` rebuilds the same architecture. Checkpoints save it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from typing import Any, TypeVar

import torch.nn as nn

from ratelab.core.errors import ConfigError

__all__ = ["UnknownArgumentError", "build_model_with_cfg", "runtime_arg_names"]

M = TypeVar("M", bound=nn.Module)


class UnknownArgumentError(ConfigError, TypeError):
    """A keyword argument that is neither an architecture field nor a runtime option of the model.

    A ``ConfigError`` (a ``ValueError``) like every bad option, and a ``TypeError`` like Python's own "unexpected
    keyword argument", so both ``except`` clauses keep working.
    """


def runtime_arg_names(model_cls: type) -> list[str]:
    """Keyword parameters of ``model_cls.__init__`` after the config (the runtime options), in signature order."""
    params = list(inspect.signature(model_cls.__init__).parameters.values())[2:]  # drop self, cfg
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _runtime_defaults(model_cls: type) -> dict[str, Any]:
    params = list(inspect.signature(model_cls.__init__).parameters.values())[2:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _check_type(value: Any, tp: Any, key: str, owner: str) -> Any:
    """Light check of one architecture value against its annotation (scalars, ``X | None``, tuples).

    An int is accepted (and converted) for a float field; a list for a tuple field (a JSON round trip turns tuples
    into lists). Other annotations are not checked here (the config's ``__post_init__`` may).
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _check_type(value, rest[0], key, owner) if len(rest) == 1 else value
    if tp is tuple or origin is tuple:
        value = tuple(value) if isinstance(value, list) else value
        good = isinstance(value, tuple)
    elif tp is bool:
        good = isinstance(value, bool)
    elif tp is int:
        good = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        good = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if good else value
    elif tp is str:
        good = isinstance(value, str)
    else:
        good = True
    if not good:
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{owner}.{key} must be {name}, got {value!r} ({type(value).__name__})")
    return value


def _json_value(value: Any, key: str, model: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{model}: option {key}={value!r} is not JSON-serializable, so a checkpoint could not record "
                          f"it ({e})") from e


def build_model_with_cfg(model_cls: type[M], cfg_cls: type, variant_cfg: Any, **kwargs: Any) -> M:
    """Build ``model_cls(cfg, **runtime)`` from a variant config and keyword overrides.

    Args:
        model_cls: the family's model class; its ``__init__(self, cfg, *, ...)`` keyword parameters after ``cfg`` are
            the runtime options. A class attribute ``execution_args`` (tuple of names) lists runtime options that
            choose *how* to compute (a kernel backend, a chunk size), not *what*: they are not stored in
            ``model_args``, so a checkpoint written on one machine does not force its backend on another.
        cfg_cls: the family's frozen config dataclass.
        variant_cfg: the named variant (an instance of ``cfg_cls``) the overrides apply to.
        **kwargs: architecture fields of ``cfg_cls`` and runtime options, mixed.

    Returns:
        The model, with ``model.cfg`` (the resolved config, set by the model) and ``model.model_args``.

    Raises:
        UnknownArgumentError: a keyword that is neither (the message lists both kinds of valid names).
        ConfigError: an architecture value of the wrong type, an invalid combination (the config's own check), or
            a value that cannot be written to JSON.

    Example:
        >>> model = build_model_with_cfg(Crate, CrateConfig, CRATE_VARIANTS["test"], depth=3, num_classes=5)
        >>> model.model_args["depth"], model.model_args["num_classes"]
        (3, 5)
    """
    if not isinstance(variant_cfg, cfg_cls):
        raise TypeError(f"build_model_with_cfg: variant_cfg must be a {cfg_cls.__name__}, got {type(variant_cfg)}")
    arch_fields = [f.name for f in dataclasses.fields(cfg_cls)]
    runtime_names = runtime_arg_names(model_cls)
    unknown = sorted(k for k in kwargs if k not in arch_fields and k not in runtime_names)
    if unknown:
        raise UnknownArgumentError(
            f"unknown {model_cls.__name__} option(s) {unknown} (unexpected keyword arguments); architecture fields "
            f"({cfg_cls.__name__}): {sorted(arch_fields)}; runtime options: {runtime_names}"
        )
    hints = typing.get_type_hints(cfg_cls)
    arch = {k: _check_type(v, hints.get(k, Any), k, cfg_cls.__name__) for k, v in kwargs.items() if k in arch_fields}
    runtime = {k: v for k, v in kwargs.items() if k in runtime_names}
    override = getattr(variant_cfg, "override", None)
    try:
        cfg = override(**arch) if callable(override) else dataclasses.replace(variant_cfg, **arch)
    except ConfigError:
        raise
    except ValueError as e:  # the config's __post_init__ check
        raise ConfigError(f"{cfg_cls.__name__}: {e}") from e
    model = model_cls(cfg, **runtime)
    skip = set(getattr(model_cls, "execution_args", ()))
    resolved = {**_runtime_defaults(model_cls), **runtime}
    args = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    args.update({k: v for k, v in resolved.items() if k not in skip})
    model.model_args = {k: _json_value(v, k, model_cls.__name__) for k, v in args.items()}
    return model
