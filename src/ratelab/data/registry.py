"""Dataset registry: every dataset in ratelab is built by name with :func:`build_dataset`.

Dataset classes register themselves with :func:`register_dataset`; their ``__init__`` takes
``(split, *, root, img_size, seed, augment, **options)`` and validates its own split and options.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch.utils.data import Dataset

from ratelab.core.errors import ConfigError, UnknownNameError, did_you_mean
from ratelab.core.registry import named_decorator

_DATASETS: dict[str, type] = {}
_COMMON = ("root", "img_size", "seed", "augment")


def register_dataset(name: str):
    """Class decorator registering a dataset under ``name``. Duplicate names are an error."""

    return named_decorator(_DATASETS, "dataset", name)


def list_datasets() -> list[str]:
    """Sorted names accepted by :func:`build_dataset`."""
    return sorted(_DATASETS)


def dataset_options(name: str) -> list[str]:
    """Names of the dataset-specific keyword options of ``name`` (beyond root/img_size/seed/augment)."""
    cls = _get(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "split", *_COMMON) and params[p].kind == params[p].KEYWORD_ONLY]


def _get(name: str) -> type:
    key = name.lower() if isinstance(name, str) else name
    if key not in _DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}{did_you_mean(name, list_datasets())}; valid datasets: "
                               f"{', '.join(list_datasets())}")
    return _DATASETS[key]


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | None = None,
    img_size: int | None = None,
    seed: int = 0,
    augment: bool | None = None,
    **kwargs: Any,
) -> Dataset:
    """Build a registered dataset.

    Every classification dataset yields ``(image, label)`` with ``image`` a normalized float32 tensor ``(C, H, W)``
    and ``label`` an ``int`` (``shapes`` and ``shapes_cluttered`` add a mask with ``return_mask=True``); the
    evaluation readers differ: ``voc`` yields ``(image, mask)`` (int64 ``(H, W)``, 255 = ignore) and ``coco``
    ``(image, image_id)``. All expose ``num_classes``, ``in_chans``, ``img_size``, ``classes``, ``mean``, ``std``,
    ``split`` and ``augment``.

    Args:
        name: one of :func:`list_datasets` (case-insensitive).
        split: ``"train"``, ``"val"`` or ``"test"``; what each dataset accepts is listed in its docstring and in
            the error for a bad value.
        root: data directory (file-backed datasets only).
        img_size: output height = width; ``None`` keeps the dataset's default.
        seed: fixes train/val partitions and synthetic content; never the augmentation, which draws from torch's
            global RNG so that ``torch.manual_seed`` / ``torch.set_rng_state`` (and DataLoader worker seeding)
            reproduce it exactly.
        augment: ``None`` = the dataset's light augmentation on ``"train"`` only; ``True`` / ``False`` force it.
        **kwargs: dataset-specific options (see :func:`dataset_options`).

    Raises:
        ValueError: unknown dataset, split or option, or a bad argument value.
        FileNotFoundError: a missing root directory or data file (the message names the path).
    """
    cls = _get(name)
    allowed = dataset_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset {name!r} does not accept option(s) {', '.join(unknown)}; accepted: {', '.join(allowed) or 'none'}"
        )
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ConfigError(f"img_size must be a positive int, got {img_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    if augment is not None and not isinstance(augment, bool):
        raise ConfigError(f"augment must be None, True or False, got {augment!r}")
    return cls(split, root=root, img_size=img_size, seed=seed, augment=augment, **kwargs)
