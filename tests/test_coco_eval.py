"""Class-agnostic COCO AP through pycocotools on a tiny COCO-format file written here.

Geometry: two 128x128 images, one 100x100 object each (categories 1 and 2, merged by the class-agnostic
evaluation). A prediction covering 100x72 of the object (inside it) has IoU 0.72 for boxes and masks alike: it
matches at the thresholds 0.50 ... 0.70 (5 of 10) and not at 0.75 ... 0.95, so AP50 = 1, AP75 = 0, AP = 5/10.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from ratelab.eval.coco import coco_box_mask_ap, encode_mask  # noqa: E402

H = W = 128


def _mask(x: int, y: int, w: int, h: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y : y + h, x : x + w] = True
    return m


OBJECTS = {1: (10, 10, 100, 100), 2: (20, 5, 100, 100)}


@pytest.fixture()
def coco_file(tmp_path):
    anns = [
        {"id": i, "image_id": i, "category_id": i, "bbox": list(map(float, b)), "area": float(b[2] * b[3]),
         "iscrowd": 0, "segmentation": encode_mask(_mask(*b))}
        for i, b in OBJECTS.items()
    ]
    data = {
        "images": [{"id": i, "width": W, "height": H, "file_name": f"{i}.png"} for i in OBJECTS],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    path = tmp_path / "instances_tiny.json"
    path.write_text(json.dumps(data))
    return path


def test_perfect_predictions_give_ap_one(coco_file):
    # bool masks are encoded by the evaluator; category ids are ignored (class-agnostic); no bbox -> from the mask
    preds = [{"image_id": i, "score": 0.9, "segmentation": _mask(*b), "category_id": 7} for i, b in OBJECTS.items()]
    res = coco_box_mask_ap(preds, coco_file)
    assert set(res) == {"box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"}
    for k, v in res.items():
        assert v == pytest.approx(1.0), k


def test_shifted_predictions_give_the_known_ap(coco_file):
    preds = []
    for i, (x, y, w, _h) in OBJECTS.items():
        m = _mask(x, y, w, 72)
        preds.append({"image_id": i, "score": 1.0, "bbox": [x, y, w, 72.0], "segmentation": encode_mask(m)})
    res = coco_box_mask_ap(preds, coco_file)
    for kind in ("box", "mask"):
        assert res[f"{kind}_AP50"] == pytest.approx(1.0)
        assert res[f"{kind}_AP75"] == pytest.approx(0.0)
        assert res[f"{kind}_AP"] == pytest.approx(0.5)


def test_boxes_only_leave_mask_ap_nan_and_empty_predictions_score_zero(coco_file):
    data = json.loads(coco_file.read_text())
    res = coco_box_mask_ap([{"image_id": 1, "bbox": [10, 10, 100, 100], "score": 1.0}], data)
    # image 2's object is missed: precision 1 up to recall 1/2, then 0 -> 51 of COCO's 101 recall points
    assert res["box_AP50"] == pytest.approx(51 / 101)
    assert res["box_AP"] == pytest.approx(res["box_AP50"])
    assert math.isnan(res["mask_AP"])
    assert all(v == 0.0 for v in coco_box_mask_ap([], coco_file).values())


def test_missing_or_corrupt_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        coco_box_mask_ap([], tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        coco_box_mask_ap([], bad)
