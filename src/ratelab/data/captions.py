"""Image-caption pairs: synthetic shapes, a folder of images with captions, WebDataset tar shards.

Every dataset here yields ``(image, caption)``: a normalized float32 ``(C, H, W)`` tensor and a ``str``;
:class:`TokenizedCaptions` turns the caption into a fixed-length id tensor for training (``(image, ids (L,))``).

* ``shapes_captions`` -- the ``shapes`` generator's scenes with their captions ("a large red circle in the top
  left"); :meth:`ShapesCaptions.attribute_labels` gives the main object's shape, colour and position as labels for
  linear probes and zero-shot evaluation; :meth:`ShapesCaptions.public_vocabulary_text` the generator's own word
  list (public: fixed by code), which the ``caption`` task builds its vocabulary from.
* ``caption_folder`` -- images with captions from a sidecar ``<stem>.txt`` next to each image, or from an index file
  (``index=``: a CSV with columns ``image,caption`` or a JSONL with keys ``image`` and ``caption``; image paths
  relative to ``root``).
* ``caption_wds`` -- WebDataset tar shards (LAION's format: ``<key>.jpg`` / ``.png`` / ``.webp`` with ``<key>.txt``),
  read through the ``webdataset`` package. Map-style: the shards are scanned once at construction and the
  (still encoded) samples kept in memory, so DP-SGD's Poisson sampling can draw any index -- meant for the shard
  sizes a CPU run trains on, not for LAION-233M (streaming shards cannot be Poisson-sampled).

A missing or unreadable image or caption raises :class:`~ratelab.core.errors.DatasetError` (or ``DatasetNotFound``)
naming the file (and line, or shard and key). Images are converted to RGB, resized on the shorter side and centre
cropped to ``img_size``, normalized with ImageNet statistics. Augmentation (train by default): a random translation
by up to ``img_size // 16`` pixels; no flips, because captions say left and right.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data.common import resolve_split, sample_shift, shift
from ratelab.data.folder import IMAGENET_MEAN, IMAGENET_STD, is_image_file, load_image, resize_center_crop
from ratelab.data.registry import register_dataset
from ratelab.data.shapes import COLORS, SHAPES, SIZE_BANDS, ShapeObject, Shapes

__all__ = ["ATTRIBUTES", "POSITIONS", "CaptionFolder", "CaptionShards", "ShapesCaptions", "TokenizedCaptions",
           "shapes_vocabulary_text"]

POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS}
_WDS_IMAGE_EXT = ("jpg", "jpeg", "png", "webp")


class _CaptionBase(Dataset):
    """Normalization, augmentation and ``(image, caption)`` items shared by the caption datasets."""

    in_chans = 3
    split: str
    img_size: int
    augment: bool

    def _setup_norm(self) -> None:
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)
        self.max_shift = max(1, self.img_size // 16)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._std.to(x.device) + self._mean.to(x.device)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment:
            x = shift(x, *sample_shift(self.max_shift), mode="replicate")
        return self.normalize(x)

    def _to_tensor(self, im: Any) -> torch.Tensor:
        return resize_center_crop(im, self.img_size)

    def captions(self) -> list[str]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- shapes_captions
def shapes_vocabulary_text() -> list[str]:
    """Every phrase the ``shapes`` generator can write (each size, colour, shape and position through
    :meth:`ShapeObject.phrase`), and one caption joining three of them as :meth:`Shapes.caption` does.

    Public: a function of the generator's code alone, not of any drawn scene, so a vocabulary built from it says
    nothing about the training captions (what DP training needs, see ``ratelab.train.caption_task``).
    """
    phrases = [ShapeObject(shape, k, color, COLORS[color], size, 0.0, (0.0, 0.0), where).phrase()
               for k, shape in enumerate(SHAPES) for color in COLORS for size in SIZE_BANDS for where in POSITIONS]
    return [*phrases, f"{phrases[0]}, {phrases[1]} and {phrases[2]}"]


@register_dataset("shapes_captions")
class ShapesCaptions(_CaptionBase):
    """The ``shapes`` scenes with their captions: items ``(image, caption)``.

    Same options and content as ``shapes`` (the image of index i is the same scene). Augmentation is the ``shapes``
    one (a shift of up to 2 px at 32 px), so the caption's position word stays true up to the shift.

    Args:
        split, root, img_size, seed, augment, size, max_objects: as :class:`ratelab.data.shapes.Shapes`.
    """

    name = "shapes_captions"

    def __init__(self, split: str, *, root: str | None = None, img_size: int | None = None, seed: int = 0,
                 augment: bool | None = None, size: int | None = None, max_objects: int = 1) -> None:
        self.shapes = Shapes(split, img_size=img_size, seed=seed, augment=augment, size=size,
                             max_objects=max_objects)
        self.split, self.img_size, self.augment = self.shapes.split, self.shapes.img_size, self.shapes.augment
        self.mean, self.std = self.shapes.mean, self.shapes.std
        self.classes, self.num_classes = self.shapes.classes, self.shapes.num_classes

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.shapes[index][0], self.shapes.caption(index)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.shapes.normalize(x)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.shapes.denormalize(x)

    def captions(self) -> list[str]:
        return [self.shapes.caption(i) for i in range(len(self))]

    def public_vocabulary_text(self) -> list[str]:
        """Text whose vocabulary covers every caption this dataset can hold, fixed by code (public):
        :func:`shapes_vocabulary_text`."""
        return shapes_vocabulary_text()

    def attribute_labels(self, attribute: str) -> torch.Tensor:
        """(n,) int64 labels of the main object's ``"shape"``, ``"color"`` or ``"position"`` (indices into
        ``ATTRIBUTES[attribute]``), from the un-augmented scenes."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {sorted(ATTRIBUTES)}, got {attribute!r}")
        names = ATTRIBUTES[attribute]
        key = {"shape": "shape", "color": "color", "position": "position"}[attribute]
        return torch.tensor([names.index(getattr(self.shapes.objects(i)[0], key)) for i in range(len(self))],
                            dtype=torch.int64)


# ---------------------------------------------------------------------------------------------- caption_folder
def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except FileNotFoundError as e:
        raise DatasetNotFound(f"caption file not found: {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read caption file {path}: {e}") from e
    if not text:
        raise DatasetError(f"caption file {path} is empty")
    return text


def _read_index(path: str, root: str) -> list[tuple[str, str]]:
    """``(image path, caption)`` rows of a CSV (``image,caption`` header) or JSONL index; errors name file:line."""
    if not os.path.isfile(path):
        raise DatasetNotFound(f"caption index file not found: {path}")
    rows: list[tuple[str, str]] = []
    if path.lower().endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
                    raise DatasetError(f"{path}:{n}: each line needs the keys 'image' and 'caption'")
                rows.append((str(rec["image"]), str(rec["caption"])))
    elif path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image", "caption"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: the CSV header must name the columns 'image' and 'caption', got "
                                   f"{reader.fieldnames}")
            for rec in reader:
                n = reader.line_num
                if not rec.get("image") or rec.get("caption") is None:
                    raise DatasetError(f"{path}:{n}: empty 'image' or 'caption'")
                rows.append((rec["image"], rec["caption"]))
    else:
        raise DatasetError(f"caption index {path}: expected a .csv or .jsonl file")
    out = []
    for n, (img, cap) in enumerate(rows, 1):
        if not cap.strip():
            raise DatasetError(f"{path}: row {n} ({img}) has an empty caption")
        out.append((img if os.path.isabs(img) else os.path.join(root, img), cap.strip()))
    return out


def _partition(n: int, split: str, val_fraction: float, seed: int) -> list[int]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction) if n > 1 else 0
    return sorted(perm[:n_val] if split == "val" else perm[n_val:])


@register_dataset("caption_folder")
class CaptionFolder(_CaptionBase):
    """Images with captions under ``root``: sidecar ``<stem>.txt`` files, or an ``index`` CSV/JSONL.

    Splits: ``root/<split>/`` when such directories exist (each scanned for images with sidecars), else
    ``"train"`` / ``"val"`` as a random partition of everything fixed by ``seed`` (``val_fraction``). With an index
    file the partition rule applies to its rows.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (the last only with split directories).
        root: the directory (required); index image paths are relative to it.
        img_size: output side, default 224.
        seed, augment: partition seed; ``None`` = augmentation on for train only.
        index: a ``.csv`` / ``.jsonl`` file (relative to ``root`` or absolute) instead of sidecar captions.
        val_fraction: share of items in val when there are no split directories.
    """

    name = "caption_folder"

    def __init__(self, split: str, *, root: str | None = None, img_size: int | None = None, seed: int = 0,
                 augment: bool | None = None, index: str | None = None, val_fraction: float = 0.2) -> None:
        if root is None:
            raise DatasetError("dataset 'caption_folder' needs root= (a directory of images with captions)")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetNotFound(f"caption_folder root directory not found: {root}")
        self.root, self.img_size = root, img_size or 224
        if index is not None:
            path = index if os.path.isabs(index) else os.path.join(root, index)
            self.split = resolve_split(self.name, split, ("train", "val"))
            rows = _read_index(path, root)
            self.samples = [rows[i] for i in _partition(len(rows), self.split, val_fraction, seed)]
        else:
            present = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
            if present:
                self.split = resolve_split(self.name, split, present)
                self.samples = self._scan(os.path.join(root, self.split))
            else:
                self.split = resolve_split(self.name, split, ("train", "val"))
                found = self._scan(root)
                self.samples = [found[i] for i in _partition(len(found), self.split, val_fraction, seed)]
        if not self.samples:
            raise DatasetError(f"caption_folder {root}: no image-caption pairs for split {self.split!r}")
        self.augment = (self.split == "train") if augment is None else augment
        self._setup_norm()

    @staticmethod
    def _scan(folder: str) -> list[tuple[str, str]]:
        """Images under ``folder`` (recursive, sorted), each with the text of its sidecar ``.txt``."""
        out = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if is_image_file(f):
                    img = os.path.join(dirpath, f)
                    txt = os.path.splitext(img)[0] + ".txt"
                    if not os.path.isfile(txt):
                        raise DatasetError(f"image {img} has no caption file {txt} (give every image a sidecar "
                                           "caption, or an index= CSV/JSONL)")
                    out.append((img, _read_text(txt)))
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.samples[index]
        return self._finish(self._to_tensor(load_image(path, "RGB"))), caption

    def captions(self) -> list[str]:
        return [c for _, c in self.samples]


# ---------------------------------------------------------------------------------------------- caption_wds
def _shard_urls(root: str) -> list[str]:
    import glob

    if os.path.isdir(root):
        urls = sorted(glob.glob(os.path.join(root, "*.tar")))
    elif any(c in root for c in "{*?["):
        from braceexpand import braceexpand

        urls = sorted({u for pat in braceexpand(root) for u in glob.glob(pat)})
    else:
        urls = [root]
    missing = [u for u in urls if not os.path.isfile(u)]
    if not urls or missing:
        raise DatasetNotFound(f"caption_wds: no tar shards at {root}" + (f" (missing: {missing})" if missing else ""))
    return urls


@register_dataset("caption_wds")
class CaptionShards(_CaptionBase):
    """WebDataset tar shards of image-caption pairs (``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``).

    Args:
        split: ``"train"`` or ``"val"``: a random partition of all samples fixed by ``seed`` (``val_fraction``).
        root: a directory of ``*.tar`` shards, one shard, or a brace/glob pattern (``shards/{000..009}.tar``).
        img_size, seed, augment: as the other caption datasets (default 224).
        val_fraction: share of samples in val (0 puts everything in train).
    """

    name = "caption_wds"

    def __init__(self, split: str, *, root: str | None = None, img_size: int | None = None, seed: int = 0,
                 augment: bool | None = None, val_fraction: float = 0.0) -> None:
        import webdataset as wds

        if root is None:
            raise DatasetError("dataset 'caption_wds' needs root= (tar shards: a directory, a file or a pattern)")
        self.split = resolve_split(self.name, split, ("train", "val"))
        self.root, self.img_size = os.fspath(root), img_size or 224
        samples: list[tuple[str, str, str, bytes, str]] = []  # (shard, key, ext, image bytes, caption)
        for url in _shard_urls(self.root):
            try:
                stream = wds.WebDataset(url, shardshuffle=False, empty_check=False)
                for s in stream:
                    samples.append(self._sample(url, s))
            except DatasetError:
                raise
            except Exception as e:  # a corrupt tar: webdataset/tarfile raise assorted errors
                raise DatasetError(f"caption_wds: cannot read shard {url}: {e}") from e
        if not samples:
            raise DatasetError(f"caption_wds: the shards at {self.root} hold no samples")
        self.samples = [samples[i] for i in _partition(len(samples), self.split, val_fraction, seed)]
        if not self.samples:
            raise DatasetError(f"caption_wds {self.root}: no samples in split {self.split!r}")
        self.augment = (self.split == "train") if augment is None else augment
        self._setup_norm()

    @staticmethod
    def _sample(url: str, s: dict[str, Any]) -> tuple[str, str, str, bytes, str]:
        key = s.get("__key__", "?")
        ext = next((e for e in _WDS_IMAGE_EXT if e in s), None)
        if ext is None:
            raise DatasetError(f"caption_wds: sample {key!r} in shard {url} has no image ({', '.join(_WDS_IMAGE_EXT)}"
                               f"); it has {sorted(k for k in s if not k.startswith('__'))}")
        if "txt" not in s:
            raise DatasetError(f"caption_wds: sample {key!r} in shard {url} has no caption ({key}.txt)")
        try:
            caption = s["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DatasetError(f"caption_wds: caption {key}.txt in shard {url} is not UTF-8: {e}") from e
        if not caption:
            raise DatasetError(f"caption_wds: caption {key}.txt in shard {url} is empty")
        return url, key, ext, bytes(s[ext]), caption

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image, UnidentifiedImageError

        url, key, ext, data, caption = self.samples[index]
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"caption_wds: cannot decode image {key}.{ext} in shard {url}: {e}") from e
        return self._finish(self._to_tensor(im)), caption

    def captions(self) -> list[str]:
        return [s[4] for s in self.samples]


# ---------------------------------------------------------------------------------------------- tokenized
class TokenizedCaptions(Dataset):
    """``(image, caption)`` items -> ``(image, ids)``: ids (max_len,) int64, ``[BOS] .. [EOS]`` then padding.

    Args:
        dataset: a caption dataset.
        tokenizer: a :class:`ratelab.data.text_tokenizer.CaptionTokenizer`.
        max_len: caption length after padding / truncation (DP-Cap's command: 40).
    """

    def __init__(self, dataset: Dataset, tokenizer: Any, max_len: int) -> None:
        self.dataset, self.tokenizer, self.max_len = dataset, tokenizer, int(max_len)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, caption = self.dataset[index][:2]
        return image, self.tokenizer.encode(caption, self.max_len)[0]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

