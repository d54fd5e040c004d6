"""``imagefolder``: images in class sub-directories, loaded lazily with PIL.

Layouts (checked in this order):

* split layout: ``root/<split>/<class>/<image>`` with ``<split>`` among ``train``, ``val``, ``test``; the splits are
  the sub-directories present.
* flat layout: ``root/<class>/<image>`` when ``root`` has none of those split directories; ``"train"`` / ``"val"``
  are then a stratified partition fixed by ``seed`` (``val_fraction``, default 0.2), like ``digits``.

Classes are the sorted union of class directory names over all splits, so a label means the same class in every
split even when one split lacks a class. Image files are those with a known extension (case-insensitive); hidden
files and other files are ignored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data.common import ImageDataset, resolve_split, sample_shift, shift, stratified_split
from ratelab.data.registry import register_dataset

if TYPE_CHECKING:
    from PIL import Image

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
SPLIT_DIRS = ("train", "val", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_image_file(name: str) -> bool:
    """Whether a file name is one of the image types imagefolder reads (hidden files excluded)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan(folder: str, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Image paths under ``folder/<class>/`` (sorted, recursive) and their labels."""
    paths, labels = [], []
    for label, cls in enumerate(classes):
        d = os.path.join(folder, cls)
        if not os.path.isdir(d):
            continue
        for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if is_image_file(f):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return paths, labels


def load_image(path: str, mode: str) -> Image.Image:
    """Open ``path`` fully with PIL in ``mode`` ("RGB" or "L"); errors name the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)  # convert() forces a full decode, so truncated files fail here
    except FileNotFoundError as e:
        raise DatasetNotFound(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image file {path}: {e}") from e


def resize_center_crop(im: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> float32 ``(C, size, size)`` in [0, 1]: shorter side resized to ``size`` (bilinear), then the
    center crop (the evaluation transform of ImageNet-style pipelines)."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    a = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3) or (H, W)
    return torch.from_numpy(a.reshape(size, size, -1)).permute(2, 0, 1).contiguous()


def check_image_header(path: str) -> str | None:
    """Why ``path`` is not a readable image, from its header alone, or ``None`` when it looks fine.

    Reads the header (format, size) and runs PIL's ``verify``, which checks the chunk structure and checksums of a
    PNG without decoding pixels and is a no-op for JPEG; a truncated JPEG is only found when it is decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        return str(e) or type(e).__name__
    if w <= 0 or h <= 0:
        return f"image size {w}x{h}"
    return None


@register_dataset("imagefolder")
class ImageFolder(ImageDataset):
    """Images from ``root`` (see the module docstring for the layouts).

    Preprocessing: convert to RGB (``in_chans=3``) or gray (``in_chans=1``), resize the shorter side to ``img_size``
    (bilinear) and centre-crop a square; default ``img_size`` 224, the resolution of the ``crate_*_224`` models.
    Normalization: ``mean``/``std`` options, default ImageNet statistics (their channel average for gray).

    Augmentation (train by default): random horizontal flip, then a random translation by up to ``img_size // 16``
    pixels (at least 1) with black fill.

    Args:
        split: a split directory present under ``root`` (split layout) or ``"train"`` / ``"val"`` (flat layout).
        root: the dataset directory (required).
        img_size: output side, default 224.
        seed: fixes the flat-layout partition.
        augment: ``None`` = on for train only.
        in_chans: 3 (RGB) or 1 (gray).
        mean, std: normalization per channel.
        val_fraction: flat layout only: share of each class in val.
    """

    name = "imagefolder"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        in_chans: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        val_fraction: float = 0.2,
    ) -> None:
        if root is None:
            raise DatasetError("dataset 'imagefolder' needs root= (a directory of class folders)")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetNotFound(f"imagefolder root directory not found: {root}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans!r}")
        self.root, self.in_chans, self.img_size = root, in_chans, img_size or 224
        self._mode = "RGB" if in_chans == 3 else "L"
        gray = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else gray
        self._set_norm(mean if mean is not None else default_mean, std if std is not None else default_std)

        present = [s for s in SPLIT_DIRS if os.path.isdir(os.path.join(root, s))]
        if present:
            self.layout = "split"
            self.split = resolve_split(self.name, split, present)
            self.classes = sorted({c for s in present for c in _class_dirs(os.path.join(root, s))})
            folder = os.path.join(root, self.split)
            paths, labels = _scan(folder, self.classes)
        else:
            self.layout = "flat"
            self.split = resolve_split(self.name, split, ("train", "val"))
            self.classes = _class_dirs(root)
            folder = root
            paths, labels = _scan(root, self.classes)
            if paths:
                tr, va = stratified_split(torch.tensor(labels), val_fraction, seed)
                keep = (tr if self.split == "train" else va).tolist()
                paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if not self.classes:
            raise DatasetError(f"no class sub-directories in {folder}")
        if not paths:
            raise DatasetError(
                f"no image files ({', '.join(IMG_EXTENSIONS)}) found under {folder} for split {self.split!r}"
            )
        self.samples = list(zip(paths, labels))
        self.num_classes = len(self.classes)
        self.augment = (self.split == "train") if augment is None else augment
        self.max_shift = max(1, self.img_size // 16)

    def __len__(self) -> int:
        return len(self.samples)

    def validate(self, *, max_listed: int = 10) -> None:
        """Check every image file's header, so that a bad file fails before training instead of mid-run.

        Cheap: the header of each file is parsed (and a PNG's chunk checksums read), no image is decoded: about
        25 us a file from a warm local disk, a tenth of decoding it. (Threads were slower there: the parsing holds
        the GIL.) A file that passes can still fail when decoded (a truncated JPEG); the trainer then writes an
        emergency checkpoint.

        Raises:
            DatasetError: naming every bad file (the first ``max_listed``) and what is wrong with it.
        """
        paths = [p for p, _ in self.samples]
        problems = [check_image_header(p) for p in paths]
        bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad[:max_listed])
            more = f"; and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
            raise DatasetError(
                f"imagefolder {self.root} ({self.split}): {len(bad)} of {len(paths)} image files cannot be read: "
                f"{listed}{more}. Remove or replace them (validate_data=False / --no-validate-data skips this check)"
            )

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return resize_center_crop(load_image(path, self._mode), self.img_size), label

    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.samples], dtype=torch.int64)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return shift(x, *sample_shift(self.max_shift), fill=0.0)
