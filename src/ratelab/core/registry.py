"""Model registry: the passive table behind :func:`ratelab.create_model`.

Entry points are one-line functions decorated with :func:`register_model`; they receive the runtime kwargs
(``num_classes``, ``img_size``, ``in_chans`` ...) and return an ``nn.Module``. This module only holds the tables and
looks names up: it imports nothing from ratelab above ``core``, so every layer may depend on it. A family's names
appear here once its module has been imported; the complete view (every family imported first) and the
checkpoint-aware ``create_model`` / ``load_model`` live in :mod:`ratelab.models._factory`, which sits above the
families (timm's ``_registry`` / ``_factory`` split).

``create_model``, ``list_models``, ``is_model`` and ``model_family`` stay importable from here for existing callers;
they resolve to the factory on first access (see :func:`__getattr__`) and are not defined in this module.
The registry is ratelab's own; exporting to timm is an explicit opt-in (:func:`ratelab.compat.timm.register`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ratelab.core.errors import UnknownNameError, did_you_mean

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_MODEL_FAMILY: dict[str, str] = {}

# Names re-exported from the factory for the import paths that predate it (``from ratelab.core.registry import
# create_model``). Resolved lazily so that this module never imports the model families at import time.
_FACTORY_NAMES = ("create_model", "list_models", "is_model", "model_family")


def named_decorator(table: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator storing its target in ``table`` under ``name``; a duplicate name is an error, never an overwrite.

    Shared by every registry of the library (models, datasets, tasks).
    """

    def deco(obj: Any) -> Any:
        if name in table:
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__module__})")
        table[name] = obj
        return obj

    return deco


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``. Duplicate names are an error, never a silent overwrite."""
    name = fn.__name__
    named_decorator(_MODEL_ENTRYPOINTS, "model", name)(fn)
    _MODEL_FAMILY[name] = fn.__module__.split(".")[-2] if fn.__module__.count(".") >= 2 else fn.__module__
    return fn


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entry point registered as ``name`` (among the families imported so far).

    Raises:
        UnknownNameError: no such name; the message lists the closest registered names.
    """
    try:
        return _MODEL_ENTRYPOINTS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown model {name!r}{did_you_mean(name, _MODEL_ENTRYPOINTS)}; see `ratelab models`"
        ) from None


def registered_models(pattern: str = "*") -> list[str]:
    """Sorted names registered so far that match the shell-style ``pattern``; no family is imported here."""
    return sorted(n for n in _MODEL_ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def registered_family(name: str) -> str:
    """Family (package name, e.g. ``"crate"``) of a registered name."""
    model_entrypoint(name)  # the error for an unknown name
    return _MODEL_FAMILY[name]


def __getattr__(name: str) -> Any:
    # PEP 562: only called for names this module does not define.
    # A plain import statement (not importlib) so the layering test sees this function-level dependency.
    if name in _FACTORY_NAMES:
        from ratelab.models import _factory

        return getattr(_factory, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["model_entrypoint", "named_decorator", "register_model", "registered_family", "registered_models"]
