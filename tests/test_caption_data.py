"""Caption tokenizer (trained WordPiece, local vocab files) and the image-caption datasets (shapes, folder with
sidecars or an index, WebDataset shards), with errors that name the bad file."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ratelab.core.errors import DatasetError, DatasetNotFound
from ratelab.data import build_dataset
from ratelab.data.captions import ATTRIBUTES, TokenizedCaptions
from ratelab.data.shapes import Shapes
from ratelab.data.text_tokenizer import CaptionTokenizer

CAPS = ["a large red circle in the top left", "a small blue square at the bottom", "a medium green star on the right"]


def test_trained_tokenizer_conventions_round_trip_and_determinism(tmp_path):
    tok = CaptionTokenizer.train(CAPS * 5, vocab_size=60)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3) and tok.vocab_size <= 60
    ids = tok.encode(CAPS, max_len=24)
    assert ids.shape == (3, 24) and (ids[:, 0] == 2).all()
    for row, cap in zip(ids.tolist(), CAPS):
        n = row.index(3)
        assert all(t == 0 for t in row[n + 1:]) and 3 not in row[1:n]
        assert tok.decode(row) == cap
    cut = tok.encode(CAPS[0], max_len=4)[0].tolist()
    assert len(cut) == 4 and cut[0] == 2 and cut[-1] == 3  # truncated, still ends with EOS
    assert tok.encode(CAPS).shape[1] == max(len(tok.encode_ids(c)) for c in CAPS)  # pad to the longest
    chars = sorted(set("".join(CAPS).replace(" ", "")))
    tight = CaptionTokenizer.train(CAPS, vocab_size=5 + 2 * len(chars) + 1)  # room for one whole word: "a"
    assert tight.vocab_size == 5 + 2 * len(chars) + 1 and len(tight.encode_ids("circle")) == 2 + len("circle")
    assert tight.decode(tight.encode(CAPS)) == CAPS  # words out of the vocabulary split into characters
    with pytest.raises(ValueError, match="too small"):
        CaptionTokenizer.train(CAPS, vocab_size=10)
    again = CaptionTokenizer.train(CAPS * 5, vocab_size=60)
    assert again.tokenizer.get_vocab() == tok.tokenizer.get_vocab()
    path = tok.save(tmp_path / "tok")
    loaded = CaptionTokenizer.from_file(path)
    assert torch.equal(loaded.encode(CAPS, 24), ids)
    assert torch.equal(CaptionTokenizer.from_file(tmp_path / "tok").encode(CAPS, 24), ids)  # a folder works too


def test_local_bert_style_vocab_file(tmp_path):
    # bert-base-uncased's layout in small: [PAD] first, the other specials further in, ## continuations
    words = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "in",
             "the", "top", "left", "ci", "##rc", "##le", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = CaptionTokenizer.from_file(tmp_path / "vocab.txt")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 4, 5, 3) and tok.vocab_size == len(words)
    assert tok.encode_ids("A Red circle, top") == [4, 7, 8, 9, 3, 12, 5]  # lower-cased; "," is unknown
    assert tok.decode([4, 7, 8, 9, 5, 0]) == "a red circle"


def test_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetNotFound, match="nope.txt"):
        CaptionTokenizer.from_file(tmp_path / "nope.txt")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nword\n")
    with pytest.raises(DatasetError, match=r"vocab\.txt.*\[CLS\]"):
        CaptionTokenizer.from_file(tmp_path / "vocab.txt")


def test_shapes_captions_items_attributes_and_tokenized_view():
    ds = build_dataset("shapes_captions", "val", size=30)
    shapes = Shapes("val", size=30)
    img, cap = ds[3]
    assert cap == shapes.caption(3) and torch.equal(img, shapes[3][0])
    for attr, names in ATTRIBUTES.items():
        lab = ds.attribute_labels(attr)
        assert lab.shape == (30,)
        for i in range(30):
            assert names[lab[i]] in ds[i][1]  # the label's word is in the caption
    assert torch.equal(ds.attribute_labels("shape"), shapes.labels())
    tok = CaptionTokenizer.train(ds.captions(), 80)
    tds = TokenizedCaptions(ds, tok, 14)
    x, ids = tds[3]
    assert torch.equal(x, img) and ids.shape == (14,) and tok.decode(ids) == cap
    with pytest.raises(ValueError, match="attribute"):
        ds.attribute_labels("size")


def _png(path, seed=0, size=(20, 12)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_caption_folder_sidecars_splits_and_errors(tmp_path):
    for i in range(5):
        _png(tmp_path / f"im{i}.png", i)
        (tmp_path / f"im{i}.txt").write_text(f"picture number {i}\n")
    tr = build_dataset("caption_folder", "train", root=str(tmp_path), img_size=16, val_fraction=0.4)
    va = build_dataset("caption_folder", "val", root=str(tmp_path), img_size=16, val_fraction=0.4)
    assert len(tr) == 3 and len(va) == 2
    assert sorted(tr.captions() + va.captions()) == [f"picture number {i}" for i in range(5)]
    x, cap = va[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and cap.startswith("picture number")
    (tmp_path / "im2.txt").unlink()
    with pytest.raises(DatasetError, match=r"im2\.png has no caption file .*im2\.txt"):
        build_dataset("caption_folder", "train", root=str(tmp_path))
    (tmp_path / "im2.txt").write_text("   \n")
    with pytest.raises(DatasetError, match=r"im2\.txt is empty"):
        build_dataset("caption_folder", "train", root=str(tmp_path))
    (tmp_path / "im2.txt").write_text("fine")
    (tmp_path / "im4.png").write_bytes(b"not a png at all")
    ds = build_dataset("caption_folder", "train", root=str(tmp_path), val_fraction=0.0, augment=False)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("im4.png")][0]
    with pytest.raises(DatasetError, match=r"im4\.png"):
        ds[bad]


def test_caption_folder_csv_and_jsonl_index(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "index.csv").write_text('image,caption\n0.png,"zero, the first"\n1.png,one\n2.png,two\n')
    ds = build_dataset("caption_folder", "train", root=str(tmp_path), index="index.csv", val_fraction=0.0)
    assert ds.captions() == ["zero, the first", "one", "two"] and ds[0][0].shape == (3, 224, 224)
    lines = [json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) for i in range(3)]
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    ds = build_dataset("caption_folder", "train", root=str(tmp_path), index="index.jsonl", val_fraction=0.0)
    assert ds.captions() == ["c0", "c1", "c2"]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2"):
        build_dataset("caption_folder", "train", root=str(tmp_path), index="bad.jsonl")
    (tmp_path / "bad.csv").write_text("path,text\n0.png,x\n")
    with pytest.raises(DatasetError, match=r"bad\.csv.*'image' and 'caption'"):
        build_dataset("caption_folder", "train", root=str(tmp_path), index="bad.csv")
    (tmp_path / "gone.csv").write_text("image,caption\nmissing.png,x\n")
    ds = build_dataset("caption_folder", "train", root=str(tmp_path), index="gone.csv", val_fraction=0.0)
    with pytest.raises(DatasetNotFound, match=r"missing\.png"):
        ds[0]


def _shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _png_bytes(seed):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _shard(d / "000.tar", [("a.png", _png_bytes(0)), ("a.txt", b"first caption"),
                           ("b.png", _png_bytes(1)), ("b.txt", b"second caption")])
    _shard(d / "001.tar", [("c.png", _png_bytes(2)), ("c.txt", b"third caption")])
    ds = build_dataset("caption_wds", "train", root=str(d), img_size=8)
    assert len(ds) == 3 and ds.captions() == ["first caption", "second caption", "third caption"]
    x, cap = ds[2]
    assert x.shape == (3, 8, 8) and cap == "third caption"
    pattern = build_dataset("caption_wds", "train", root=str(d / "{000..001}.tar"), img_size=8)
    assert pattern.captions() == ds.captions()
    _shard(tmp_path / "nocap.tar", [("k1.png", _png_bytes(0))])
    with pytest.raises(DatasetError, match=r"'k1'.*nocap\.tar.*no caption"):
        build_dataset("caption_wds", "train", root=str(tmp_path / "nocap.tar"))
    _shard(tmp_path / "corrupt.tar", [("k2.png", b"garbage"), ("k2.txt", b"x")])
    ds = build_dataset("caption_wds", "train", root=str(tmp_path / "corrupt.tar"))
    with pytest.raises(DatasetError, match=r"k2\.png in shard .*corrupt\.tar"):
        ds[0]
    with pytest.raises(DatasetNotFound, match="nothere"):
        build_dataset("caption_wds", "train", root=str(tmp_path / "nothere"))
