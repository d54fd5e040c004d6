"""Official Ma-Lab-Berkeley/CRATE checkpoints -> ratelab, checked against an independent reference model.

The reference (tests/reference/crate_official_layout.py) has the official state-dict keys and is written from the
equations; a converted checkpoint must reproduce its logits and tokens. Also: container formats, position-embedding
resampling, clear errors for files that do not fit, unsafe pickles, and ratelab's own format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import ratelab
from ratelab.core.checkpoint import CheckpointError, atomic_torch_save, load_model, save_model
from ratelab.layers.patch import resample_pos_embed
from ratelab.models.crate.convert import OFFICIAL_KEY_MAP, checkpoint_filter_fn, convert_official, detect_layout

try:  # tests/ is on sys.path in pytest's default (rootdir) import mode
    from reference.crate_official_layout import OfficialLayoutCrate
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.reference.crate_official_layout import OfficialLayoutCrate

# Converted weights give the same computation in a different op order (fused ISTA, SDPA): fp32 rounding only.
ATOL = RTOL = 1e-5


# name -> (ratelab model name, ratelab overrides, reference kwargs)
CONFIGS = {
    "test": ("test_crate", {}, dict(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)),
    "wide_heads": (
        "test_crate",
        dict(embed_dim=32, num_heads=4, head_dim=16, depth=2),
        dict(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=4, dim_head=16),
    ),
    # heads == 1 and dim_head == dim: the official Attention has no output map (Identity), so no to_out keys.
    "one_head": (
        "test_crate",
        dict(embed_dim=32, num_heads=1, depth=2),
        dict(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=1, dim_head=32),
    ),
    # CRATE-T/16 at 224 with 2 layers: the real stem shapes (768-wide patches, 14x14 grid) at test speed.
    "tiny16_224_d2": (
        "crate_tiny_patch16_224",
        dict(depth=2),
        dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=2, heads=6, dim_head=64),
    ),
}


def make_reference(seed: int = 0, **kw) -> OfficialLayoutCrate:
    """Reference with every parameter random (norm gains and biases too, so swapped keys change the output)."""
    torch.manual_seed(seed)
    ref = OfficialLayoutCrate(**kw).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or (p.ndim == 1 and "weight" in name):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return ref


def images(ref_kw: dict, batch: int = 2, seed: int = 1, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = size or ref_kw["image_size"]
    return torch.randn(batch, ref_kw.get("channels", 3), s, s, generator=g)


def official_file(tmp_path: Path, ref: torch.nn.Module, wrap: str = "plain", name: str = "crate.pth") -> Path:
    sd = ref.state_dict()
    if wrap == "model":
        obj = {"model": sd}
    elif wrap == "state_dict":
        obj = {"state_dict": sd}
    elif wrap == "module":
        obj = {f"module.{k}": v for k, v in sd.items()}
    elif wrap == "training":  # what the official main.py writes: DataParallel keys next to loose tensors
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
        obj = {
            "epoch": 3,
            "arch": "CRATE_tiny",
            "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "best_acc1": torch.tensor(66.7),
            "optimizer": opt.state_dict(),
        }
    else:
        obj = sd
    path = tmp_path / name
    torch.save(obj, path)
    return path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (actual - expected).abs()
    torch.testing.assert_close(
        actual,
        expected,
        atol=ATOL,
        rtol=RTOL,
        msg=lambda m: f"{what}: max {diff.max():.3g} mean {diff.mean():.3g}\n{m}",
    )


# ---- key map ------------------------------------------------------------------------------------------------------
def test_key_map_covers_every_official_key():
    ref = make_reference(**CONFIGS["test"][2])
    model = ratelab.create_model("test_crate")
    mapped = checkpoint_filter_fn(ref.state_dict(), model)
    assert set(mapped) == set(model.state_dict())
    for k, v in mapped.items():
        assert v.shape == model.state_dict()[k].shape, k
    # Every template is used by some key (no dead entries in the literal map).
    layer0 = {k.replace("{i}", "0") for k in OFFICIAL_KEY_MAP}
    assert layer0 <= set(ref.state_dict())


def test_converter_called_directly_strips_wrapper_prefixes():
    # The skeleton strips DDP / torch.compile / opacus prefixes itself (any nesting), so the converter also works
    # when handed a raw state dict, e.g. through timm's load_checkpoint(filter_fn=...).
    ref = make_reference(**CONFIGS["test"][2])
    model = ratelab.create_model("test_crate")
    plain = checkpoint_filter_fn(ref.state_dict(), model)
    wrapped = checkpoint_filter_fn({f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}, model)
    assert wrapped.keys() == plain.keys() == model.state_dict().keys()
    assert all(torch.equal(wrapped[k], plain[k]) for k in plain)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_official_checkpoint_matches_reference(tmp_path, config):
    name, overrides, ref_kw = CONFIGS[config]
    ref = make_reference(**ref_kw)
    if config == "one_head":
        assert not any("to_out" in k for k in ref.state_dict())
    path = official_file(tmp_path, ref)
    model = ratelab.create_model(name, checkpoint_path=str(path), **overrides).eval()
    x = images(ref_kw, batch=2 if ref_kw["image_size"] > 8 else 4)
    with torch.no_grad():
        keep: list[torch.Tensor] = []
        ref_tokens = ref.tokens(x, keep)
        assert_close(model.forward_features(x), ref_tokens, "tokens")
        assert_close(model(x), ref(x), "logits")
        inter = model.forward_layer_quantities(x)  # full layer outputs, [CLS] included
        for i, (ours, theirs) in enumerate(zip(inter["tokens"], keep, strict=True)):
            assert_close(ours, theirs, f"layer {i} tokens")


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module", "training"])
def test_official_containers(tmp_path, wrap):
    _, _, ref_kw = CONFIGS["test"]
    ref = make_reference(seed=3, **ref_kw)
    path = official_file(tmp_path, ref, wrap=wrap, name="checkpoint.pth.tar")
    model = ratelab.create_model("test_crate", checkpoint_path=str(path)).eval()
    x = images(ref_kw)
    with torch.no_grad():
        assert_close(model(x), ref(x), f"logits ({wrap})")


def test_official_into_features_only_model(tmp_path):
    _, _, ref_kw = CONFIGS["test"]
    ref = make_reference(**ref_kw)
    model = ratelab.create_model("test_crate", num_classes=0, checkpoint_path=str(official_file(tmp_path, ref)))
    x = images(ref_kw)
    with torch.no_grad():
        assert_close(model.forward_features(x), ref.tokens(x), "tokens")
        assert model(x).shape == (x.shape[0], 32)


def test_pos_embed_resampled_for_other_img_size(tmp_path):
    _, _, ref_kw = CONFIGS["test"]
    ref = make_reference(**ref_kw)  # 8x8 images, 2x2 grid
    model = ratelab.create_model("test_crate", img_size=16, checkpoint_path=str(official_file(tmp_path, ref)))
    assert model.pos_embed.shape == (1, 1 + 16, 32)
    expected = resample_pos_embed(ref.pos_embedding.detach(), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    torch.testing.assert_close(model.pos_embed[:, 0].detach(), ref.pos_embedding[:, 0].detach())  # [CLS] kept
    with torch.no_grad():
        out = model(images(ref_kw, size=16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()

    # ratelab's own layout goes through the same resampling.
    small = ratelab.create_model("test_crate")
    save_model(small, tmp_path / "own")
    big = ratelab.create_model("test_crate", img_size=16, checkpoint_path=str(tmp_path / "own"))
    torch.testing.assert_close(big.pos_embed.detach(), resample_pos_embed(small.pos_embed.detach(), (4, 4)))


# ---- files that do not fit ----------------------------------------------------------------------------------------
def _raises(path: Path, *needles: str, name: str = "test_crate", **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        ratelab.create_model(name, checkpoint_path=str(path), **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


def test_official_deeper_file_is_refused(tmp_path):
    ref = make_reference(**{**CONFIGS["test"][2], "depth": 3})
    _raises(official_file(tmp_path, ref), "depth 3", "transformer.layers.2.0.norm.weight")


def test_official_shallower_file_is_refused(tmp_path):
    ref = make_reference(**{**CONFIGS["test"][2], "depth": 1})
    _raises(official_file(tmp_path, ref), "depth 1", "blocks.1.ista.weight")


def test_official_wider_file_is_refused(tmp_path):
    ref = make_reference(**{**CONFIGS["test"][2], "dim": 48, "dim_head": 24})
    _raises(official_file(tmp_path, ref), "width 48", "cls_token (1, 1, 48)")


def test_official_unknown_key_is_refused(tmp_path):
    sd = make_reference(**CONFIGS["test"][2]).state_dict()
    sd["transformer.layers.0.0.fn.gate"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    _raises(path, "transformer.layers.0.0.fn.gate")


def test_official_other_head_width_is_refused(tmp_path):
    ref = make_reference(**{**CONFIGS["test"][2], "num_classes": 7})
    _raises(official_file(tmp_path, ref), "head.weight", "(7, 32)")


def test_random_dict_is_refused(tmp_path):
    path = tmp_path / "random.pth"
    torch.save({"foo": torch.zeros(2), "bar.weight": torch.ones(3, 3)}, path)
    _raises(path, "not a CRATE checkpoint", "bar.weight", "foo")


def test_vit_state_dict_is_refused(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    _raises(path, "not a CRATE checkpoint", "ViT", "blocks.0.attn.qkv.weight")


def test_ratelab_layout_other_depth_is_refused(tmp_path):
    deep = ratelab.create_model("test_crate", depth=3)
    save_model(deep, tmp_path / "deep")
    _raises(tmp_path / "deep" / "model.safetensors", "unexpected keys", "blocks.2.")


def test_non_tensor_file_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    _raises(path, "expected a dict of tensors")
    path2 = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "x"}, path2)
    _raises(path2, "no state dict found", "epoch")
    _raises(tmp_path / "missing.pth", "not found")


class _RunsCode:
    """Unpickling this calls ``print("pwned")``; harmless even if it ran, and it must not run."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_code_running_pickle_is_refused(tmp_path, capsys):
    sd = make_reference(**CONFIGS["test"][2]).state_dict()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "payload": _RunsCode()}, path)
    msg = _raises(path, "refused", "could run arbitrary code", "GLOBAL print")
    assert "weights_only=False" not in msg and "will likely succeed" not in msg, msg  # torch's advice is not relayed
    assert "pwned" not in capsys.readouterr().out, msg


# ---- ratelab's own format -----------------------------------------------------------------------------------------
def test_own_format_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ratelab.create_model("test_crate", num_classes=5, img_size=12).eval()
    out_dir = tmp_path / "export"
    save_model(model, out_dir)
    meta = json.loads((out_dir / "model_config.json").read_text())
    assert meta["model"] == "test_crate" and meta["kwargs"]["num_classes"] == 5 and meta["arch"]["depth"] == 2
    x = torch.randn(2, 3, 12, 12)
    back = load_model(out_dir).eval()
    again = ratelab.create_model("test_crate", num_classes=5, img_size=12, checkpoint_path=str(out_dir)).eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(back(x), expected, atol=0, rtol=0)
        torch.testing.assert_close(again(x), expected, atol=0, rtol=0)


def test_checkpoint_path_run_dir(tmp_path):
    torch.manual_seed(0)
    model = ratelab.create_model("test_crate").eval()
    run = tmp_path / "run"
    opt = torch.optim.AdamW(model.parameters())
    atomic_torch_save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7}, run / "checkpoints/last.pt"
    )
    loaded = ratelab.create_model("test_crate", checkpoint_path=str(run)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_convert_official_writes_ratelab_format(tmp_path):
    name, overrides, ref_kw = CONFIGS["wide_heads"]
    ref = make_reference(**{**ref_kw, "num_classes": 6})
    out = convert_official(official_file(tmp_path, ref, wrap="training"), tmp_path / "conv", name, **overrides)
    assert out.name == "model.safetensors" and out.exists()
    model = load_model(tmp_path / "conv").eval()
    assert model.num_classes == 6 and model.cfg.head_dim == 16
    x = images(ref_kw)
    with torch.no_grad():
        assert_close(model(x), ref(x), "logits after convert_official")
    from safetensors.torch import load_file

    assert detect_layout(load_file(str(out))) == "ratelab"
    with pytest.raises(CheckpointError, match="not an official"):
        convert_official(out, tmp_path / "again", name)
    assert not os.path.exists(tmp_path / "again")
