"""``coco``: images of a COCO-format instance annotation file, for class-agnostic detection / instance evaluation.

Default layout (the official one): ``root/val2017/<file_name>`` and ``root/annotations/instances_val2017.json``
(``split="train"`` reads ``train2017``); ``ann_file=`` and ``image_dir=`` point anywhere else, e.g. at a small
COCO-format file of one's own. Items are ``(image, image_id)`` (a normalized float32 ``(3, H, W)`` image and the
``int`` id of the json), the input of a predictor whose outputs go to
:func:`ratelab.eval.coco.coco_box_mask_ap` together with :attr:`CocoImages.coco_json`. Ground truth, class-agnostic,
in the original image's pixels: :meth:`CocoImages.annotations` (boxes always; masks decoded with ``pycocotools``,
which is imported only then).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data.common import ImageDataset, resolve_split
from ratelab.data.folder import IMAGENET_MEAN, IMAGENET_STD, check_image_header, load_image
from ratelab.data.registry import register_dataset
from ratelab.data.voc import RESIZE_MODES, pil_to_tensor, resize_pair


def read_coco_json(path: str) -> dict[str, Any]:
    """Parse and check the top level of a COCO instances file; errors name the file, line, key or entry."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetNotFound(f"COCO annotation file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"COCO annotation file {path} is not valid JSON: line {e.lineno} column {e.colno}: "
                           f"{e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read COCO annotation file {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"COCO annotation file {path} has no 'images' list")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"COCO annotation file {path}: 'annotations' must be a list")
    for k, im in enumerate(data["images"]):
        missing = [key for key in ("id", "file_name", "height", "width") if not isinstance(im, dict) or key not in im]
        if missing:
            raise DatasetError(f"COCO annotation file {path}: images[{k}] lacks {', '.join(missing)}")
    for k, a in enumerate(anns):
        missing = [key for key in ("image_id", "bbox") if not isinstance(a, dict) or key not in a]
        if missing:
            raise DatasetError(f"COCO annotation file {path}: annotations[{k}] lacks {', '.join(missing)}")
    return data


def _mask_api():
    try:
        from pycocotools import mask as mask_util
    except ImportError as e:
        raise ImportError("decoding COCO masks needs pycocotools: pip install pycocotools") from e
    return mask_util


@register_dataset("coco")
class CocoImages(ImageDataset):
    """Images of a COCO instances file, in the file's order (see the module docstring).

    Args:
        split: ``"val"`` (default layout ``val2017``) or ``"train"`` (``train2017``).
        root: the COCO directory (needed unless both ``ann_file`` and ``image_dir`` are given).
        img_size: output size (see ``resize``); ``None`` (default) keeps each image's own size. Predictions for
            :func:`ratelab.eval.coco.coco_box_mask_ap` must be mapped back to :meth:`original_size`.
        seed: unused.
        augment: must stay off (evaluation data); ``None`` = off.
        ann_file: the instances json (default ``root/annotations/instances_<split>2017.json``).
        image_dir: the images directory (default ``root/<split>2017``).
        resize: ``"square"`` or ``"shorter"`` (as ``voc``).

    Attributes:
        coco_json: path of the instances json.
        image_ids: the json's image ids, item order.
    """

    name = "coco"

    def __init__(
        self,
        split: str,
        *,
        root: str | None = None,
        img_size: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        ann_file: str | None = None,
        image_dir: str | None = None,
        resize: str = "square",
    ) -> None:
        self.split = resolve_split(self.name, split, ("train", "val"))
        if augment:
            raise DatasetError("dataset 'coco' is for evaluation; augment=True is not supported")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if root is None and (ann_file is None or image_dir is None):
            raise DatasetError("dataset 'coco' needs root= (a COCO directory) or both ann_file= and image_dir=")
        if root is not None and not os.path.isdir(root):
            raise DatasetNotFound(f"coco root directory not found: {root}")
        tag = f"{self.split}2017"
        self.coco_json = os.fspath(ann_file or os.path.join(root, "annotations", f"instances_{tag}.json"))
        self.image_dir = os.fspath(image_dir or os.path.join(root, tag))
        if not os.path.isdir(self.image_dir):
            raise DatasetNotFound(f"coco image directory not found: {self.image_dir}")
        data = read_coco_json(self.coco_json)
        self._images: list[dict[str, Any]] = data["images"]
        self.image_ids = [int(im["id"]) for im in self._images]
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self.image_ids}
        for a in data.get("annotations", []):
            if a["image_id"] not in self._anns:
                raise DatasetError(f"COCO annotation file {self.coco_json}: annotation {a.get('id')} refers to "
                                   f"image_id {a['image_id']}, which is not in 'images'")
            self._anns[a["image_id"]].append(a)
        self.img_size, self.resize, self.in_chans = img_size, resize, 3
        self.classes, self.num_classes = ["object"], 1  # class-agnostic, as the MaskCut evaluation
        self.augment = False
        self._set_norm(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self._images)

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self._images[self._check_index(index)]["file_name"])

    def original_size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of the image as the json records it (the frame of the annotations)."""
        im = self._images[self._check_index(index)]
        return int(im["height"]), int(im["width"])

    def validate(self, *, max_listed: int = 10) -> None:
        """Check every image header (no decoding), so a bad file fails before a long evaluation.

        Raises:
            DatasetError: naming every bad file (the first ``max_listed``) and what is wrong with it.
        """
        paths = [self.image_path(i) for i in range(len(self))]
        bad = [(p, why) for p in paths if (why := check_image_header(p)) is not None]
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad[:max_listed])
            more = f"; and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
            raise DatasetError(f"coco {self.coco_json}: {len(bad)} of {len(paths)} image files cannot be read: "
                               f"{listed}{more}")

    def _raw(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        path = self.image_path(index)
        im = load_image(path, "RGB")
        h, w = self.original_size(index)
        if im.size != (w, h):
            raise DatasetError(f"image {path} is {im.size[0]}x{im.size[1]} but {self.coco_json} says {w}x{h}")
        im, _ = resize_pair(im, None, self.img_size, self.resize)
        return pil_to_tensor(im), self.image_ids[index]

    def labels(self) -> torch.Tensor:
        raise NotImplementedError("coco items carry image ids, not labels; see annotations()")

    def annotations(self, index: int, *, masks: bool = True) -> dict[str, Any]:
        """Class-agnostic ground truth of one image, in its original pixels.

        Returns:
            ``boxes`` float64 ``(K, 4)`` as COCO's ``[x, y, w, h]``, ``iscrowd`` bool ``(K,)``, ``category_ids``
            int64 ``(K,)`` (kept for reference; evaluation ignores them) and, with ``masks``, ``masks`` bool
            ``(K, H, W)`` decoded from polygons or RLE by ``pycocotools``.
        """
        index = self._check_index(index)
        anns = self._anns[self.image_ids[index]]
        out: dict[str, Any] = {
            "boxes": np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
            "category_ids": np.array([int(a.get("category_id", 1)) for a in anns], dtype=np.int64),
        }
        if masks:
            h, w = self.original_size(index)
            out["masks"] = np.zeros((len(anns), h, w), dtype=bool)
            if anns:
                mask_util = _mask_api()
                for k, a in enumerate(anns):
                    seg = a.get("segmentation")
                    if not seg:
                        raise DatasetError(f"{self.coco_json}: annotation {a.get('id')} has no segmentation")
                    if isinstance(seg, list):  # polygons
                        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
                    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                        rle = mask_util.frPyObjects(seg, h, w)
                    else:
                        rle = seg
                    with warnings.catch_warnings():
                        # pycocotools' Cython decode trips numpy 2's copy-keyword deprecation; the result is right
                        warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
                        out["masks"][k] = mask_util.decode(rle).astype(bool)
        return out
