"""Model factory: ``create_model`` / ``load_model`` by registry name, with weights (timm's ``_factory``).

This module sits above the model families: importing it imports :mod:`ratelab.models`, which registers every
family's entry points in the passive table of :mod:`ratelab.core.registry`. Everything that builds a model by name
and puts weights into it is here, so ``core`` never needs to import a family:

* :func:`create_model` - entry point lookup, runtime kwargs, ``checkpoint_path=`` (ratelab or official layout) and
  ``pretrained=True`` (an official release from the weights registry, :mod:`ratelab.models._pretrained`).
* :func:`load_model` - rebuild a model saved by :func:`ratelab.core.checkpoint.save_model` (or a trainer
  checkpoint) from its stored name and arguments. ``ratelab.core.checkpoint.load_model`` is this function.
* :func:`convert_official` - official file -> ratelab's format, for any family's converter.

``ratelab.create_model``, ``ratelab.list_models`` and ``ratelab.core.registry.create_model`` resolve here lazily.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import ratelab.models  # noqa: F401  (registers every family's entry points)
from ratelab.core.checkpoint import (
    FORMAT_VERSION,
    MODEL_CONFIG,
    CheckpointError,
    StateDictFilter,
    load_model_weights,
    load_state_dict_strict,
    load_torch_file,
    read_state_dict,
    save_model,
)
from ratelab.core.errors import ConfigError, UnknownNameError, WeightsNotFound, did_you_mean
from ratelab.core.registry import _MODEL_ENTRYPOINTS, model_entrypoint, registered_family, registered_models
from ratelab.models._pretrained import (
    PretrainedCfg,
    find_weights,
    get_pretrained_cfg,
    has_pretrained,
    list_pretrained,
)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching a shell-style ``pattern`` (e.g. ``"crate_*"``)."""
    return registered_models(pattern)


def is_model(name: str) -> bool:
    """Whether ``name`` (an architecture, without ``.tag``) is a registered model."""
    return name in _MODEL_ENTRYPOINTS


def model_family(name: str) -> str:
    """Family package of a registered model, e.g. ``"crate"``."""
    return registered_family(name)


def _entrypoint(architecture: str) -> Callable[..., nn.Module]:
    if architecture in _MODEL_ENTRYPOINTS:
        return model_entrypoint(architecture)
    pending = [n for n in list_pretrained() if n.split(".")[0] == architecture]
    if pending:
        raise UnknownNameError(
            f"unknown model {architecture!r}: the weights registry lists {pending[0]!r} but the model is not "
            f"implemented yet; see `ratelab weights list`"
        )
    raise UnknownNameError(
        f"unknown model {architecture!r}{did_you_mean(architecture, _MODEL_ENTRYPOINTS)}; see `ratelab models`"
    )


def _resolve_converter(spec: str | None) -> StateDictFilter | None:
    if spec is None:
        return None
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"weights converter {spec!r} cannot be imported ({e})") from e


def _json_able(kwargs: Mapping[str, Any]) -> bool:
    try:
        json.dumps(dict(kwargs))
    except TypeError:
        return False
    return True


def _default_pretrained_cfg(name: str, model: nn.Module) -> dict[str, Any]:
    # No release: only what the model itself knows. mean/std stay None (timm's data helpers then use their defaults;
    # our own small models are trained on other data than ImageNet, so guessing its statistics would be wrong).
    size, chans = getattr(model, "img_size", None), getattr(model, "in_chans", None)
    input_size = (chans, size, size) if isinstance(size, int) and isinstance(chans, int) else None
    return {"architecture": name, "tag": None, "url": None, "file": None, "input_size": input_size, "mean": None,
            "std": None, "interpolation": None, "crop_pct": None, "num_classes": getattr(model, "num_classes", None)}


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    in_chans: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_use_ema: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: registered name, e.g. ``"crate_tiny_patch16_224"`` (see :func:`list_models`), optionally with a
            release tag, ``"adventurer_base_patch16_224.in1k_384"`` (see ``ratelab weights list``). A tag selects
            that release's architecture arguments (``model_kwargs``, ``num_classes``) even without ``pretrained``.
        pretrained: load the official release (the tag's, or the architecture's default) from the local weights
            directory (``$RATELAB_WEIGHTS``, default ``~/.cache/ratelab/weights``); its sha256 is checked when known,
            the family converter maps it, and it loads strictly. Nothing is downloaded.
        pretrained_cfg_overlay: entries replacing those of ``model.pretrained_cfg`` (e.g. another ``input_size``).
        num_classes: classifier width; ``0`` gives a model without head. With ``pretrained=True`` it defaults to the
            release's; another width keeps every pretrained tensor but the classifier, which stays freshly
            initialized (fine-tuning).
        img_size: input resolution; position embeddings are sized (or interpolated on load) for it.
        in_chans: input channels.
        checkpoint_path: weights file instead of a release: ratelab's format (``*.safetensors`` with a
            ``model_config.json`` beside it, or a run directory / training checkpoint) or an official upstream file,
            detected by its keys.
        checkpoint_use_ema: load the EMA weights (``model_ema``) of a file that stores both (default: ``model``).
        **kwargs: family-specific options (``None`` values are dropped, as in timm).

    Returns:
        The model, with ``model_name`` (the architecture), ``model_args`` (what rebuilds it) and ``pretrained_cfg``
        (timm-style dict: ``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ... of its release).

    Raises:
        UnknownNameError: unknown model or release name (the message lists close matches), or a release whose
            model is not implemented yet.
        WeightsNotFound: ``pretrained=True`` and the file is not on disk (the message names the path and URL).
        CheckpointError: sha256 mismatch, or weights that do not fit (keys and shapes named).
        ConfigError: ``pretrained=True`` together with ``checkpoint_path``.

    Example::

        model = ratelab.create_model("adventurer_tiny_patch16_224", pretrained=True, num_classes=10)
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    """
    architecture, _, tag = name.partition(".")
    entry = _entrypoint(architecture)
    if pretrained and checkpoint_path is not None:
        raise ConfigError(f"{name}: give pretrained=True or checkpoint_path=..., not both")
    cfg: PretrainedCfg | None = None
    if tag or pretrained:
        cfg = get_pretrained_cfg(name) if tag else _default_release(architecture)
    # The release's architecture arguments first, the caller's on top; None means "not given" (timm's rule).
    kw: dict[str, Any] = dict(cfg.model_kwargs) if cfg is not None else {}
    if cfg is not None and cfg.num_classes is not None:
        kw["num_classes"] = cfg.num_classes
    given = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans, **kwargs}
    kw.update({k: v for k, v in given.items() if v is not None})
    # Before building: a missing or corrupt file should not cost the construction of a billion-parameter model.
    weights_file = find_weights(cfg) if pretrained and cfg is not None else None
    model = entry(**kw)
    model.model_name = architecture
    # The contract of core.checkpoint.model_config: model_args rebuild the architecture through the entry point.
    # A family builder may set richer ones itself; otherwise the arguments of this call are exactly that.
    if getattr(model, "model_args", None) is None and _json_able(kw):
        model.model_args = kw
    shown = cfg if cfg is not None else (_default_release(architecture) if has_pretrained(architecture) else None)
    pcfg = shown.to_dict() if shown is not None else _default_pretrained_cfg(architecture, model)
    model.pretrained_cfg = {**pcfg, **dict(pretrained_cfg_overlay or {})}
    if weights_file is not None:
        assert cfg is not None
        keep: tuple[str, ...] = ()
        n = getattr(model, "num_classes", None)
        if cfg.classifier and cfg.num_classes is not None and n not in (None, 0, cfg.num_classes):
            keep = (cfg.classifier + ".",)
        load_model_weights(model, weights_file, use_ema=cfg.use_ema, filter_fn=_resolve_converter(cfg.converter),
                           keep_model_keys=keep)
    elif checkpoint_path is not None:
        load_model_weights(model, checkpoint_path, use_ema=checkpoint_use_ema)
    return model


def _default_release(architecture: str) -> PretrainedCfg:
    if not has_pretrained(architecture):
        raise WeightsNotFound(
            f"no pretrained weights are registered for {architecture!r} (see `ratelab weights list`); load a file "
            f"with create_model({architecture!r}, checkpoint_path=...)"
        )
    return get_pretrained_cfg(architecture)


def load_model(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild a saved model and load its weights.

    ``path`` is a directory or ``model.safetensors`` written by :func:`ratelab.core.checkpoint.save_model` (the
    config is the ``model_config.json`` beside it), or a trainer checkpoint ``*.pt`` / a run directory holding only
    ``checkpoints/last.pt`` (the config travels inside the checkpoint as ``model_config``). The model is rebuilt
    from the stored ``model_args`` when present (otherwise from ``kwargs`` + ``arch``), with ``overrides`` on top.

    Raises:
        CheckpointError: no config beside or inside the file, a newer format, or weights that do not fit.
    """
    path = Path(path)
    cfg_path = (path if path.is_dir() else path.parent) / MODEL_CONFIG
    if cfg_path.exists():
        meta = json.loads(cfg_path.read_text())
        source, state = cfg_path, None
    else:
        pt = path / "checkpoints" / "last.pt" if path.is_dir() else path
        if pt.suffix == ".safetensors" or not pt.is_file():
            raise CheckpointError(f"{cfg_path} not found: cannot tell which model {path} holds; use create_model("
                                  f"name, checkpoint_path=...) instead")
        ckpt = load_torch_file(pt, what="checkpoint")
        meta = ckpt.get("model_config") if isinstance(ckpt, dict) else None
        if not meta:
            raise CheckpointError(f"{pt}: no model_config inside; it was not written by the ratelab trainer")
        source, state = pt, ckpt["model"]
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{source}: format_version {meta['format_version']} is newer than this ratelab")
    if "model_args" in meta:
        kwargs = {**meta["model_args"], **overrides}
    else:
        kwargs = {**meta.get("kwargs", {}), **meta.get("arch", {}), **overrides}
    if state is None:
        return create_model(meta["model"], checkpoint_path=str(path), **kwargs)
    model = create_model(meta["model"], **kwargs)
    load_state_dict_strict(model, state, source=str(source))
    return model


def convert_official(
    path_in: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_name: str,
    *,
    detect_layout: Callable[[dict[str, torch.Tensor]], str | None],
    official_head: str | None = None,
    source: str = "official",
    **kwargs: Any,
) -> Path:
    """Convert an official checkpoint of any family to ratelab's format (``model.safetensors`` + config).

    Args:
        path_in: the official file (plain, wrapped or DataParallel-prefixed; see
            :func:`ratelab.core.checkpoint.read_state_dict`).
        out_dir: directory to write; created if needed.
        model_name: registry name with the file's architecture.
        detect_layout: the family's layout detector; the file must be ``"official"``.
        official_head: official key of the classifier weight; ``num_classes`` defaults to its first dimension.
        source: the upstream's name, for the error message.
        **kwargs: forwarded to :func:`create_model`.

    Returns:
        Path of the written ``model.safetensors``.
    """
    sd = read_state_dict(path_in)
    if detect_layout(sd) != "official":
        raise CheckpointError(f"{path_in}: not an official {source} checkpoint")
    if kwargs.get("num_classes") is None and official_head is not None and official_head in sd:
        kwargs["num_classes"] = sd[official_head].shape[0]
    model = create_model(model_name, checkpoint_path=str(path_in), **kwargs)
    return save_model(model, out_dir)


__all__ = ["convert_official", "create_model", "is_model", "list_models", "load_model", "model_family"]
