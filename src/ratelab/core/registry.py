"""Model registry: every model in ratelab is built by name.

Entry points are one-line functions decorated with :func:`register_model`; they receive the runtime kwargs
(``num_classes``, ``img_size``, ``in_chans`` ...) and return an ``nn.Module``. The registry is ratelab's own;
exporting to timm is an explicit opt-in (:func:`ratelab.compat.timm.register`) and never happens at import.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_MODEL_FAMILY: dict[str, str] = {}


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


def _ensure_models_imported() -> None:
    # Importing the models package runs every family's @register_model decorators. Done lazily so that
    # ``import ratelab`` stays cheap.
    import ratelab.models  # noqa: F401


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching a shell-style ``pattern`` (e.g. ``"crate_*"``)."""
    _ensure_models_imported()
    return sorted(n for n in _MODEL_ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    _ensure_models_imported()
    return name in _MODEL_ENTRYPOINTS


def model_family(name: str) -> str:
    _ensure_models_imported()
    return _MODEL_FAMILY[name]


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    checkpoint_path: str | None = None,
    checkpoint_use_ema: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name, e.g. ``"crate_tiny_patch16_224"`` (see :func:`list_models`).
        num_classes: classifier width; ``0`` gives a model without head.
        img_size: input resolution; position embeddings are sized (or interpolated on load) for it.
        in_chans: input channels.
        checkpoint_path: optional weights: ratelab's format (``*.safetensors`` with a ``config.json`` beside it, or
            a run directory / training checkpoint) or an official upstream file, detected by its keys.
        checkpoint_use_ema: load the EMA weights (``model_ema``) of a file that stores both (default: ``model``).
        **kwargs: family-specific runtime options (``None`` values are dropped, as in timm).

    Raises:
        KeyError: unknown model name (the message lists close matches).
    """
    _ensure_models_imported()
    if name not in _MODEL_ENTRYPOINTS:
        close = [n for n in _MODEL_ENTRYPOINTS if name.split("_")[0] in n][:10]
        raise KeyError(f"unknown model {name!r}; close matches: {close or 'none'}; see `ratelab models`")
    kw = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans, **kwargs}
    kw = {k: v for k, v in kw.items() if v is not None}
    model = _MODEL_ENTRYPOINTS[name](**kw)
    model.model_name = name
    if checkpoint_path is not None:
        from ratelab.core.checkpoint import load_model_weights

        load_model_weights(model, checkpoint_path, use_ema=checkpoint_use_ema)
    return model
