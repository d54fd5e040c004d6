"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), kept in memory.

No download: the data ships with scikit-learn. Images (pixel values 0..16) are scaled to [0, 1] and resized once,
at construction, with bilinear interpolation to ``img_size`` (default 16, the size of ``crate_nano_patch4_16``).
"""

from __future__ import annotations

import torch

from ratelab.data.common import ImageDataset, resize, resolve_split, sample_shift, shift, stratified_split
from ratelab.data.registry import register_dataset


@register_dataset("digits")
class Digits(ImageDataset):
    """Handwritten digits 0-9, one gray channel.

    Splits: ``"train"`` and ``"val"``, a stratified partition fixed by ``seed`` (``val_fraction`` of each class in
    val, default 0.2). The data has no held-out test set, and ``"test"`` is an error: evaluating val under the name
    "test" would report a number that model selection has already seen as a test result.

    Normalization: mean/std of all 1797 images at the chosen ``img_size`` (independent of ``seed`` and split, so
    every split and seed shares one normalization).

    Augmentation (train by default): a random translation of up to ``max(1, img_size // 8)`` pixels (2 at 16 px)
    in each direction, uncovered pixels black (the digits' background).

    Args:
        split: ``"train"`` or ``"val"``.
        root: ignored (the data ships with scikit-learn).
        img_size: output side, default 16.
        seed: fixes the train/val partition.
        augment: ``None`` = on for train only.
        val_fraction: share of each class held out for val.
    """

    name = "digits"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        val_fraction: float = 0.2,
    ) -> None:
        from sklearn.datasets import load_digits  # lazy: keeps `import ratelab.data` cheap

        self.split = resolve_split(
            self.name, split, ("train", "val"),
            note="its 1797 images are partitioned into train and val only; there is no held-out test split",
        )
        self.img_size = img_size or 16
        self.in_chans, self.num_classes = 1, 10
        self.classes = [str(d) for d in range(10)]
        self.augment = (self.split == "train") if augment is None else augment
        self.max_shift = max(1, self.img_size // 8)

        bunch = load_digits()
        X = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
        X = resize(X, self.img_size).clamp_(0.0, 1.0)  # clamp: bilinear can't overshoot, antialias can slightly
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
        self._set_norm((X.mean().item(),), (X.std().item(),))

        train_idx, val_idx = stratified_split(y, val_fraction, seed)
        self.indices = train_idx if self.split == "train" else val_idx  # positions in the full 1797-image set
        self._X = X[self.indices].contiguous()  # (n, 1, S, S), un-normalized [0, 1]
        self._y = y[self.indices].contiguous()  # (n,)

    def __len__(self) -> int:
        return len(self._y)

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        return self._X[index], int(self._y[index])

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return shift(x, *sample_shift(self.max_shift), fill=0.0)

    def labels(self) -> torch.Tensor:
        return self._y.clone()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole split without augmentation: ``X (n, 1, S, S)`` normalized float32, ``y (n,)`` int64."""
        return self.normalize(self._X), self._y.clone()
