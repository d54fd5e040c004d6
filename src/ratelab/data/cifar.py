"""``cifar10`` / ``cifar100``: the official "python version" pickles, as extracted from the tarballs.

Expected files (``root`` may also point directly at the batch directory):

* ``root/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``
  (``label_names``);
* ``root/cifar-100-python/``: ``train``, ``test``, ``meta`` (``fine_label_names``, ``coarse_label_names``).

Each batch is a pickled dict with ``data``: uint8 ``(n, 3072)``, one row per image holding the 1024 red, then
1024 green, then 1024 blue values, each plane row-major 32x32; and ``labels`` (CIFAR-10) or ``fine_labels`` /
``coarse_labels`` (CIFAR-100). Nothing is downloaded. Pickles are read with an unpickler that only admits plain
containers and numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data.common import ImageDataset, resize, resolve_split, sample_shift, shift
from ratelab.data.registry import register_dataset

# commonly quoted per-channel statistics of the training sets
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _load_pickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DatasetNotFound(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any decoding failure is a bad file; say which
        raise DatasetError(f"cannot read CIFAR pickle {path}: {e}") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"CIFAR pickle {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def _field(d: dict, key: str, path: str) -> Any:
    # python-2 pickles read with encoding="bytes" have bytes keys; re-saved ones may have str keys
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"CIFAR pickle {path} has no key {key!r} (keys: {sorted(str(k) for k in d)})")


def _names(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _Cifar(ImageDataset):
    dirname: str
    files: dict[str, list[str]]
    meta_file: str
    default_mean: tuple[float, ...]
    default_std: tuple[float, ...]

    def _setup(self, split, root, img_size, augment, label_key: str, names_key: str, n_classes: int) -> None:
        self.split = resolve_split(self.name, split, ("train", "test"), {"val": "test"})
        root = os.fspath(root) if root is not None else os.environ.get("RATELAB_DATA", "data")
        first = self.files["train"][0]
        if os.path.isfile(os.path.join(root, self.dirname, first)) or not os.path.isfile(os.path.join(root, first)):
            # the standard layout; a missing file is reported at its standard path
            root = os.path.join(root, self.dirname)
        self.root = root
        self.img_size, self.in_chans = img_size or 32, 3
        self._set_norm(self.default_mean, self.default_std)

        meta_path = os.path.join(root, self.meta_file)
        self.classes = _names(_field(_load_pickle(meta_path), names_key, meta_path))
        if len(self.classes) != n_classes:
            raise DatasetError(f"{meta_path}: {names_key} has {len(self.classes)} names, expected {n_classes}")
        self.num_classes = n_classes

        data, labels = [], []
        for fname in self.files[self.split]:
            path = os.path.join(root, fname)
            batch = _load_pickle(path)
            x = np.asarray(_field(batch, "data", path), dtype=np.uint8)
            y = np.asarray(_field(batch, label_key, path), dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DatasetError(f"{path}: data {x.shape} / {label_key} ({len(y)},) should be (n, 3072) / (n,)")
            if len(y) and (y.min() < 0 or y.max() >= n_classes):
                raise DatasetError(f"{path}: {label_key} outside [0, {n_classes})")
            data.append(x)
            labels.append(y)
        self._data = torch.from_numpy(np.concatenate(data).reshape(-1, 3, 32, 32))  # (n, 3, 32, 32) uint8
        self._y = torch.from_numpy(np.concatenate(labels))  # (n,) int64
        self.augment = (self.split == "train") if augment is None else augment
        self.max_shift = max(1, self.img_size // 8)  # the classic pad-4 random crop at 32 px

    def __len__(self) -> int:
        return len(self._y)

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        return resize(self._data[index].float() / 255.0, self.img_size), int(self._y[index])

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return shift(x, *sample_shift(self.max_shift), fill=0.0)

    def labels(self) -> torch.Tensor:
        return self._y.clone()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole split without augmentation: ``X (n, 3, S, S)`` normalized float32 (4 bytes a value: CIFAR's 50000
        training images take 600 MB at 32 px), ``y (n,)`` int64."""
        return self.normalize(resize(self._data.float() / 255.0, self.img_size)), self._y.clone()


@register_dataset("cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: 10 classes, 50000 train / 10000 test images, 32 px RGB.

    Splits ``"train"`` and ``"test"`` (``"val"`` is an alias of ``"test"``: CIFAR has no separate validation set).
    Images are resized (bilinear) per item when ``img_size`` differs from 32. Normalization: the usual training-set
    statistics. Augmentation (train by default): random horizontal flip and a random translation by up to
    ``img_size // 8`` pixels (4 at 32 px) with black fill, i.e. the standard "pad 4 + random crop".

    Args:
        split: ``"train"``, ``"test"`` or ``"val"`` (= test).
        root: directory holding ``cifar-10-batches-py/`` (or that directory itself); default ``$RATELAB_DATA`` or
            ``./data``.
        img_size: output side, default 32.
        seed: unused (the splits are fixed).
        augment: ``None`` = on for train only.
    """

    name = "cifar10"
    dirname = "cifar-10-batches-py"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    meta_file = "batches.meta"
    default_mean, default_std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
    ) -> None:
        self._setup(split, root, img_size, augment, "labels", "label_names", 10)


@register_dataset("cifar100")
class Cifar100(_Cifar):
    """CIFAR-100: 100 fine classes (or 20 coarse superclasses), 50000 train / 10000 test images, 32 px RGB.

    Same splits, resizing and augmentation as :class:`Cifar10`.

    Args:
        split: ``"train"``, ``"test"`` or ``"val"`` (= test).
        root: directory holding ``cifar-100-python/`` (or that directory itself); default ``$RATELAB_DATA`` or
            ``./data``.
        img_size: output side, default 32.
        seed: unused.
        augment: ``None`` = on for train only.
        label_type: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """

    name = "cifar100"
    dirname = "cifar-100-python"
    files = {"train": ["train"], "test": ["test"]}
    meta_file = "meta"
    default_mean, default_std = CIFAR100_MEAN, CIFAR100_STD

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        label_type: str = "fine",
    ) -> None:
        if label_type not in ("fine", "coarse"):
            raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
        self.label_type = label_type
        n = 100 if label_type == "fine" else 20
        self._setup(split, root, img_size, augment, f"{label_type}_labels", f"{label_type}_label_names", n)
