"""``ratelab segment`` on a folder of images: masks, overlays, PCA pictures and one HTML page."""

import numpy as np
import pytest
from PIL import Image

import ratelab
from ratelab.cli.main import main
from ratelab.core.checkpoint import save_model


def _images(d, n=2, size=16, mode="L"):
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = (rng.random((size, size) if mode == "L" else (size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr, mode=mode).save(d / f"img{i}.png")
    return d


def test_segment_writes_masks_and_page(tmp_path, capsys):
    model = ratelab.create_model("crate_pico_patch4_16", num_classes=10)
    save_model(model, tmp_path / "run")
    imgs = _images(tmp_path / "imgs")
    assert main(["segment", "--checkpoint", str(tmp_path / "run"), "--images", str(imgs), "--out",
                 str(tmp_path / "out"), "--no-progress", "--n-objects", "2"]) == 0
    out = tmp_path / "out"
    for stem in ("img0", "img1"):
        for kind in ("attn", "attn_mask", "maskcut", "pca"):
            im = Image.open(out / f"{stem}_{kind}.png")
            assert im.size == (16, 16)
        assert (out / f"{stem}_mask0.png").is_file()
    # the attention mask keeps the stated share of pixels
    share = np.asarray(Image.open(out / "img0_attn_mask.png")).astype(bool).mean()
    assert share == pytest.approx(0.6, abs=1 / 16)
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 8 and "img1" in page
    assert "wrote masks" in capsys.readouterr().out


def test_segment_errors(tmp_path, capsys):
    model = ratelab.create_model("crate_pico_patch4_16", num_classes=10)
    save_model(model, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    assert main(["segment", "--checkpoint", str(tmp_path / "run"), "--images", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "no .png" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_text("not an image")
    assert main(["segment", "--checkpoint", str(tmp_path / "run"), "--images", str(bad), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "x.png" in capsys.readouterr().err
