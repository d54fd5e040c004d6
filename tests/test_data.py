"""Tests for ratelab.data: registry, digits, shapes, imagefolder, cifar10/100."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ratelab.core.errors import DatasetError, UnknownNameError
from ratelab.data import build_dataset, dataset_options, list_datasets, stratified_split
from ratelab.data.common import shift
from ratelab.data.shapes import shape_mask

torch.set_num_threads(1)


def _find_shift(aug: torch.Tensor, raw: torch.Tensor, max_shift: int, fill: float = 0.0) -> tuple[int, int] | None:
    """The (dy, dx) with shift(raw, dy, dx) == aug, or None."""
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if torch.allclose(shift(raw, dy, dx, fill=fill), aug, atol=1e-6):
                return dy, dx
    return None


# ----------------------------------------------------------------------------------------------------- registry


def test_registry_lists_and_rejects_bad_names():
    assert list_datasets() == ["caption_folder", "caption_wds", "cifar10", "cifar100", "coco", "digits", "imagefolder",
                               "shapes", "shapes_captions", "shapes_cluttered", "voc"]
    with pytest.raises(UnknownNameError, match="nosuchdata.*digits"):
        build_dataset("nosuchdata", "train")
    with pytest.raises(UnknownNameError, match="did you mean 'digits'"):
        build_dataset("digit", "train")
    with pytest.raises(ValueError, match="'bogus'.*train.*val"):
        build_dataset("digits", "bogus")
    with pytest.raises(ValueError, match="'bogus'.*train.*val.*test"):
        build_dataset("shapes", "bogus")
    with pytest.raises(ValueError, match="wrong_opt.*val_fraction"):
        build_dataset("digits", "train", wrong_opt=1)
    with pytest.raises(ValueError, match="label_type"):
        build_dataset("cifar10", "train", label_type="fine")  # a cifar100-only option
    with pytest.raises(ValueError, match="img_size"):
        build_dataset("digits", "train", img_size=0)
    with pytest.raises(ValueError, match="seed"):
        build_dataset("digits", "train", seed=-1)
    assert "label_type" in dataset_options("cifar100") and "max_objects" in dataset_options("shapes")


def test_stratified_split_partition():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(17))
    assert torch.bincount(labels[va]).tolist() == [2, 1, 1]
    tr2, _ = stratified_split(labels, 0.2, seed=3)
    tr3, _ = stratified_split(labels, 0.2, seed=4)
    assert torch.equal(tr, tr2) and not torch.equal(tr, tr3)


# ------------------------------------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_determinism():
    tr, va = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert len(tr) + len(va) == 1797 and abs(len(va) / 1797 - 0.2) < 0.01
    assert (tr.num_classes, tr.in_chans, tr.img_size, tr.classes[3]) == (10, 1, 16, "3")
    x, y = va[0]
    assert x.dtype == torch.float32 and x.shape == (1, 16, 16) and isinstance(y, int) and 0 <= y < 10
    assert set(tr.indices.tolist()).isdisjoint(va.indices.tolist())
    assert len(set(tr.indices.tolist()) | set(va.indices.tolist())) == 1797
    assert torch.bincount(va.labels(), minlength=10).min() >= 30  # stratified: every class in val

    tr_again = build_dataset("digits", "train", seed=0, augment=False)
    assert torch.equal(tr.indices, tr_again.indices) and torch.equal(tr.tensors()[0], tr_again.tensors()[0])
    assert not torch.equal(tr.indices, build_dataset("digits", "train", seed=1).indices)
    # No held-out test split: "test" is an error (it was an alias of val, so val numbers read as test numbers).
    with pytest.raises(DatasetError, match=r"'digits' has no split 'test'; valid splits: train, val \(.*no held-out"):
        build_dataset("digits", "test")

    half = build_dataset("digits", "train", val_fraction=0.5)
    assert abs(len(half) - 1797 / 2) < 10


def test_digits_content_and_normalization():
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0
    ds = build_dataset("digits", "val", img_size=8)  # no resize: pixels must be the originals
    X, y = ds.tensors()
    assert X.shape == (len(ds), 1, 8, 8) and y.dtype == torch.int64
    assert torch.allclose(ds.denormalize(X)[:, 0], raw[ds.indices], atol=1e-6)
    assert torch.equal(y, torch.as_tensor(load_digits().target)[ds.indices])

    tr, va = build_dataset("digits", "train"), build_dataset("digits", "val")
    Xall = torch.cat([tr.tensors()[0], va.tensors()[0]])
    assert abs(Xall.mean().item()) < 1e-3 and abs(Xall.std().item() - 1) < 1e-3
    assert abs(va.tensors()[0].mean().item()) < 0.1  # a split is close to the whole set


def test_digits_augmentation_reproducible_and_is_a_translation():
    tr = build_dataset("digits", "train")
    assert tr.augment and not build_dataset("digits", "val").augment
    assert (
        not build_dataset("digits", "train", augment=False).augment
        and build_dataset("digits", "val", augment=True).augment
    )
    raws = [tr._raw(i)[0] for i in range(20)]
    torch.manual_seed(123)
    a = [tr[i][0] for i in range(20)]
    torch.manual_seed(123)
    b = [tr[i][0] for i in range(20)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    shifts = [_find_shift(tr.denormalize(u), r, tr.max_shift) for u, r in zip(a, raws)]
    assert all(s is not None for s in shifts)  # every augmented image is the raw one translated
    assert any(s != (0, 0) for s in shifts)

    # resuming from a saved torch RNG state replays the same augmentations (what the trainer relies on)
    state = torch.get_rng_state()
    c = [tr[i][0] for i in range(5)]
    torch.set_rng_state(state)
    assert all(torch.equal(u, tr[i][0]) for i, u in enumerate(c))

    loader = torch.utils.data.DataLoader(tr, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    xb1, yb1 = next(iter(loader))
    loader.generator.manual_seed(0)
    torch.manual_seed(5)
    xb2, yb2 = next(iter(loader))
    assert xb1.shape == (64, 1, 16, 16) and yb1.dtype == torch.int64
    assert torch.equal(xb1, xb2) and torch.equal(yb1, yb2)


# ------------------------------------------------------------------------------------------------------- shapes


def test_shapes_items_and_determinism():
    ds = build_dataset("shapes", "val", size=40)
    assert len(build_dataset("shapes", "train")) == 2000 and len(build_dataset("shapes", "val")) == 500
    assert (ds.num_classes, ds.in_chans, ds.img_size, len(ds.classes)) == (6, 3, 32, 6) and not ds.augment
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int) and 0 <= y < 6

    other = build_dataset("shapes", "val", size=40, cache=False)
    order = [7, 3, 39, 0]
    for i in order:  # any order, any instance: item i is a pure function of (seed, split, i)
        assert torch.equal(other[i][0], ds[i][0]) and other[i][1] == ds[i][1]
    assert not torch.equal(build_dataset("shapes", "val", seed=1)[0][0], x)
    assert not torch.equal(build_dataset("shapes", "test")[0][0], x)
    assert not torch.equal(ds[1][0], x)
    assert ds.labels().tolist() == [ds[i][1] for i in range(len(ds))]
    assert len(set(ds.labels().tolist())) >= 5
    assert build_dataset("shapes", "val", img_size=20)[0][0].shape == (3, 20, 20)

    X, _ = build_dataset("shapes", "train", size=300).tensors()
    m, s = X.mean((0, 2, 3)), X.std((0, 2, 3))
    assert m.abs().max() < 0.15 and (s - 1).abs().max() < 0.15, (m, s)


def test_shapes_masks_captions_and_objects():
    ds = build_dataset("shapes", "val", size=30, return_mask=True)
    for i in range(len(ds)):
        x, y, mask = ds[i]
        assert mask.dtype == torch.int64 and mask.shape == (32, 32)
        assert set(mask.unique().tolist()) == {0, y + 1}  # one object: background + its class
        obj = ds.objects(i)[0]
        assert obj.class_id == y and obj.shape == ds.classes[y]
        pix = ds.denormalize(x)[:, mask == y + 1]  # object pixels carry the object's colour
        assert (pix.mean(1) - torch.tensor(obj.rgb)).abs().max() < 0.05
        assert (mask > 0).sum() > 10
        cap = ds.caption(i)
        assert cap.startswith(f"a {obj.size} {obj.color} {obj.shape} ") and cap == obj.phrase()

    multi = build_dataset("shapes", "val", size=40, max_objects=3, return_mask=True)
    counts = []
    for i in range(len(multi)):
        x, y, mask = multi[i]
        objs, inst = multi.objects(i), multi.instance_masks(i)
        counts.append(len(objs))
        assert inst.shape == (len(objs), 32, 32) and inst.dtype == torch.bool
        assert torch.equal(inst.sum(0) > 0, mask > 0) and inst.sum(0).max() <= 1  # instances are disjoint
        assert torch.equal(inst[0], mask == y + 1)  # the main class appears only on the main object
        assert all(o.class_id != y and o.radius < objs[0].radius for o in objs[1:])
        for k, o in enumerate(objs):  # objects never overlap: each instance is its whole shape
            full = torch.from_numpy(shape_mask(o.shape, o.center[0], o.center[1], o.radius, 32))
            assert torch.equal(inst[k], full) and (mask[full] == o.class_id + 1).all()
        assert multi.caption(i).count(" and ") == (len(objs) > 1)
    assert max(counts) == 3 and min(counts) == 1


def test_shapes_augmentation_moves_image_and_mask_together():
    ds = build_dataset("shapes", "train", size=16, return_mask=True)
    assert ds.augment
    torch.manual_seed(0)
    a = [ds[i] for i in range(16)]
    torch.manual_seed(0)
    b = [ds[i] for i in range(16)]
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[2], v[2]) for u, v in zip(a, b))
    moved = 0
    for i, (x, _y, mask) in enumerate(a):
        raw_mask = ds.semantic_mask(i)
        s = _find_shift(mask.float(), raw_mask.float(), ds.max_shift)
        assert s is not None
        moved += s != (0, 0)
        assert torch.allclose(ds.denormalize(x), shift(ds._raw(i)[0], *s, mode="replicate"), atol=1e-5)
    assert moved > 0


# -------------------------------------------------------------------------------------------------- imagefolder


def _write_png(path, color, size=(20, 12), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture()
def folder_root(tmp_path):
    for split in ("train", "val"):
        for k in range(3):
            _write_png(tmp_path / split / "cat" / f"c{k}.png", (200, 10, 10))
            _write_png(tmp_path / split / "dog" / f"d{k}.jpg", (10, 10, 200), size=(9, 30))
    _write_png(tmp_path / "train" / "owl" / "o.png", (10, 200, 10))  # a class missing from val
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_layout_and_pixels(folder_root):
    tr = build_dataset("imagefolder", "train", root=folder_root, img_size=8)
    va = build_dataset("imagefolder", "val", root=folder_root, img_size=8)
    assert tr.classes == va.classes == ["cat", "dog", "owl"] and va.num_classes == 3
    assert len(tr) == 7 and len(va) == 6 and tr.augment and not va.augment
    assert tr.labels().tolist() == [0, 0, 0, 1, 1, 1, 2]
    x, y = va[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 0
    assert torch.allclose(va.denormalize(x), torch.tensor([200, 10, 10]).view(3, 1, 1) / 255.0, atol=1e-5)
    xd, yd = va[3]  # a non-square jpg: resized + cropped to a square, roughly blue
    assert yd == 1 and xd.shape == (3, 8, 8) and (va.denormalize(xd)[2] > 0.6).all()
    with pytest.raises(ValueError, match="'test'.*train, val"):
        build_dataset("imagefolder", "test", root=folder_root)

    gray = build_dataset("imagefolder", "val", root=folder_root, img_size=8, in_chans=1, mean=(0.5,), std=(0.5,))
    assert gray[0][0].shape == (1, 8, 8) and gray.in_chans == 1

    torch.manual_seed(1)
    a = [tr[i][0] for i in range(len(tr))]
    torch.manual_seed(1)
    assert all(torch.equal(u, tr[i][0]) for i, u in enumerate(a))


def test_imagefolder_flat_layout_split(tmp_path):
    for k in range(10):
        _write_png(tmp_path / "a" / f"{k}.png", (k, 0, 0), size=(4, 4))
        _write_png(tmp_path / "b" / f"{k}.png", (0, k, 0), size=(4, 4))
    tr = build_dataset("imagefolder", "train", root=tmp_path, img_size=4)
    va = build_dataset("imagefolder", "val", root=tmp_path, img_size=4)
    assert (len(tr), len(va), tr.layout) == (16, 4, "flat")
    assert set(p for p, _ in tr.samples).isdisjoint(p for p, _ in va.samples)
    other = build_dataset("imagefolder", "val", root=tmp_path, img_size=4, seed=1)
    assert [p for p, _ in other.samples] != [p for p, _ in va.samples]


def test_imagefolder_bad_files_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        build_dataset("imagefolder", "train", root=tmp_path / "does_not_exist")
    with pytest.raises(ValueError, match="root"):
        build_dataset("imagefolder", "train")

    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty" / "train")):
        build_dataset("imagefolder", "train", root=tmp_path / "empty")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-directories"):
        build_dataset("imagefolder", "train", root=tmp_path / "noclass")

    root = tmp_path / "bad"
    garbage = root / "train" / "cat" / "garbage.png"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"this is not a png at all" * 10)
    noisy = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    truncated = root / "train" / "cat" / "truncated.png"
    Image.fromarray(noisy).save(truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ds = build_dataset("imagefolder", "train", root=root, img_size=8)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["garbage.png", "truncated.png"]
    with pytest.raises(ValueError, match="garbage.png"):
        ds[0]
    with pytest.raises(ValueError, match="truncated.png") as err:
        ds[1]
    assert str(truncated) in str(err.value)
    garbage.unlink()
    with pytest.raises(FileNotFoundError, match="garbage.png"):
        ds[0]


def test_imagefolder_validate_checks_headers_before_any_decode(tmp_path, folder_root):
    from torch.utils.data import Subset

    from ratelab.data.common import validate_dataset
    from ratelab.data.noise import RelabeledDataset

    good = build_dataset("imagefolder", "train", root=folder_root, img_size=8)
    good.validate()  # no error
    garbage = folder_root / "train" / "cat" / "c1.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    noisy = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    truncated = folder_root / "train" / "owl" / "o.png"
    Image.fromarray(noisy).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-400])  # the pixels' tail and the IEND chunk are gone
    ds = build_dataset("imagefolder", "train", root=folder_root, img_size=8)  # construction does not read files
    with pytest.raises(DatasetError, match=r"2 of 7 image files cannot be read") as err:
        ds.validate()
    assert str(garbage) in str(err.value) and str(truncated) in str(err.value)
    assert "validate_data=False" in str(err.value)
    # Views over the dataset are looked through; in-memory datasets have nothing to check.
    for view in (Subset(ds, [0]), RelabeledDataset(ds, ds.labels())):
        with pytest.raises(DatasetError, match="c1.png"):
            validate_dataset(view)
    validate_dataset(build_dataset("digits", "val"))
    validate_dataset(None)
    with pytest.raises(DatasetError, match="; and 1 more"):
        ds.validate(max_listed=1)


# -------------------------------------------------------------------------------------------------------- cifar


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(n, labels, label_key=b"labels", offset=0, extra=None):
    data = (np.arange(n * 3072).reshape(n, 3072) * 7 + offset) % 200  # stays below 255, values all distinct-ish
    data = data.astype(np.uint8)
    d = {b"data": data, label_key: list(labels), b"filenames": [f"img{i}.png".encode() for i in range(n)]}
    d.update(extra or {})
    return d


@pytest.fixture()
def cifar10_root(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    for b in range(1, 6):
        batch = _batch(4, [(b + i) % 10 for i in range(4)], offset=b)
        if b == 1:  # image 0: pure red pixel at row 2, col 5; pure green pixel at row 30, col 1
            batch[b"data"][0, [2 * 32 + 5, 1024 + 2 * 32 + 5, 2048 + 2 * 32 + 5]] = [255, 0, 0]
            batch[b"data"][0, [30 * 32 + 1, 1024 + 30 * 32 + 1, 2048 + 30 * 32 + 1]] = [0, 255, 0]
        _dump(base / f"data_batch_{b}", batch)
    _dump(base / "test_batch", _batch(3, [9, 8, 7]))
    _dump(base / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072})
    return tmp_path


def test_cifar10_layout_labels_and_pixels(cifar10_root):
    tr = build_dataset("cifar10", "train", root=cifar10_root, augment=False)
    te = build_dataset("cifar10", "test", root=cifar10_root)
    assert (len(tr), len(te), tr.num_classes, tr.img_size, tr.in_chans) == (20, 3, 10, 32, 3)
    assert tr.classes[4] == "class4" and not te.augment and build_dataset("cifar10", "train", root=cifar10_root).augment
    assert tr.labels().tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(4)]
    assert te.labels().tolist() == [9, 8, 7]
    x, y = tr[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    img = tr.denormalize(x)
    assert torch.allclose(img[:, 2, 5], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(img[:, 30, 1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    with open(cifar10_root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        data = pickle.load(f, encoding="bytes")[b"data"]
    expect = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255  # item 5 = batch 2, image 1
    assert torch.allclose(tr.denormalize(tr[5][0]), expect, atol=1e-5)
    X, Y = tr.tensors()
    assert X.shape == (20, 3, 32, 32) and torch.allclose(X[5], tr[5][0], atol=1e-6) and torch.equal(Y, tr.labels())

    direct = build_dataset("cifar10", "val", root=cifar10_root / "cifar-10-batches-py")  # "val" = "test"
    assert direct.split == "test" and torch.equal(direct[0][0], te[0][0])
    assert build_dataset("cifar10", "test", root=cifar10_root, img_size=16)[0][0].shape == (3, 16, 16)

    aug = build_dataset("cifar10", "train", root=cifar10_root)
    torch.manual_seed(7)
    a = [aug[i][0] for i in range(20)]
    torch.manual_seed(7)
    assert all(torch.equal(u, aug[i][0]) for i, u in enumerate(a))
    assert any(not torch.equal(u, tr[i][0]) for i, u in enumerate(a))


def test_cifar_missing_and_bad_files(cifar10_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "cifar-10-batches-py" / "batches.meta")):
        build_dataset("cifar10", "train", root=tmp_path / "nowhere")
    missing = cifar10_root / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_dataset("cifar10", "train", root=cifar10_root)
    build_dataset("cifar10", "test", root=cifar10_root)  # the test split does not need it

    _dump(missing, {b"data": os.getcwd, b"labels": []})  # a pickle that references a function: refused
    with pytest.raises(ValueError, match="data_batch_3.*not allowed"):
        build_dataset("cifar10", "train", root=cifar10_root)
    _dump(missing, {b"labels": [0]})
    with pytest.raises(ValueError, match="data_batch_3.*'data'"):
        build_dataset("cifar10", "train", root=cifar10_root)
    _dump(missing, _batch(2, [0, 10]))
    with pytest.raises(ValueError, match="data_batch_3.*labels"):
        build_dataset("cifar10", "train", root=cifar10_root)


def test_cifar100_fine_and_coarse(tmp_path):
    base = tmp_path / "cifar-100-python"
    _dump(base / "train", _batch(4, [0, 99, 50, 7], b"fine_labels", extra={b"coarse_labels": [0, 19, 5, 3]}))
    _dump(base / "test", _batch(2, [1, 2], b"fine_labels", extra={b"coarse_labels": [1, 1]}))
    # str keys (a re-saved python-3 pickle) are accepted too
    _dump(
        base / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": list("abcdefghijklmnopqrst")},
    )
    fine = build_dataset("cifar100", "train", root=tmp_path)
    coarse = build_dataset("cifar100", "train", root=tmp_path, label_type="coarse")
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert fine.labels().tolist() == [0, 99, 50, 7] and coarse.labels().tolist() == [0, 19, 5, 3]
    assert fine.classes[99] == "f99" and coarse.classes[19] == "t"
    assert build_dataset("cifar100", "test", root=tmp_path, label_type="coarse").labels().tolist() == [1, 1]
    with pytest.raises(ValueError, match="label_type"):
        build_dataset("cifar100", "train", root=tmp_path, label_type="medium")
