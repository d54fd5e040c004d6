"""``shapes_cluttered``: textured backgrounds, distractors, several objects of one class, exact masks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ratelab.data import build_dataset, dataset_options
from ratelab.data.shapes import SHAPES, TEXTURES, distractor_mask, render_cluttered_scene, shape_mask


def test_items_masks_and_determinism():
    ds = build_dataset("shapes_cluttered", "val", size=24, return_mask=True)
    assert {"max_distractors", "textures", "max_objects"} <= set(dataset_options("shapes_cluttered"))
    assert ds.num_classes == 6 and ds.in_chans == 3 and ds.img_size == 32 and not ds.augment
    x, y, mask = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, y + 1}
    again = build_dataset("shapes_cluttered", "val", size=24, return_mask=True, cache=False)
    for i in (0, 5, 23):  # a fresh, uncached dataset renders the same scene in any order
        a, b = ds[i], again[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not torch.equal(build_dataset("shapes_cluttered", "val", seed=1)[0][0], ds[0][0])
    assert not torch.equal(build_dataset("shapes_cluttered", "test")[0][0], ds[0][0])
    assert not torch.equal(build_dataset("shapes", "val")[0][0], ds[0][0])
    assert build_dataset("shapes_cluttered", "val", img_size=64)[0][0].shape == (3, 64, 64)


def test_masks_are_exact():
    """Each instance mask is the object's whole shape, and every mask pixel carries the object's colour."""
    ds = build_dataset("shapes_cluttered", "val", size=30, img_size=48)
    n_multi = 0
    for i in range(len(ds)):
        raw = ds.denormalize(ds[i][0])
        objs, inst = ds.objects(i), ds.instance_masks(i)
        assert len(objs) == inst.shape[0] >= 1
        n_multi += len(objs) > 1
        assert not (inst.sum(0) > 1).any()  # instances never overlap
        for o, m in zip(objs, inst):
            assert o.class_id == ds[i][1]
            assert torch.equal(m, torch.from_numpy(shape_mask(o.shape, *o.center, o.radius, 48)))
            err = (raw[:, m] - torch.tensor(o.rgb).view(3, 1)).abs()
            assert err.max() < 0.2 and err.mean() < 0.04  # the object's colour plus its 0.03 pixel noise
        sem = ds.semantic_mask(i)
        assert torch.equal(sem > 0, inst.any(0)) and set(sem.unique().tolist()) <= {0, ds[i][1] + 1}
    assert n_multi >= 10  # several objects per image is the common case


def test_distractors_are_drawn_but_not_labelled():
    ds = build_dataset("shapes_cluttered", "val", size=40, max_distractors=6)
    seen = 0
    for i in range(len(ds)):
        fg = ds.semantic_mask(i) > 0
        raw = ds.denormalize(ds[i][0])
        dis = ds.distractors(i)
        masks = [torch.from_numpy(distractor_mask(d, 32)) for d in dis]
        for j, (d, m) in enumerate(zip(dis, masks)):
            later = torch.stack(masks[j + 1:]).any(0) if j + 1 < len(masks) else torch.zeros_like(m)
            visible = m & ~fg & ~later  # distractors lie behind the objects, in drawing order
            if visible.any():
                seen += 1
                err = (raw[:, visible] - torch.tensor(d.rgb).view(3, 1)).abs()
                assert err.max() < 1e-4  # its pixels are its flat colour, and no mask covers them
    assert seen >= 40
    none = build_dataset("shapes_cluttered", "val", size=10, max_distractors=0)
    assert all(none.distractors(i) == [] for i in range(10))


def test_class_balance_and_labels_without_rendering():
    ds = build_dataset("shapes_cluttered", "train", size=600)
    labels = ds.labels()
    assert torch.equal(labels, torch.tensor([ds[i][1] for i in range(600)]))
    assert torch.bincount(labels, minlength=6).tolist() == [100] * 6  # exact balance
    assert torch.bincount(labels[:60], minlength=6).tolist() == [10] * 6  # in every prefix of 6k items
    # every texture is drawn
    kinds = set()
    for i in range(200):
        rng = np.random.default_rng([0, 0, i, 1])
        kinds.add(TEXTURES[int(rng.integers(len(TEXTURES)))])
    assert kinds == set(TEXTURES)
    assert len(SHAPES) == ds.num_classes


def test_options_validate():
    with pytest.raises(ValueError, match="textures"):
        build_dataset("shapes_cluttered", "val", textures=("plaid",))
    with pytest.raises(ValueError, match="max_distractors"):
        build_dataset("shapes_cluttered", "val", max_distractors=-1)
    one = build_dataset("shapes_cluttered", "val", size=6, textures="checker", max_objects=1)
    assert all(len(one.objects(i)) == 1 for i in range(6))


def test_augmentation_moves_image_and_mask_together():
    ds = build_dataset("shapes_cluttered", "train", size=8, return_mask=True)
    torch.manual_seed(0)
    x, _, mask = ds[3]
    ref = ds.semantic_mask(3)
    assert mask.sum() == ref.sum()  # a shift never cuts an object (margins), whatever the draw


def test_rendering_is_fast():
    render_cluttered_scene(0, 0, 0, 64, 3, 4, TEXTURES)
    t = time.perf_counter()
    for i in range(200):
        render_cluttered_scene(0, 0, i, 32, 3, 4, TEXTURES)
    per_image = (time.perf_counter() - t) / 200
    assert per_image < 5e-3  # ~0.3 ms measured at 32 px; the bound leaves room for a loaded CI machine
