"""Class-agnostic COCO box and mask AP through ``pycocotools`` (the standard tool), for MaskCut-style predictions.

The CRATE segmentation paper (§3.5 of the design note) and CutLER report unsupervised, class-agnostic AP: every
ground-truth category is mapped to one "object" class and every prediction is an "object". ``pycocotools`` is
imported lazily (it prints and is only needed here).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["coco_box_mask_ap", "encode_mask"]

_KEYS = ("AP", "AP50", "AP75")


def encode_mask(mask: Any) -> dict[str, Any]:
    """(H, W) bool mask (array or tensor) -> COCO RLE with ``counts`` as str (JSON-serializable)."""
    from pycocotools import mask as mask_util

    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
    rle = mask_util.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _load_gt(coco_json: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(coco_json, Mapping):
        return copy.deepcopy(dict(coco_json))
    path = os.fspath(coco_json)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a COCO-format annotation file") from e


def _agnostic_gt(data: dict[str, Any]) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"COCO annotations lack the {key!r} list")
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    anns = []
    for i, a in enumerate(data["annotations"]):
        a = dict(a, category_id=1)
        a.setdefault("id", i + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            seg = a.get("segmentation")
            if seg is not None:
                h, w = sizes[a["image_id"]]
                rles = mask_util.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(
                    seg.get("counts"), list) else seg
                a["area"] = float(np.sum(mask_util.area(rles)))
            else:
                a["area"] = float(a["bbox"][2] * a["bbox"][3])
        anns.append(a)
    return {**data, "annotations": anns, "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}


def _prediction(p: Mapping[str, Any], with_masks: bool) -> dict[str, Any]:
    from pycocotools import mask as mask_util

    out = {"image_id": p["image_id"], "category_id": 1, "score": float(p.get("score", 1.0))}
    seg = p.get("segmentation")
    if seg is not None and not isinstance(seg, Mapping):
        seg = encode_mask(seg)
    if with_masks:
        out["segmentation"] = seg
    bbox = p.get("bbox")
    if bbox is None:
        if seg is None:
            raise ValueError(f"prediction for image {p['image_id']} has neither a bbox nor a segmentation")
        bbox = mask_util.toBbox(seg).tolist()
    out["bbox"] = [float(v) for v in bbox]
    return out


def _evaluate(gt: Any, dets: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and the summary table
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0..2]: AP@[.50:.95], AP@.50, AP@.75 over all areas, 100 detections per image
    return {k: float(v) for k, v in zip(_KEYS, ev.stats[:3])}


def coco_box_mask_ap(
    predictions: Sequence[Mapping[str, Any]], coco_json: str | os.PathLike | Mapping[str, Any]
) -> dict[str, float]:
    """Class-agnostic box and mask AP, AP50, AP75 (COCOeval, 100 detections per image, all areas).

    Args:
        predictions: one dict per detection: ``image_id``, ``score`` (default 1.0), ``bbox`` [x, y, w, h] (derived
            from the mask when absent) and ``segmentation`` (COCO RLE, or an (H, W) bool mask encoded here). Any
            ``category_id`` is ignored (class-agnostic).
        coco_json: path of a COCO-format annotation file (e.g. instances_val2017.json) or the loaded dict; all its
            categories are merged into one.

    Returns:
        ``{"box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"}`` as fractions in [0, 1] (COCO's
        tables print 100x). The mask entries are NaN when some prediction has no segmentation; with no
        predictions at all every entry is 0.0.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable annotation file (the message names it).
    """
    from pycocotools.coco import COCO

    data = _agnostic_gt(_load_gt(coco_json))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = data
        gt.createIndex()
    keys = [f"{t}_{k}" for t in ("box", "mask") for k in _KEYS]
    if not predictions:
        return dict.fromkeys(keys, 0.0)
    with_masks = all(p.get("segmentation") is not None for p in predictions)
    dets = [_prediction(p, with_masks) for p in predictions]
    # loadRes reads the first result's keys: a bbox makes it take the box branch (areas from boxes), so each
    # evaluation gets only its own geometry
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    res = {f"box_{k}": v for k, v in _evaluate(gt, boxes, "bbox").items()}
    if with_masks:
        segms = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
        res.update({f"mask_{k}": v for k, v in _evaluate(gt, segms, "segm").items()})
    else:
        res.update(dict.fromkeys((f"mask_{k}" for k in _KEYS), float("nan")))
    return res
