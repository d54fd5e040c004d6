"""Weights registry: ``create_model(name, pretrained=True)`` from a local weights directory, and ``ratelab weights``.

Files are written in the official layouts by the independent references of tests/reference/ (random weights, the
release's real widths at reduced depth), placed where the registry looks for them under a temporary
``RATELAB_WEIGHTS``, and must reproduce the reference's outputs after conversion. Also: sha256 checks, the errors for
missing / unreleased / unknown weights, the table's own consistency, and the CLI listing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import ratelab
from ratelab.cli.main import main
from ratelab.core.checkpoint import load_model, save_model
from ratelab.core.errors import CheckpointError, ConfigError, UnknownNameError, WeightsNotFound
from ratelab.models import _pretrained as pt
from ratelab.models.adventurer import flip_flags

try:  # tests/ is on sys.path in pytest's default (rootdir) import mode
    from reference.adventurer_official_layout import OfficialLayoutAdventurer
    from reference.crate_official_layout import OfficialLayoutCrate
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests.reference.adventurer_official_layout import OfficialLayoutAdventurer
    from tests.reference.crate_official_layout import OfficialLayoutCrate

ATOL = RTOL = 1e-5


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty weights directory as $RATELAB_WEIGHTS, and a table restored after the test."""
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv(pt.ENV_VAR, str(root))
    monkeypatch.setattr(pt, "_PRETRAINED", dict(pt._PRETRAINED))
    return root


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Norm gains and biases random too, so a swapped or dropped key changes the output.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm_mlp.weight", "norm_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias") and "dt_bias" not in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith(".D"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
    return module.eval()


def crate_small_reference(depth: int = 2, num_classes: int = 1000) -> OfficialLayoutCrate:
    """CRATE-S/16 at 224 (576 wide, 12 heads of 48) in the Ma-Lab-Berkeley/CRATE layout, fewer layers."""
    torch.manual_seed(0)
    ref = OfficialLayoutCrate(image_size=224, patch_size=16, num_classes=num_classes, dim=576, depth=depth, heads=12,
                              dim_head=48)
    return _randomize(ref, seed=1)


def adventurer_reference(*, dim: int, depth: int, img: int, patch: int, d_state: int, headdim: int,
                         seed: int = 0) -> OfficialLayoutAdventurer:
    torch.manual_seed(seed)
    ref = OfficialLayoutAdventurer(img_size=img, patch_size=patch, in_chans=3, num_classes=1000 if img > 16 else 10,
                                   dim=dim, depth=depth, d_state=d_state, headdim=headdim,
                                   flips=flip_flags("legacy_2_3", depth), heading=True)
    return _randomize(ref, seed=seed + 1)


def place(weights: Path, name: str, obj: object) -> Path:
    """Save ``obj`` where the registry expects the release ``name``."""
    path = weights / pt.get_pretrained_cfg(name).file
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def images(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (actual - expected).abs().max()
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: max {diff:.3g}\n{m}")


# ---- loading releases ---------------------------------------------------------------------------------------------
def test_crate_release_loads_with_parity(weights):
    ref = crate_small_reference()
    sd = ref.state_dict()
    # what the official main.py writes: DataParallel keys inside "state_dict", loose entries beside it
    place(weights, "crate_small_patch16_224.in1k",
          {"epoch": 3, "arch": "CRATE_small", "state_dict": {f"module.{k}": v for k, v in sd.items()},
           "best_acc1": torch.tensor(69.2)})  # fmt: skip
    model = ratelab.create_model("crate_small_patch16_224", pretrained=True, depth=2).eval()
    x = images(224)
    with torch.no_grad():
        close(model(x), ref(x), "logits")
        close(model.forward_features(x), ref.tokens(x), "tokens")
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "crate_small_patch16_224" and cfg["tag"] == "in1k"
    assert cfg["mean"] == pt.IMAGENET_MEAN and cfg["std"] == pt.IMAGENET_STD and cfg["input_size"] == (3, 224, 224)
    assert cfg["interpolation"] == "bilinear" and model.num_classes == 1000


def test_adventurer_release_loads_with_parity(weights):
    # Adventurer-T's real widths (256, Mamba-2 heads of 64, state 64) and patch 16, at 112 px (the reference's
    # per-token scan is slow) and 4 blocks so that the release's flip schedule (legacy_2_3: blocks 2 and 3) is
    # exercised; the file holds model and model_ema like the official one.
    ref = adventurer_reference(dim=256, depth=4, img=112, patch=16, d_state=64, headdim=64)
    ema = adventurer_reference(dim=256, depth=4, img=112, patch=16, d_state=64, headdim=64, seed=7)
    place(weights, "adventurer_tiny_patch16_224.in1k", {"model": ref.state_dict(), "model_ema": ema.state_dict(),
                                                         "epoch": 299})
    model = ratelab.create_model("adventurer_tiny_patch16_224", pretrained=True, depth=4, img_size=112).eval()
    assert model.cfg.flip == "legacy_2_3"  # the release's model_kwargs
    x = images(112, batch=1)
    with torch.no_grad():
        close(model(x), ref(x), "logits")


def test_tagged_release_brings_its_architecture(weights, tmp_path):
    # A release trained at another resolution: the tag's model_kwargs build the model at its size. A table entry for
    # the tiny test model keeps this cheap; it goes through the same code as adventurer_base_patch16_224.in1k_384.
    pt.register_pretrained(pt.PretrainedCfg(
        name="test_adventurer.unit_16", url="https://example.invalid/adv16.pth", file="unit/adv16.pth",
        input_size=(3, 16, 16), num_classes=10, model_kwargs={"img_size": 16, "depth": 4, "flip": "legacy_2_3"},
        converter="ratelab.models.adventurer.convert:checkpoint_filter_fn",
    ))  # fmt: skip
    ref = adventurer_reference(dim=32, depth=4, img=16, patch=4, d_state=8, headdim=16)
    place(weights, "test_adventurer.unit_16", {"model": ref.state_dict()})
    model = ratelab.create_model("test_adventurer.unit_16", pretrained=True).eval()
    assert model.img_size == 16 and model.pretrained_cfg["input_size"] == (3, 16, 16)
    x = images(16)
    with torch.no_grad():
        close(model(x), ref(x), "logits")
    # without pretrained the tag still selects the architecture; a bare name keeps the entry point's defaults
    assert ratelab.create_model("test_adventurer.unit_16").cfg.depth == 4
    assert ratelab.create_model("test_adventurer").cfg.depth == 2
    # save -> load rebuilds the release's architecture from model_args, bit for bit
    save_model(model, tmp_path / "saved")
    back = load_model(tmp_path / "saved").eval()
    assert json.loads((tmp_path / "saved" / "model_config.json").read_text())["model_args"]["flip"] == "legacy_2_3"
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_other_num_classes_keeps_everything_but_the_head(weights):
    ref = crate_small_reference()
    place(weights, "crate_small_patch16_224.in1k", ref.state_dict())
    torch.manual_seed(11)
    model = ratelab.create_model("crate_small_patch16_224", pretrained=True, depth=2, num_classes=7).eval()
    torch.manual_seed(11)
    fresh = ratelab.create_model("crate_small_patch16_224", depth=2, num_classes=7)
    assert model.head.weight.shape == (7, 576)
    x = images(224)
    with torch.no_grad():
        close(model.forward_features(x), ref.tokens(x), "tokens")
        close(model.fc_norm.weight, ref.mlp_head[0].weight, "head norm (kept)")
    # the classifier is the model's own fresh init (same seed -> same as a model built without weights)
    torch.testing.assert_close(model.head.weight, fresh.head.weight, atol=0, rtol=0)
    headless = ratelab.create_model("crate_small_patch16_224", pretrained=True, depth=2, num_classes=0)
    with torch.no_grad():
        assert headless(x).shape == (2, 576)


# ---- integrity and errors -----------------------------------------------------------------------------------------
def _unit_crate_entry(sha256: str | None) -> pt.PretrainedCfg:
    return pt.PretrainedCfg(name="test_crate.unit", url="https://example.invalid/test_crate.pth",
                            file="unit/test_crate.pth", sha256=sha256, input_size=(3, 8, 8), num_classes=10,
                            converter="ratelab.models.crate.convert:checkpoint_filter_fn")


def test_sha256_is_checked(weights):
    torch.manual_seed(0)
    ref = _randomize(OfficialLayoutCrate(image_size=8, patch_size=4, num_classes=10, dim=32, depth=2, heads=2,
                                         dim_head=16), seed=3)
    pt.register_pretrained(_unit_crate_entry(None))
    path = place(weights, "test_crate.unit", ref.state_dict())
    actual = hashlib.sha256(path.read_bytes()).hexdigest()

    pt._PRETRAINED["test_crate.unit"] = _unit_crate_entry(actual)
    model = ratelab.create_model("test_crate.unit", pretrained=True).eval()
    with torch.no_grad():
        close(model(images(8)), ref(images(8)), "logits")

    wrong = "0" * 64
    pt._PRETRAINED["test_crate.unit"] = _unit_crate_entry(wrong)
    with pytest.raises(CheckpointError) as info:
        ratelab.create_model("test_crate.unit", pretrained=True)
    msg = str(info.value)
    assert str(path) in msg and f"expected {wrong}" in msg and f"got {actual}" in msg, msg
    assert not isinstance(info.value, WeightsNotFound)


def test_missing_file_names_path_and_url(weights):
    cfg = pt.get_pretrained_cfg("adventurer_small_patch16_224")
    with pytest.raises(WeightsNotFound) as info:
        ratelab.create_model("adventurer_small_patch16_224", pretrained=True)
    msg = str(info.value)
    assert str(weights / cfg.file) in msg and cfg.url in msg and "never downloads" in msg, msg
    assert isinstance(info.value, FileNotFoundError)
    assert not any(weights.iterdir())  # nothing was written (or downloaded) there


def test_unreleased_and_unregistered_weights(weights):
    with pytest.raises(WeightsNotFound, match="no official weights were released for crate_tiny_patch16_224.in1k"):
        ratelab.create_model("crate_tiny_patch16_224", pretrained=True)
    with pytest.raises(WeightsNotFound, match="no pretrained weights are registered for 'test_crate'"):
        ratelab.create_model("test_crate", pretrained=True)
    with pytest.raises(UnknownNameError, match=r"no pretrained weights named 'crate_small_patch16_224\.in21k'.*"
                                               r"did you mean 'crate_small_patch16_224\.in1k'"):
        ratelab.create_model("crate_small_patch16_224.in21k")
    with pytest.raises(ConfigError, match="not both"):
        ratelab.create_model("crate_small_patch16_224", pretrained=True, checkpoint_path="x.pth")


def test_an_entry_whose_model_is_still_to_come_is_an_unknown_model(weights):
    """Every release of the research notes has its model now (dpcap and var were the last, issues 13 and 14); an
    entry registered before its model still fails as an unknown model, saying so."""
    pt.register_pretrained(replace(_unit_crate_entry(None), name="crate_future_patch16_224.unit"))
    with pytest.raises(UnknownNameError, match="not implemented yet"):
        ratelab.create_model("crate_future_patch16_224.unit", pretrained=True)
    assert all(ratelab.models._factory.is_model(pt.get_pretrained_cfg(n).architecture)
               for n in pt.list_pretrained() if n != "crate_future_patch16_224.unit")


# ---- the table ----------------------------------------------------------------------------------------------------
def test_table_covers_the_releases_of_the_research_notes():
    names = set(pt.list_pretrained())
    expected = {
        *(f"crate_{s}_patch16_224.in1k" for s in ("tiny", "small", "base", "large")),
        "crate_mae_base_patch16_224.in1k",
        "crate_alpha_base_patch16_224.in21k_ft_in1k", "crate_alpha_large_patch14_224.in21k_ft_in1k",
        *(f"adventurer_{s}_patch16_224.in1k" for s in ("tiny", "small", "base", "large")),
        "adventurer_base_patch8_224.in1k", "adventurer_base_patch16_224.in1k_384",
        "adventurer_base_patch16_224.in1k_448", "adventurer_base_patch8_224.in1k_448",
        "var_vae_ch160v4096z32.official", *(f"var_d{d}.in1k_256" for d in (16, 20, 24, 30)),
        *(f"mvar_d{d}.in1k_256" for d in (16, 20, 24, 32)),
        "dpcap_base_patch16_224.metaclip_eps7",
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("name", pt.list_pretrained())
def test_every_entry_is_consistent(name):
    cfg = pt.get_pretrained_cfg(name)
    assert cfg.name == name
    assert cfg.file is None or not Path(cfg.file).is_absolute()
    if cfg.released:
        assert cfg.url.startswith("https://") and cfg.origin.startswith("https://github.com/")
    assert cfg.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", cfg.sha256)
    assert set(cfg.unverified) <= {*cfg.to_dict(), "model_kwargs.flip", "model depth"}, cfg.unverified
    assert cfg.input_size is None or len(cfg.input_size) == 3
    assert (cfg.mean is None) == (cfg.std is None)
    assert re.fullmatch(r"ratelab\.models\.\w+\.convert:checkpoint_filter_fn", cfg.converter or ""), cfg.converter
    if ratelab.models._factory.is_model(cfg.architecture):
        # the converter resolves to the family's filter, and the release's architecture builds with its head width
        module, _, attr = cfg.converter.partition(":")
        family = ratelab.models._factory.model_family(cfg.architecture)
        assert module == f"ratelab.models.{family}.convert"
        filt = getattr(__import__(module, fromlist=[attr]), attr)
        assert callable(filt)
        with torch.device("meta"):
            model = ratelab.create_model(name)
        assert model.num_classes == cfg.num_classes and model.pretrained_cfg["tag"] == cfg.tag
        if "img_size" in cfg.model_kwargs:
            assert model.img_size == cfg.input_size[-1]


def test_pretrained_cfg_without_pretrained():
    # the default release's preprocessing is there for data pipelines; the architecture stays the entry point's
    model = ratelab.create_model("adventurer_tiny_patch16_224", depth=1)
    assert model.pretrained_cfg["tag"] == "in1k" and model.cfg.flip == "alternate"
    own = ratelab.create_model("test_crate").pretrained_cfg
    assert own["tag"] is None and own["mean"] is None and own["input_size"] == (3, 8, 8)
    overlay = ratelab.create_model("test_crate", pretrained_cfg_overlay={"mean": (0.5,), "std": (0.25,)})
    assert overlay.pretrained_cfg["mean"] == (0.5,) and overlay.pretrained_cfg["std"] == (0.25,)


def test_register_pretrained_refuses_duplicates_and_bad_entries(weights):
    with pytest.raises(ValueError, match="already registered"):
        pt.register_pretrained(pt.get_pretrained_cfg("var_d16"))
    base = _unit_crate_entry(None)
    with pytest.raises(ValueError, match="architecture.tag"):
        replace(base, name="test_crate")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        replace(base, sha256="ABC")
    with pytest.raises(ValueError, match="both url and file"):
        replace(base, url=None)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_weights_list(weights, capsys):
    place(weights, "crate_small_patch16_224.in1k", crate_small_reference(depth=1).state_dict())
    assert main(["weights", "list", "crate_*"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith((" ", "weights directory"))}
    small = pt.get_pretrained_cfg("crate_small_patch16_224.in1k")
    assert re.search(r"^crate_small_patch16_224\.in1k\s+present\s+" + re.escape(str(weights / small.file)),
                     lines["crate_small_patch16_224.in1k"])
    assert "not released" in lines["crate_tiny_patch16_224.in1k"]
    mae = pt.get_pretrained_cfg("crate_mae_base_patch16_224.in1k")
    assert "missing" in lines[mae.name] and "[model not implemented yet]" not in lines[mae.name]
    assert f"    get it from {mae.url}" in out and f"get it from {small.url}" not in out  # URL only when missing
    assert f"weights directory: {weights}" in out
    assert re.search(r"\d+ entries: .*1 present", out)
    assert main(["weights", "list", "var_d16*"]) == 0
    assert "[model not implemented yet]" not in capsys.readouterr().out  # VAR is implemented (issue 13)

    pt.register_pretrained(_unit_crate_entry("0" * 64))
    place(weights, "test_crate.unit", {"x": torch.zeros(1)})
    assert main(["weights", "list", "test_crate*"]) == 0
    assert "sha256 MISMATCH" in capsys.readouterr().out


def test_cli_weights_info_and_errors(weights, capsys):
    assert main(["weights", "info", "mvar_d16"]) == 0
    out = capsys.readouterr().out
    cfg = pt.get_pretrained_cfg("mvar_d16")
    assert out.startswith(cfg.name + "\n")
    assert re.search(r"file:\s+OliverRen/M-VAR/d16.pth  \(unverified\)", out)
    assert re.search(r"model:\s+implemented", out) and re.search(r"status:\s+missing", out)
    assert "huggingface-cli download OliverRen/M-VAR d16.pth" in out
    path = place(weights, "var_d16.in1k_256", {"x": torch.ones(2)})
    assert main(["weights", "info", "var_d16"]) == 0
    out = capsys.readouterr().out
    assert f"file sha256:    {hashlib.sha256(path.read_bytes()).hexdigest()}" in out
    assert "status:         present" in out
    assert main(["weights", "list", "nothing_like_this*"]) == 2
    assert "no weights entry matches" in capsys.readouterr().err
