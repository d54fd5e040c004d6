"""``voc`` and ``coco`` readers on tiny directories written here: items, ignore index, resizing, error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data import build_dataset
from ratelab.data.common import validate_dataset
from ratelab.data.voc import IGNORE_INDEX, voc_colormap


def _voc(tmp_path, n=3, w=20, h=12):
    """VOCdevkit/VOC2012 with n images; image i has class i+1 in a box, a 255 border ring, background elsewhere."""
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True)
    pal = voc_colormap().flatten().tolist()
    ids = [f"2007_00000{i}" for i in range(n)]
    for i, name in enumerate(ids):
        rgb = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(base / "JPEGImages" / f"{name}.jpg", quality=95)
        m = np.zeros((h, w), dtype=np.uint8)
        m[2:10, 4:14] = IGNORE_INDEX
        m[3:9, 5:13] = i + 1
        p = Image.fromarray(m, "P")
        p.putpalette(pal)
        p.save(base / "SegmentationClass" / f"{name}.png")
    (base / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:2]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text(ids[2] + "\n\n")
    return tmp_path / "VOCdevkit", base, ids


def test_voc_items_and_ignore_index(tmp_path):
    root, base, ids = _voc(tmp_path)
    ds = build_dataset("voc", "train", root=str(root))
    assert len(ds) == 2 and ds.num_classes == 21 and ds.classes[15] == "person" and not build_dataset(
        "voc", "val", root=str(base)).augment
    ds = build_dataset("voc", "train", root=str(root), augment=False)
    x, m = ds[1]
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32 and m.shape == (12, 20) and m.dtype == torch.int64
    assert set(m.unique().tolist()) == {0, 2, IGNORE_INDEX}
    assert (m[3:9, 5:13] == 2).all() and m[2, 4] == IGNORE_INDEX and m[0, 0] == 0
    raw = np.asarray(Image.open(base / "JPEGImages" / f"{ids[1]}.jpg").convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(ds.denormalize(x), torch.from_numpy(raw).permute(2, 0, 1), atol=1e-5, rtol=0)
    ds.validate()
    validate_dataset(ds)


def test_voc_rgb_encoded_mask_maps_back(tmp_path):
    root, base, ids = _voc(tmp_path)
    path = base / "SegmentationClass" / f"{ids[0]}.png"
    Image.open(path).convert("RGB").save(path)
    ds = build_dataset("voc", "train", root=str(root), augment=False)
    assert set(ds[0][1].unique().tolist()) == {0, 1, IGNORE_INDEX}
    Image.fromarray(np.full((12, 20, 3), 7, dtype=np.uint8)).save(path)
    with pytest.raises(DatasetError, match=f"{ids[0]}.png.*not VOC classes"):
        ds[0]


@pytest.mark.parametrize("mode", ["square", "shorter"])
def test_voc_resize_keeps_labels(tmp_path, mode):
    root, _, _ = _voc(tmp_path)
    ds = build_dataset("voc", "train", root=str(root), img_size=24, resize=mode, augment=False)
    x, m = ds[0]
    want = (24, 24) if mode == "square" else (24, 40)
    assert x.shape[1:] == want and m.shape == want
    assert set(m.unique().tolist()) <= {0, 1, IGNORE_INDEX}  # nearest: no label is invented
    if mode == "square":
        X, M = ds.tensors()
        assert X.shape == (2, 3, 24, 24) and M.shape == (2, 24, 24)


def test_voc_augmentation_flips_image_and_mask_together(tmp_path):
    root, _, _ = _voc(tmp_path)
    plain = build_dataset("voc", "train", root=str(root), augment=False)[0]
    aug = build_dataset("voc", "train", root=str(root), augment=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(8):
        x, m = aug[0]
        flipped = torch.equal(m, plain[1].flip(-1))
        assert flipped or torch.equal(m, plain[1])
        assert torch.equal(x, plain[0].flip(-1) if flipped else plain[0])
        seen.add(flipped)
    assert seen == {True, False}


def test_voc_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetNotFound, match="voc root directory not found"):
        build_dataset("voc", "val", root=str(tmp_path / "nope"))
    root, base, ids = _voc(tmp_path)
    with pytest.raises(DatasetError, match="valid splits"):
        build_dataset("voc", "test", root=str(root))
    (base / "ImageSets/Segmentation/trainval.txt").unlink(missing_ok=True)
    with pytest.raises(DatasetNotFound, match="trainval.txt"):
        build_dataset("voc", "trainval", root=str(root))
    # a missing image: validate() and the item both name it
    (base / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    ds = build_dataset("voc", "train", root=str(root))
    with pytest.raises(DatasetError, match=f"{ids[0]}.jpg: file not found"):
        ds.validate()
    with pytest.raises(DatasetNotFound, match=f"{ids[0]}.jpg"):
        ds[0]
    # a corrupt mask and a corrupt image
    (base / "SegmentationClass" / f"{ids[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=f"cannot read mask file .*{ids[1]}.png"):
        ds[1]
    (base / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"3 of 4 files cannot be read: .*{ids[0]}.jpg.*{ids[1]}.jpg.*{ids[1]}.png"):
        ds.validate()
    with pytest.raises(DatasetError, match=f"cannot read image file .*{ids[1]}.jpg"):
        ds[1]


# ------------------------------------------------------------------------------------------------------------ coco
def _coco(tmp_path):
    """Two images (one JPEG, one PNG): image 1 has a polygon square and an RLE object, image 2 none."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    Image.fromarray(np.full((16, 24, 3), 100, dtype=np.uint8)).save(root / "val2017" / "a.jpg")
    Image.fromarray(np.full((10, 10, 3), 200, dtype=np.uint8)).save(root / "val2017" / "b.png")
    rle_mask = np.zeros((16, 24), dtype=bool)
    rle_mask[10:14, 15:20] = True
    from ratelab.eval.coco import encode_mask

    data = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 16, "width": 24},
                   {"id": 9, "file_name": "b.png", "height": 10, "width": 10}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 2, 6, 6], "area": 36, "iscrowd": 0,
             "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [15, 10, 5, 4], "area": 20, "iscrowd": 0,
             "segmentation": encode_mask(rle_mask)},
        ],
        "categories": [{"id": 3, "name": "x"}, {"id": 5, "name": "y"}],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root, rle_mask


def test_coco_items_annotations_and_resize(tmp_path):
    pytest.importorskip("pycocotools")
    root, rle_mask = _coco(tmp_path)
    ds = build_dataset("coco", "val", root=str(root))
    assert len(ds) == 2 and ds.image_ids == [7, 9] and ds.coco_json.endswith("instances_val2017.json")
    x, image_id = ds[0]
    assert x.shape == (3, 16, 24) and image_id == 7 and ds[1][1] == 9 and ds.original_size(0) == (16, 24)
    gt = ds.annotations(0)
    assert gt["boxes"].tolist() == [[2, 2, 6, 6], [15, 10, 5, 4]] and gt["masks"].shape == (2, 16, 24)
    assert np.array_equal(gt["masks"][1], rle_mask)
    assert gt["masks"][0][3:7, 3:7].all() and not gt["masks"][0][10:].any()
    empty = ds.annotations(1)
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 10, 10)
    small = build_dataset("coco", "val", ann_file=ds.coco_json, image_dir=str(root / "val2017"), img_size=8)
    assert small[0][0].shape == (3, 8, 8) and small.original_size(0) == (16, 24)
    ds.validate()


def test_coco_errors_name_the_file(tmp_path):
    root, _ = _coco(tmp_path)
    ann = root / "annotations" / "instances_val2017.json"
    with pytest.raises(DatasetNotFound, match="instances_train2017.json"):
        build_dataset("coco", "train", root=str(root), image_dir=str(root / "val2017"))
    with pytest.raises(DatasetError, match="needs root"):
        build_dataset("coco", "val")
    text = ann.read_text()
    ann.write_text(text[:-5])
    with pytest.raises(DatasetError, match="instances_val2017.json is not valid JSON: line 1"):
        build_dataset("coco", "val", root=str(root))
    bad = json.loads(text)
    del bad["images"][1]["file_name"]
    ann.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match=r"images\[1\] lacks file_name"):
        build_dataset("coco", "val", root=str(root))
    ann.write_text(text)
    (root / "val2017" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ds = build_dataset("coco", "val", root=str(root))
    with pytest.raises(DatasetError, match="1 of 2 image files cannot be read: .*a.jpg"):
        ds.validate()
    with pytest.raises(DatasetError, match="cannot read image file .*a.jpg"):
        ds[0]
    (root / "val2017" / "b.png").unlink()
    with pytest.raises(DatasetNotFound, match="b.png"):
        ds[1]
