"""init_from: the fine-tuning start of CRATE-α's light recipe (smaller patch from a larger-patch model)."""

import pytest
import torch

import ratelab
from ratelab.core.checkpoint import save_model
from ratelab.core.errors import CheckpointError
from ratelab.core.init_from import init_from
from ratelab.layers.patch import resample_pos_embed

PATCH_KEYS = ("patch_norm", "patch_proj")


def _pair(tmp_path):
    torch.manual_seed(0)
    big = ratelab.create_model("crate_pico_patch4_16", num_classes=10, img_size=16, in_chans=1)  # 4x4 grid
    save_model(big, tmp_path / "big")
    torch.manual_seed(1)
    small = ratelab.create_model("crate_pico_patch4_16", num_classes=10, img_size=16, in_chans=1, patch_size=2)
    return big, small


def test_light_recipe_start(tmp_path):
    big, small = _pair(tmp_path)
    fresh = {k: v.clone() for k, v in small.state_dict().items()}
    rep = init_from(small, tmp_path / "big", reinit=PATCH_KEYS)
    sd, src = small.state_dict(), big.state_dict()
    assert rep.resampled == ["pos_embed"]
    assert torch.allclose(sd["pos_embed"], resample_pos_embed(src["pos_embed"], (8, 8), num_prefix_tokens=1))
    for k in sd:
        if k.startswith(PATCH_KEYS):
            assert torch.equal(sd[k], fresh[k]), k  # kept at its fresh initialization
            assert k in rep.reinitialized or any(k.startswith(p) for p in rep.reinitialized)
        elif k != "pos_embed":
            assert torch.equal(sd[k], src[k]), k
    assert small(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert "re-initialized patch_norm, patch_proj" in rep.line()


def test_shape_mismatch_outside_reinit_is_an_error(tmp_path):
    _, small = _pair(tmp_path)
    with pytest.raises(CheckpointError, match="init_reinit") as e:
        init_from(small, tmp_path / "big")
    assert "patch_proj.weight" in str(e.value)


def test_reinit_prefix_typo_is_an_error(tmp_path):
    _, small = _pair(tmp_path)
    with pytest.raises(CheckpointError, match="no parameter .* starts with"):
        init_from(small, tmp_path / "big", reinit=(*PATCH_KEYS, "patch_embedd"))


def test_prefixes_are_whole_components(tmp_path):
    """'head' re-initializes head.* only, not a 'head_norm'-like sibling; reinit of the head for a new label set."""
    big, _ = _pair(tmp_path)
    torch.manual_seed(2)
    other = ratelab.create_model("crate_pico_patch4_16", num_classes=3, img_size=16, in_chans=1)
    rep = init_from(other, tmp_path / "big", reinit=("head",))
    assert rep.reinitialized == ["head"]
    assert torch.equal(other.state_dict()["fc_norm.weight"], big.state_dict()["fc_norm.weight"])


def test_other_depth_is_refused(tmp_path):
    _, _ = _pair(tmp_path)
    deeper = ratelab.create_model("crate_pico_patch4_16", num_classes=10, img_size=16, in_chans=1, depth=5)
    with pytest.raises(CheckpointError, match="missing in the source"):
        init_from(deeper, tmp_path / "big")


@pytest.mark.slow
def test_train_cli_init_from(tmp_path, capsys):
    from ratelab.cli.main import main

    base = ["train", "--model", "crate_pico_patch4_16", "--dataset", "digits", "--batch-size", "128",
            "--no-progress", "--threads", "1"]
    assert main([*base, "--epochs", "1", "--out-dir", str(tmp_path / "p4")]) == 0
    capsys.readouterr()
    assert main([*base, "--max-steps", "3", "--out-dir", str(tmp_path / "p2"), "--model-kwargs", "patch_size=2",
                 "--init-from", str(tmp_path / "p4"), "--init-reinit", "patch_norm,patch_proj"]) == 0
    out = capsys.readouterr().out
    assert "[train] init from" in out and "resampled pos_embed" in out
    assert main([*base, "--max-steps", "3", "--out-dir", str(tmp_path / "bad"), "--model-kwargs", "patch_size=2",
                 "--init-from", str(tmp_path / "p4")]) == 2
    assert "init_reinit" in capsys.readouterr().err


def test_models_keys_lists_names_and_shapes(capsys):
    from ratelab.cli.main import main

    assert main(["models", "crate_pico_patch4_16", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "crate_pico_patch4_16 (" in out and "patch_proj.weight" in out and "(64, 16)" in out
