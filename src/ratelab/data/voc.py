"""``voc``: PASCAL VOC semantic segmentation read from a VOCdevkit directory, for mIoU evaluation.

Layout (the official tarball's): ``VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
ImageSets/Segmentation/<split>.txt}``. ``root`` may be the ``VOCdevkit`` directory or the ``VOC2012`` one. Masks are
the palette PNGs of the devkit: the palette *index* is the class (0 background, 1..20 the classes), 255 marks the
object borders and "difficult" regions that evaluation ignores. An RGB-encoded mask (a palette PNG that some tool
re-saved as RGB) is mapped back through the VOC colour map; any other colour is an error naming the file.

Items are ``(image, mask)``: a normalized float32 ``(3, H, W)`` image and an int64 ``(H, W)`` mask with 255 =
ignore, unlike the ``(image, int)`` of the classification datasets.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data.common import ImageDataset, resolve_split
from ratelab.data.folder import IMAGENET_MEAN, IMAGENET_STD, check_image_header, load_image
from ratelab.data.registry import register_dataset

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
IGNORE_INDEX = 255
RESIZE_MODES = ("square", "shorter")


def voc_colormap(n: int = 256) -> np.ndarray:
    """The devkit's ``(n, 3)`` uint8 colour map (``VOCdevkit/VOCcode/VOClabelcolormap.m``): bits of the index
    spread over the high bits of R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


_CMAP = voc_colormap().astype(np.int64)
_PACKED_CMAP = (_CMAP[:, 0] << 16) | (_CMAP[:, 1] << 8) | _CMAP[:, 2]


def resize_pair(image, mask, img_size: int | None, mode: str):
    """PIL image (bilinear) and PIL mask (nearest, so no label is invented) resized together.

    ``mode="square"``: both to ``img_size x img_size`` (the aspect ratio is not kept, so a model sees the whole image
    at its construction size); ``"shorter"``: the shorter side to ``img_size``, aspect kept. ``None`` keeps the size.
    """
    from PIL import Image

    if img_size is None:
        return image, mask
    w, h = image.size
    if mode == "square":
        size = (img_size, img_size)
    else:
        s = img_size / min(w, h)
        size = (max(1, round(w * s)), max(1, round(h * s)))
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
        if mask is not None:
            mask = mask.resize(size, Image.NEAREST)
    return image, mask


def pil_to_tensor(im) -> torch.Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` in [0, 1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def read_id_list(path: str) -> list[str]:
    """Ids of an ``ImageSets`` list file, one a line (blank lines skipped); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DatasetNotFound(f"split list not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read split list {path}: {e}") from e
    if not ids:
        raise DatasetError(f"split list {path} is empty")
    return ids


@register_dataset("voc")
class VOCSegmentation(ImageDataset):
    """PASCAL VOC semantic segmentation (21 classes, background included; see the module docstring).

    Items: ``(image, mask)``, image normalized with ImageNet statistics, mask int64 with 255 = ignore.
    :meth:`validate` checks every image and mask header up front; a missing or unreadable file otherwise fails when
    read, with a :class:`~ratelab.core.errors.DatasetError` naming it.

    Augmentation (train by default): a random horizontal flip of image and mask together.

    Args:
        split: ``"train"``, ``"val"`` or ``"trainval"`` (the list files of ``ImageSets/Segmentation``).
        root: the ``VOCdevkit`` or ``VOC2012`` directory (required).
        img_size: output size (see ``resize``); ``None`` (default) keeps each image's own size, so items of a
            batch differ in size (evaluate one image at a time, or set ``img_size``).
        seed: unused (the splits are the devkit's).
        augment: ``None`` = on for train only.
        year: devkit sub-directory ``VOC<year>`` looked for under ``root``.
        resize: ``"square"`` (default; ``img_size x img_size``) or ``"shorter"`` (shorter side, aspect kept).
    """

    name = "voc"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        year: str = "2012",
        resize: str = "square",
    ) -> None:
        if root is None:
            raise DatasetError("dataset 'voc' needs root= (a VOCdevkit directory)")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetNotFound(f"voc root directory not found: {root}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        sub = os.path.join(root, f"VOC{year}")
        self.root = sub if os.path.isdir(sub) else root
        self.split = resolve_split(self.name, split, ("train", "val", "trainval"))
        for d in ("JPEGImages", "SegmentationClass"):
            if not os.path.isdir(os.path.join(self.root, d)):
                raise DatasetNotFound(f"voc directory not found: {os.path.join(self.root, d)} (root={root})")
        self.ids = read_id_list(os.path.join(self.root, "ImageSets", "Segmentation", f"{self.split}.txt"))
        self.img_size, self.resize, self.in_chans = img_size, resize, 3
        self.classes, self.num_classes, self.ignore_index = list(VOC_CLASSES), len(VOC_CLASSES), IGNORE_INDEX
        self._set_norm(IMAGENET_MEAN, IMAGENET_STD)
        self.augment = (self.split == "train") if augment is None else augment

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> str:
        return os.path.join(self.root, "JPEGImages", f"{self.ids[self._check_index(index)]}.jpg")

    def mask_path(self, index: int) -> str:
        return os.path.join(self.root, "SegmentationClass", f"{self.ids[self._check_index(index)]}.png")

    def validate(self, *, max_listed: int = 10) -> None:
        """Check every image and mask header (no decoding), so a bad file fails before a long evaluation.

        Raises:
            DatasetError: naming every bad file (the first ``max_listed``) and what is wrong with it.
        """
        paths = [p for i in range(len(self)) for p in (self.image_path(i), self.mask_path(i))]
        bad = [(p, why) for p in paths if (why := check_image_header(p)) is not None]
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad[:max_listed])
            more = f"; and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
            raise DatasetError(f"voc {self.root} ({self.split}): {len(bad)} of {len(paths)} files cannot be read: "
                               f"{listed}{more}")

    def _read_mask(self, path: str):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("P", "L"):
                    return im.copy() if im.mode == "L" else Image.fromarray(np.asarray(im, dtype=np.uint8), "L")
                rgb = np.asarray(im.convert("RGB"))
        except FileNotFoundError as e:
            raise DatasetNotFound(f"mask file not found: {path}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read mask file {path}: {e}") from e
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        colours, inverse = np.unique(packed, return_inverse=True)
        known = {**{c: i for i, c in enumerate(_PACKED_CMAP[: self.num_classes].tolist())},
                 int(_PACKED_CMAP[IGNORE_INDEX]): IGNORE_INDEX}
        unknown = [c for c in colours.tolist() if c not in known]
        if unknown:
            c = unknown[0]
            raise DatasetError(f"mask file {path} has colours that are not VOC classes (e.g. RGB "
                               f"{(c >> 16, (c >> 8) & 255, c & 255)})")
        idx = np.array([known[c] for c in colours.tolist()], dtype=np.uint8)[inverse].reshape(packed.shape)
        return Image.fromarray(idx, "L")

    def _pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = load_image(self.image_path(index), "RGB")
        mask = self._read_mask(self.mask_path(index))
        if image.size != mask.size:
            raise DatasetError(f"mask {self.mask_path(index)} is {mask.size[0]}x{mask.size[1]} but image "
                               f"{self.image_path(index)} is {image.size[0]}x{image.size[1]}")
        image, mask = resize_pair(image, mask, self.img_size, self.resize)
        return pil_to_tensor(image), torch.from_numpy(np.array(mask, dtype=np.int64))

    def _raw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pair(self._check_index(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, m = self._pair(self._check_index(index))
        if self.augment and torch.rand(()) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        return self.normalize(x), m

    def labels(self) -> torch.Tensor:
        raise NotImplementedError("voc items carry masks, not labels; read the mask of each item")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole split without augmentation, stacked (needs ``img_size`` with ``resize="square"``)."""
        if self.img_size is None or self.resize != "square":
            raise DatasetError("voc tensors() needs img_size= and resize='square' (images differ in size)")
        xs, ms = zip(*(self._raw(i) for i in range(len(self))))
        return self.normalize(torch.stack(xs)), torch.stack(ms)
