"""Official wangf3014/Adventurer checkpoints -> ratelab, checked against an independent reference model.

The reference (tests/reference/adventurer_official_layout.py) has the official state-dict keys and is written from
the equations (own conv, own per-token recurrence); a checkpoint saved from it, wrapped as the official ``main.py``
wraps it, must reproduce its logits through ``create_model(..., checkpoint_path=...)``. Also: strict key errors and
position-embedding resampling with the class token last.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ratelab
import ratelab.models.adventurer  # noqa: F401  (registers the family)
from ratelab.core.checkpoint import CheckpointError
from ratelab.layers.patch import resample_pos_embed
from ratelab.models.adventurer import flip_flags
from ratelab.models.adventurer.convert import OFFICIAL_KEY_MAP, checkpoint_filter_fn, detect_layout

try:  # tests/ is on sys.path in pytest's default (rootdir) import mode
    from reference.adventurer_official_layout import OfficialLayoutAdventurer
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.reference.adventurer_official_layout import OfficialLayoutAdventurer

ATOL = RTOL = 1e-5


def make_reference(*, depth: int = 4, flip: str = "alternate", heading: bool = True, img: int = 8, seed: int = 0):
    """test_adventurer-shaped reference with every parameter random (norm gains, biases, D too)."""
    torch.manual_seed(seed)
    ref = OfficialLayoutAdventurer(
        img_size=img, patch_size=4, in_chans=3, num_classes=10, dim=32, depth=depth, d_state=8, headdim=16,
        flips=flip_flags(flip, depth), heading=heading,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_mlp.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") and "dt_bias" not in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith(".D"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return ref


def official_file(tmp_path: Path, ref: torch.nn.Module, wrap: str) -> Path:
    sd = ref.state_dict()
    obj = {wrap: sd, "epoch": 299} if wrap in ("model", "model_ema") else {f"module.{k}": v for k, v in sd.items()}
    path = tmp_path / f"adventurer_{wrap}.pth"
    torch.save(obj, path)
    return path


def images(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_key_map_covers_every_official_key():
    ref = make_reference()
    model = ratelab.create_model("test_adventurer", depth=4)
    assert detect_layout(ref.state_dict()) == "official" and detect_layout(model.state_dict()) == "ratelab"
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    assert set(mapped) == set(model.state_dict())
    assert all(v.shape == model.state_dict()[k].shape for k, v in mapped.items())
    layer0 = {k.replace("{i}", "0") for k in OFFICIAL_KEY_MAP}
    assert layer0 <= set(ref.state_dict())  # no dead templates


@pytest.mark.parametrize(
    ("wrap", "flip", "heading"),
    [("model", "alternate", True), ("model_ema", "legacy_2_3", True), ("module", "pairs", False)],
)
def test_official_checkpoint_parity(tmp_path, wrap, flip, heading):
    ref = make_reference(flip=flip, heading=heading)
    path = official_file(tmp_path, ref, wrap)
    model = ratelab.create_model(
        "test_adventurer", depth=4, flip=flip, heading_avg=heading, checkpoint_path=str(path)
    ).eval()
    x = images()
    with torch.no_grad():
        expected = ref(x)
        for backend in ("chunked", "ref"):
            model.set_ssd_backend(backend)
            got = model(x)
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=lambda m, b=backend: f"{b}: {m}")
        # the wrong flip schedule gives other logits: the schedule matters for ported weights
        other = ratelab.create_model("test_adventurer", depth=4, flip="none", heading_avg=heading,
                                     checkpoint_path=str(path)).eval()
        assert (other(x) - expected).abs().max() > 1e-4


def test_model_preferred_over_model_ema_unless_asked(tmp_path):
    # The official training script (DeiT-style) evaluates and reports ``model``; ``model_ema`` is opt-in.
    ref, ema = make_reference(seed=0), make_reference(seed=1)
    path = tmp_path / "both.pth"
    torch.save({"model": ref.state_dict(), "model_ema": ema.state_dict()}, path)
    model = ratelab.create_model("test_adventurer", depth=4, checkpoint_path=str(path)).eval()
    model_ema = ratelab.create_model("test_adventurer", depth=4, checkpoint_path=str(path),
                                     checkpoint_use_ema=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images()), ref(images()), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(model_ema(images()), ema(images()), atol=ATOL, rtol=RTOL)
    torch.save({"model": ref.state_dict()}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match=r"no_ema\.pth.*use_ema=True.*model_ema"):
        ratelab.create_model("test_adventurer", depth=4, checkpoint_path=str(tmp_path / "no_ema.pth"),
                             checkpoint_use_ema=True)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = make_reference().state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.1.mixer.A_log"}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing\.pth.*missing keys.*blocks\.1\.mixer\.A_log"):
        ratelab.create_model("test_adventurer", depth=4, checkpoint_path=str(tmp_path / "missing.pth"))
    extra = {**sd, "layers.0.mixer.x_proj.weight": torch.zeros(3)}
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"outside the official Adventurer layout.*layers\.0\.mixer\.x_proj"):
        ratelab.create_model("test_adventurer", depth=4, checkpoint_path=str(tmp_path / "extra.pth"))
    with pytest.raises(CheckpointError, match="depth 4 and width 32, the model has depth 2"):
        ratelab.create_model("test_adventurer", checkpoint_path=str(official_file(tmp_path, make_reference(), "model")))
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not an Adventurer checkpoint"):
        ratelab.create_model("test_adventurer", checkpoint_path=str(tmp_path / "foreign.pth"))


def test_pos_embed_resize_keeps_the_class_token_last(tmp_path):
    ref = make_reference(img=8)  # 2x2 grid + class token
    path = official_file(tmp_path, ref, "model")
    model = ratelab.create_model("test_adventurer", depth=4, img_size=16, checkpoint_path=str(path))  # 4x4 grid
    file_pe = ref.pos_embed.detach()
    got = model.pos_embed.detach()
    assert got.shape == (1, 17, 32)
    torch.testing.assert_close(got[:, -1], file_pe[:, -1], atol=0, rtol=0)  # class token's row, unchanged
    grid = torch.nn.functional.interpolate(
        file_pe[:, :4].reshape(1, 2, 2, 32).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).reshape(1, 16, 32)
    torch.testing.assert_close(got[:, :16], grid)
    # the official fine-tune bug (§1.8) would keep the FIRST row and fold the class token into the grid
    buggy = resample_pos_embed(file_pe, (4, 4), num_prefix_tokens=1, prefix_last=False)
    assert not torch.allclose(buggy[:, -1], file_pe[:, -1])
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(images(size=16))).all()
