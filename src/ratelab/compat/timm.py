"""Opt-in export of ratelab models to timm's registry.

Nothing is registered at import: call :func:`register` once, then ``timm.create_model("ratelab_<name>")`` builds the
ratelab model. Names carry a prefix so they never collide with (or overwrite) timm's own entries.
``pretrained=True`` loads the official release from ratelab's local weights directory (see ``ratelab weights
list``); nothing is downloaded. ``model.pretrained_cfg`` carries the release's input size, mean/std and
interpolation, so ``timm.data.resolve_data_config(model=model)`` builds the matching transform.

Example::

    import timm
    from ratelab.compat.timm import register

    register()
    model = timm.create_model("ratelab_crate_tiny_patch16_224", num_classes=10)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ratelab.core.errors import ConfigError
from ratelab.models._factory import create_model, list_models
from ratelab.models._pretrained import has_pretrained

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(ratelab_name: str, timm_name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # pretrained=True reads the official release from ratelab's local weights directory (never downloads).
        if pretrained and not has_pretrained(ratelab_name):
            raise ConfigError(
                f"{timm_name}: ratelab ships no downloadable weights and has no release registered for "
                f"{ratelab_name!r} (see `ratelab weights list`); load a file with "
                f"ratelab.create_model({ratelab_name!r}, checkpoint_path=...) (ratelab or official layout)"
            )
        for k in _TIMM_ONLY_KWARGS:
            kwargs.pop(k, None)
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        model = create_model(ratelab_name, pretrained=pretrained, **kwargs)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        # timm's data helpers (resolve_data_config) read input size, mean/std and interpolation from here.
        model.pretrained_cfg = {**model.pretrained_cfg, "architecture": timm_name}
        return model

    build.__name__ = build.__qualname__ = timm_name
    build.__module__ = __name__
    build.__doc__ = f"ratelab model {ratelab_name!r} (registered by ratelab.compat.timm.register)."
    build.ratelab_name = ratelab_name  # type: ignore[attr-defined]
    return build


def register(prefix: str = "ratelab_", pattern: str = "*") -> list[str]:
    """Register ratelab models in timm's registry as ``prefix + name``. Idempotent.

    Args:
        prefix: prepended to every ratelab name; must be non-empty so timm's own names are never overwritten.
        pattern: shell-style filter over ratelab names (see :func:`ratelab.list_models`).

    Returns:
        The timm names now available (including ones registered by an earlier call).

    Raises:
        ValueError: empty prefix, or a prefixed name already belongs to a model that ratelab did not register.
    """
    import timm.models

    if not prefix:
        raise ValueError("prefix must be non-empty: unprefixed names could overwrite timm's own models")
    module = sys.modules[__name__]
    names = []
    for name in list_models(pattern):
        timm_name = prefix + name
        if timm.models.is_model(timm_name):
            existing = timm.models.model_entrypoint(timm_name)
            if getattr(existing, "ratelab_name", None) != name:
                raise ValueError(
                    f"timm already has a model named {timm_name!r} (from {existing.__module__}); pick another prefix"
                )
        else:
            fn = _entrypoint(name, timm_name)
            # timm's decorator appends the name to this module's __all__; keep the attribute it then promises.
            setattr(module, timm_name, fn)
            timm.models.register_model(fn)
        names.append(timm_name)
    return names


__all__ = ["register"]
