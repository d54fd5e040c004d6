"""Shared pieces of the datasets: the base class, split handling, stratified partitions and cheap augmentations.

Augmentations draw from torch's global RNG (never numpy / ``random``) so that ``torch.manual_seed`` or a restored
``torch.get_rng_state()`` replays them exactly; DataLoader workers get their own torch seeds derived from the
loader's generator, so multi-worker loading is reproducible too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ratelab.core.errors import DatasetError


def resolve_split(dataset: str, split: str, valid: Sequence[str], aliases: dict[str, str] | None = None, *,
                  note: str | None = None) -> str:
    """Canonical split name, or a DatasetError listing the valid ones (and ``note``, e.g. why a split is absent)."""
    aliases = aliases or {}
    if split in valid:
        return split
    if split in aliases:
        return aliases[split]
    names = list(valid) + [f"{a} (= {c})" for a, c in aliases.items()]
    raise DatasetError(f"dataset {dataset!r} has no split {split!r}; valid splits: {', '.join(names)}"
                       + (f" ({note})" if note else ""))


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified partition of ``range(len(labels))`` into (train, val) index tensors.

    Each class contributes ``round(n_c * val_fraction)`` items to val (at least one when it has two or more items
    and ``val_fraction > 0``). Both index tensors are sorted. Depends only on ``labels``, ``val_fraction`` and
    ``seed``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def sample_shift(max_shift: int) -> tuple[int, int]:
    """Random (dy, dx), each uniform in ``[-max_shift, max_shift]``, from torch's global RNG."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    return dy, dx


def shift(x: torch.Tensor, dy: int, dx: int, *, mode: str = "constant", fill: float = 0.0) -> torch.Tensor:
    """Translate the last two dims of ``x`` by (dy, dx) pixels, keeping the size.

    Equivalent to a crop of the padded image (the classic "pad + random crop"). ``mode`` is ``"constant"``
    (uncovered pixels get ``fill``) or ``"replicate"`` (edge pixels repeat). Shape ``(..., H, W)`` is preserved.
    """
    if dy == 0 and dx == 0:
        return x
    H, W = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    if mode == "constant":
        xp = F.pad(x, (p, p, p, p), mode="constant", value=fill)
    else:
        # replicate padding needs a float batch-like input; masks are never shifted this way
        xp = F.pad(x.unsqueeze(0), (p, p, p, p), mode=mode).squeeze(0)
    return xp[..., p - dy : p - dy + H, p - dx : p - dx + W]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(..., C, H, W)`` float images to ``(..., C, size, size)`` (antialias when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    lead = x.shape[:-3]
    x4 = x.reshape(-1, *x.shape[-3:])
    shrink = size < max(x.shape[-2:])
    out = F.interpolate(x4, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return out.reshape(*lead, *out.shape[-3:])


def validate_dataset(dataset: Dataset | None) -> None:
    """Run the cheap up-front check of a file-backed dataset (``dataset.validate()``), if it has one.

    Views that wrap a dataset (``torch.utils.data.Subset``, :class:`ratelab.data.noise.RelabeledDataset`, the
    trainer's item views) are looked through via their ``dataset`` / ``base`` attribute. In-memory and synthetic
    datasets have nothing to check; CIFAR reads its pickles at construction, so its errors come then.

    Raises:
        DatasetError: from the dataset's check, naming the bad files.
    """
    seen: set[int] = set()
    while dataset is not None and id(dataset) not in seen:
        seen.add(id(dataset))
        check = getattr(dataset, "validate", None)
        if callable(check):
            check()
            return
        inner = getattr(dataset, "dataset", None)
        dataset = inner if inner is not None else getattr(dataset, "base", None)


class ImageDataset(Dataset):
    """Base class: subclasses fill the attributes and implement ``_raw`` (and ``_augment``).

    Attributes:
        name: registry name.
        split: canonical split name.
        num_classes, in_chans, img_size: label count, channels, side length of the (square) output.
        classes: class names, ``classes[label]``.
        mean, std: per-channel normalization applied to ``[0, 1]`` images (tuples of length ``in_chans``).
        augment: whether ``__getitem__`` applies the training augmentation.
    """

    name: str = ""
    split: str
    num_classes: int
    in_chans: int
    img_size: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    def _set_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            raise ValueError(f"mean/std must have {self.in_chans} entries, got mean={mean!r} std={std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std entries must be positive, got {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` in [0, 1] -> ``(x - mean) / std``."""
        return (x - self._mean_t) / self._std_t

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (for visualisation)."""
        return x * self._std_t + self._mean_t

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        """Un-augmented image in [0, 1], float32 ``(C, H, W)``, and its label."""
        raise NotImplementedError

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} {self.split} split of size {n}")
        return index % n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self._raw(self._check_index(index))
        if self.augment:
            x = self._augment(x)
        return self.normalize(x), y

    def labels(self) -> torch.Tensor:
        """All labels of the split, int64 ``(n,)``."""
        return torch.tensor([self._raw(i)[1] for i in range(len(self))], dtype=torch.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole split without augmentation: normalized ``X (n, C, H, W)`` float32 and ``y (n,)`` int64."""
        xs, ys = zip(*(self._raw(i) for i in range(len(self)))) if len(self) else ((), ())
        X = torch.stack(xs) if xs else torch.empty(0, self.in_chans, self.img_size, self.img_size)
        return self.normalize(X), torch.tensor(ys, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"num_classes={self.num_classes}, in_chans={self.in_chans}, img_size={self.img_size}, "
            f"augment={self.augment})"
        )
