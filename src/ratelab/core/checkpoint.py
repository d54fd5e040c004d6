"""Checkpoint I/O: atomic writes, ratelab's model format, and foreign weight files.

ratelab's model format is a directory (or file pair) with ``model.safetensors`` and ``model_config.json``::

    {"format_version": 1, "model": "crate_nano_patch4_16", "kwargs": {"num_classes": 10, ...}, "arch": {...}}

Training checkpoints (optimizer, scheduler, RNG, data position) are ``*.pt`` files written by the trainer through
:func:`atomic_torch_save`; their ``"model"`` entry is an unwrapped state dict, so they load here as well.

``"model_args"`` (when the model has ``model.model_args``) is the complete set of keyword arguments that rebuild the
architecture through its registered entry point; files without it are rebuilt from ``kwargs`` + ``arch``.

Layering: this module is ``core`` and never imports the model families. :func:`load_model` has to rebuild a model
by name, so it lives in the factory above them (:func:`ratelab.models._factory.load_model`); ``load_model`` is still
importable from here and resolves to the factory on first access (module ``__getattr__``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ratelab.core.errors import CheckpointError  # re-exported: its historical home
from ratelab.core.keymap import strip_prefixes

StateDictFilter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

FORMAT_VERSION = 1
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
# Tried in this order when a file wraps its weights. The raw weights come first: DeiT-style training scripts
# (Adventurer's among them) save ``model`` and ``model_ema`` side by side and report the accuracy of ``model``.
_WRAPPER_KEYS = ("model", "state_dict", "module", "model_ema", "state_dict_ema")
_EMA_KEYS = ("model_ema", "state_dict_ema")


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows.

    ``os.umask`` can only be read by setting it, which for a moment changes it for every thread of the process;
    Linux (4.7+) reports it in ``/proc/self/status``, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    # Write to a temporary file in the same directory, fsync, then rename: a crash leaves either the old file or
    # the new one, never a torn file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The mode open() would give: an existing target keeps its own, a new file gets 0666 minus the umask. mkstemp
    # creates 0600 (and safetensors writes 0600 too), which would leave checkpoints unreadable to a group that can
    # read every other file of the run.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after the writer, which may have replaced the file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, _w)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP (``module``), ``torch.compile`` (``_orig_mod``) and opacus (``_module``) wrappers."""
    while True:
        for attr in ("module", "_orig_mod", "_module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_model` needs to rebuild ``model``: registry name, runtime kwargs, architecture.

    ``model.model_args`` (a JSON-able dict such that the entry point called with it rebuilds the architecture) is
    stored as ``"model_args"`` and is what :func:`load_model` uses; ``kwargs`` (``num_classes``/``img_size``/
    ``in_chans``) and ``arch`` (the family config) are always written too, for readers and for older files.

    Raises:
        CheckpointError: the model has no ``model_name`` (not built by ``create_model``), or its ``model_args`` do
            not serialize to JSON (the message names the offending argument).
    """
    model = unwrap_model(model)
    name = getattr(model, "model_name", None)
    if name is None:
        raise CheckpointError("model has no `model_name`; build it with ratelab.create_model to save it")
    kwargs = {k: getattr(model, k) for k in ("num_classes", "img_size", "in_chans") if hasattr(model, k)}
    cfg = getattr(model, "cfg", None)
    arch = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "model": name, "kwargs": kwargs, "arch": arch}
    model_args = getattr(model, "model_args", None)
    if model_args is not None:
        for k, v in dict(model_args).items():
            try:
                json.dumps(v)
            except TypeError as e:
                raise CheckpointError(f"{name}: model_args[{k!r}] = {v!r} is not JSON-serializable ({e})") from e
        # The runtime attributes are the model's current truth (``reset_classifier`` changes ``num_classes``).
        meta["model_args"] = {**dict(model_args), **kwargs}
    return meta


def save_model(model: nn.Module, out_dir: str | os.PathLike, *,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` into ``out_dir`` (atomically). Returns the weights path.

    ``state_dict`` replaces ``model.state_dict()`` (the trainer passes the gathered full weights of a sharded model).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    model = unwrap_model(model)
    sd = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    meta = model_config(model)
    _atomic_write(out_dir / MODEL_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_text(json.dumps(meta, indent=2), out_dir / MODEL_CONFIG)
    return out_dir / MODEL_WEIGHTS


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for cand in (MODEL_WEIGHTS, "checkpoints/last.pt", "last.pt"):
            if (path / cand).exists():
                return path / cand
        raise CheckpointError(f"{path}: directory holds no {MODEL_WEIGHTS} or checkpoints/last.pt")
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


# Sentences of torch's weights-only errors that advise loading the file anyway (weights_only=False, allowlisting
# globals): right for a file one trusts, wrong as the advice of a tool handed a file that would run code.
_TORCH_ADVICE = re.compile(
    r"weights.only|re-running|safe_globals|allowlist|trust|check the documentation|please file an issue|"
    r"you have two options|in pytorch 2\.6",
    re.IGNORECASE,
)


def _without_torch_advice(message: str) -> str:
    kept = []
    for line in message.replace("\x1b[1m", "").replace("\x1b[0m", "").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", line.strip()):
            sentence = re.sub(r"^(\(\d\)\s*)?(WeightsUnpickler error:?)?\s*", "", sentence).strip()
            if sentence and not _TORCH_ADVICE.search(sentence):
                kept.append(sentence)
    return " ".join(kept)


def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file.

    Every ``torch.load`` of ratelab goes through here. A pickle that holds anything but tensors, plain containers
    and ``argparse.Namespace`` (the training arguments MAE-style scripts save) is refused, because unpickling it
    could run arbitrary code; the error says so and never relays torch's advice to retry with
    ``weights_only=False``.

    Args:
        path: the file.
        what: what the file should be, for the message ("checkpoint", "training checkpoint", ...).
        mmap: memory-map the tensors (zip-format files only).

    Raises:
        CheckpointError: the file was refused, or cannot be read (the message names it).
    """
    try:
        # MAE-style training scripts (FAIR MAE, CRATE-MAE) save their argparse Namespace beside the weights;
        # rebuilding one sets attributes from a dict and runs no code, so it is allowed next to tensors.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                # A legacy (non-zip) file cannot be memory-mapped; it still is read, under the same restriction.
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _without_torch_advice(str(e))
        if "global" in detail.lower():
            reason = ("it references Python objects other than tensors and plain containers, and unpickling it "
                      "could run arbitrary code")
        else:
            reason = ("it is not a plain pickle of tensors and containers (a corrupt file, or one written "
                      "by other means), and unpickling it without that restriction could run arbitrary code")
        raise CheckpointError(
            f"{path}: refused to load this {what}: {reason}. Only weights files (tensors in dicts and lists, or "
            f"safetensors) are read; if you wrote the file yourself, re-save just its state dict"
            + (f". Detail: {detail}" if detail else "")
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{what} file not found: {path}") from None
    except Exception as e:  # zip, storage or mmap errors; torch words them for its own users
        raise CheckpointError(
            f"{path}: cannot read the {what} ({type(e).__name__}: {_without_torch_advice(str(e)) or e})"
        ) from e


def read_state_dict(path: str | os.PathLike, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a flat tensor state dict from a safetensors, torch or JAX ``.npz`` file, unwrapping common containers.

    ``.pth``/``.pt`` files are read with ``weights_only=True``: a pickle that would execute code is refused.
    ``use_ema=True`` picks the EMA weights (``model_ema`` / ``state_dict_ema``) of a file that holds both; it is an
    error when the file has none.
    """
    path = _resolve(path)
    if path.suffix == ".npz":
        return read_npz(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    obj = load_torch_file(path, what="checkpoint")
    return unwrap_state_dict(obj, source=str(path), use_ema=use_ema)


def array_to_tensor(a: Any, name: str) -> torch.Tensor:
    """A numeric numpy array (or tensor) as a tensor; bfloat16 stored by ``np.savez`` as 2-byte void (big_vision's
    checkpoints) is recovered as float32.

    Raises:
        CheckpointError: a non-numeric array, naming ``name``.
    """
    import numpy as np

    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).float()
    if a.dtype.kind not in "fiub":
        raise CheckpointError(f"{name}: array of dtype {a.dtype}, expected a numeric array")
    return torch.from_numpy(np.ascontiguousarray(a))


def read_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A JAX/Flax ``.npz`` checkpoint (big_vision's format: "/"-joined names) as a flat dict of tensors, its names
    kept; read with ``allow_pickle=False``, so no code can run. Families with a Flax layout (CRATE-alpha) map the
    names in their ``checkpoint_filter_fn``.

    Raises:
        CheckpointError: a missing or unreadable file, non-numeric arrays.
    """
    import zipfile

    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            flat = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e})") from e
    return {k: array_to_tensor(a, f"{path}: {k!r}") for k, a in flat.items()}


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint", use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers and strip wrapper prefixes.

    ``use_ema=True`` descends into ``model_ema`` / ``state_dict_ema`` first (and requires one of them).
    """
    # Descend into wrappers first: a training checkpoint can hold loose tensors beside its weights (the official
    # CRATE script saves ``best_acc1`` as a tensor next to ``state_dict``), so "has a tensor" does not mean "is it".
    top = obj
    order = _WRAPPER_KEYS
    if use_ema:
        if not (isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in _EMA_KEYS)):
            keys = sorted(map(str, obj))[:20] if isinstance(obj, dict) else []
            raise CheckpointError(f"{source}: use_ema=True but the file has no {' / '.join(_EMA_KEYS)}; keys {keys}")
        order = _EMA_KEYS + _WRAPPER_KEYS
    while isinstance(obj, dict):
        inner = next((obj[k] for k in order if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(map(str, top))[:20] if isinstance(top, dict) else []
        raise CheckpointError(f"{source}: no state dict found; top-level keys are {keys}")
    # DDP (module.), torch.compile (_orig_mod.) and opacus (_module.) prefixes, in any nesting.
    return strip_prefixes({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if own[k].shape != state_dict[k].shape
    )
    if missing or unexpected or shape:
        parts = [f"{source}: weights do not match {type(model).__name__}"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        if shape:
            parts.append(f"shape mismatches ({len(shape)}): {shape[:12]}")
        raise CheckpointError("; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def load_model_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    use_ema: bool = False,
    filter_fn: StateDictFilter | None = None,
    keep_model_keys: tuple[str, ...] = (),
) -> nn.Module:
    """Load ratelab or official weights into ``model``, strictly.

    Args:
        model: the receiving model.
        path: a weights file, a ratelab model directory or a run directory (see :func:`read_state_dict`).
        use_ema: see :func:`read_state_dict`.
        filter_fn: converter ``(state_dict, model) -> state_dict``; default: the family converter
            ``type(model).checkpoint_filter_fn``, which recognizes an official layout by its keys and maps it
            (ratelab's own layout passes through; position embeddings are resampled to the model's grid).
        keep_model_keys: key prefixes (e.g. ``("head.",)``) whose tensors are dropped from the file and kept as the
            model has them: a classifier re-initialized for another number of classes. Every other key must match.

    Raises:
        CheckpointError: unreadable file, failed conversion, or keys/shapes that do not match (all named).
    """
    src = _resolve(path)
    sd = read_state_dict(src, use_ema=use_ema)
    filt = filter_fn if filter_fn is not None else getattr(type(model), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(sd, model)
        except KeyError as e:
            raise CheckpointError(f"{src}: conversion failed, key {e} missing") from e
        except CheckpointError as e:  # the filter cannot know the file name
            raise CheckpointError(f"{src}: {e}") from e
    if keep_model_keys:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith(keep_model_keys)}
        sd.update({k: v for k, v in own.items() if k.startswith(keep_model_keys)})
    load_state_dict_strict(model, sd, source=str(src))
    return model


def __getattr__(name: str) -> Any:
    # PEP 562: ``load_model`` rebuilds a model by registry name, so it lives in the factory above the families; it
    # stays importable from here (its historical home) without core importing the models at import time.
    if name == "load_model":
        from ratelab.models._factory import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
