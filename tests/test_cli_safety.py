"""What the CLI and the loaders say about bad inputs: pickles that would run code, weights of another family, splits a
dataset does not have; and the files they write (one mode for every file, no noise for models built directly)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import ratelab
from ratelab.cli.main import main
from ratelab.core.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    atomic_write_text,
    current_umask,
    load_model,
    read_state_dict,
    save_model,
)

# ---- pickles that would run code ---------------------------------------------------------------------------------

CALLS: list[str] = []


def _record(what: str) -> str:
    CALLS.append(what)
    return what


class _RunsCode:
    """Unpickling calls ``_record`` (harmless, but it must not happen)."""

    def __reduce__(self):
        return (_record, ("unpickled",))


class _RunsGetcwd:
    def __reduce__(self):
        return (os.getcwd, ())


def _evil(path: Path, *, legacy: bool = False, payload=None) -> Path:
    state = {"model": {"w": torch.zeros(2)}, "payload": payload if payload is not None else _RunsCode(),
             "config": {"model": "test_crate"}, "model_config": {"model": "test_crate"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def _assert_refusal(msg: str) -> None:
    assert "refused to load" in msg and "could run arbitrary code" in msg, msg
    # torch's own advice for trusted files must not be relayed for a file that would run code.
    for advice in ("weights_only=False", "weights_only` set to `False", "will likely succeed", "safe_globals",
                   "allowlist"):
        assert advice not in msg, (advice, msg)


@pytest.fixture(autouse=True)
def _no_calls():
    CALLS.clear()
    yield
    assert CALLS == [], "a pickle in a weights file was executed"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_library_loaders_refuse_code_running_pickles(tmp_path, legacy):
    from ratelab.core.dist import get_dist_info
    from ratelab.train.strategy import build_strategy
    from ratelab.train.trainer import read_checkpoint_config

    pt = _evil(tmp_path / "evil.pt", legacy=legacy)
    run = tmp_path / "run"
    _evil(run / "checkpoints" / "last.pt", legacy=legacy)
    model = ratelab.create_model("test_crate")
    calls = {
        "read_state_dict": lambda: read_state_dict(pt),
        "load_model": lambda: load_model(pt),
        "create_model checkpoint_path": lambda: ratelab.create_model("test_crate", checkpoint_path=str(pt)),
        "read_checkpoint_config": lambda: read_checkpoint_config(run),
        "strategy.load_checkpoint": lambda: build_strategy("ddp", get_dist_info("cpu")).load_checkpoint(
            pt, model=model, optimizers={}),
    }
    for name, call in calls.items():
        with pytest.raises(CheckpointError) as err:
            call()
        _assert_refusal(str(err.value))
        assert str(pt if name != "read_checkpoint_config" else run / "checkpoints" / "last.pt") in str(err.value)


def test_sharded_checkpoint_metadata_is_checked_before_torch_unpickles_it(tmp_path):
    # torch.distributed.checkpoint reads .metadata with a bare pickle.load; the FSDP strategy checks it first.
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from ratelab.train.strategy import check_dcp_metadata

    m = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in one process"
        dcp.save({"model": m.state_dict()}, checkpoint_id=str(tmp_path / "good"))
    check_dcp_metadata(tmp_path / "good")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps({"meta": _RunsCode()}))
    with pytest.raises(CheckpointError, match=r"refused.*could run arbitrary code.*_record"):
        check_dcp_metadata(tmp_path / "evil")
    with pytest.raises(CheckpointError, match="missing"):
        check_dcp_metadata(tmp_path)


def test_refusal_names_the_global(tmp_path):
    with pytest.raises(CheckpointError, match=r"GLOBAL posix\.getcwd") as err:
        read_state_dict(_evil(tmp_path / "cwd.pt", payload=_RunsGetcwd()))
    _assert_refusal(str(err.value))
    # A corrupt file is refused too, described as such.
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"garbage\x00\x01" * 8)
    with pytest.raises(CheckpointError, match="corrupt file") as err:
        read_state_dict(bad)
    _assert_refusal(str(err.value))


def test_cli_commands_refuse_code_running_pickles(tmp_path, capsys):
    pt = _evil(tmp_path / "evil.pt")
    run = tmp_path / "run"
    _evil(run / "checkpoints" / "last.pt")
    for argv in (
        ["eval", "--checkpoint", str(pt), "--dataset", "digits"],
        ["measure", "--checkpoint", str(pt), "--out", str(tmp_path / "m")],
        ["train", "--out-dir", str(run), "--resume"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line, no traceback
        _assert_refusal(err)


# ---- weights of another family --------------------------------------------------------------------------------------


def _family_error(name: str, weights: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        ratelab.create_model(name, checkpoint_path=str(weights))
    return str(err.value)


def test_foreign_weights_name_the_family_they_match(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    adv = save_model(ratelab.create_model("test_adventurer"), tmp_path / "adv")
    crate = save_model(ratelab.create_model("test_crate"), tmp_path / "crate")
    vit = tmp_path / "vit.pth"
    torch.save(VisionTransformer(img_size=8, patch_size=4, embed_dim=32, depth=2, num_heads=2).state_dict(), vit)

    msg = _family_error("test_crate", adv)
    assert "not a CRATE checkpoint" in msg
    assert "These keys match an Adventurer checkpoint (ratelab layout; use an adventurer_* model)" in msg
    assert "ViT" not in msg
    msg = _family_error("test_adventurer", crate)
    assert "not an Adventurer checkpoint" in msg
    assert "These keys match a CRATE checkpoint (ratelab layout; use a crate_* model)" in msg
    for name in ("test_crate", "test_adventurer"):
        msg = _family_error(name, vit)
        assert "These keys match a timm/DeiT ViT checkpoint (no ratelab family has this layout)" in msg
        assert "Adventurer checkpoint (" not in msg and "CRATE checkpoint (" not in msg


def test_official_adventurer_layout_is_named_too(tmp_path):
    from ratelab.models.adventurer.convert import OFFICIAL_KEY_MAP

    own = ratelab.create_model("test_adventurer").state_dict()
    back = {v: k for k, v in OFFICIAL_KEY_MAP.items()}
    official = {}
    for key, value in own.items():
        for dst, src in back.items():
            if "{i}" in dst:
                prefix, suffix = dst.split("{i}")
                if key.startswith(prefix) and key.endswith(suffix):
                    i = key[len(prefix):len(key) - len(suffix)]
                    if i.isdigit():
                        official[src.replace("{i}", i)] = value
                        break
            elif key == dst:
                official[src] = value
                break
    path = tmp_path / "official.pth"
    torch.save({"model": official}, path)
    msg = _family_error("test_crate", path)
    assert "These keys match an Adventurer checkpoint (official wangf3014/Adventurer layout" in msg


# ---- splits a dataset does not have -------------------------------------------------------------------------------


def test_eval_test_split_of_digits_is_an_error(tmp_path, capsys):
    save_model(ratelab.create_model("test_crate", in_chans=1, img_size=16, num_classes=10), tmp_path / "m")
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--dataset", "digits", "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "dataset 'digits' has no split 'test'; valid splits: train, val" in err and "no held-out test" in err
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--dataset", "digits", "--split", "val"]) == 0
    assert "on digits/val (359 items)" in capsys.readouterr().out


def test_eval_names_the_split_it_evaluated(tmp_path, capsys):
    # CIFAR has no validation set: "val" is its test set, and the output says "test".
    import numpy as np

    def dump(path: Path, obj) -> None:
        import pickle

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj, protocol=2))

    base = tmp_path / "data" / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        dump(base / name, {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]})
    dump(base / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    save_model(ratelab.create_model("test_crate", img_size=32, num_classes=10), tmp_path / "m")
    assert main(["eval", "--checkpoint", str(tmp_path / "m"), "--dataset", "cifar10", "--data-root",
                 str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "e")]) == 0
    assert "on cifar10/test (4 items)" in capsys.readouterr().out
    import json

    assert json.loads((tmp_path / "e" / "eval.json").read_text())["split"] == "test"


# ---- file modes ---------------------------------------------------------------------------------------------------


@pytest.fixture()
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_open_gives(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text("x", tmp_path / "atomic.txt")
    atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "atomic.pt")
    assert _mode(tmp_path / "atomic.txt") == _mode(tmp_path / "atomic.pt") == _mode(tmp_path / "plain.txt") \
        == 0o666 & ~mask
    # Overwriting keeps the file's own mode, as open() does.
    os.chmod(tmp_path / "atomic.txt", 0o600)
    atomic_write_text("y", tmp_path / "atomic.txt")
    assert _mode(tmp_path / "atomic.txt") == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_training_run_writes_every_file_with_one_mode(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "run"
    assert main(["train", "--model", "test_crate", "--max-steps", "2", "--batch-size", "32", "--no-progress",
                 "--device", "cpu", "--out-dir", str(out)]) == 0
    modes = {p.relative_to(out).as_posix(): _mode(p) for p in out.rglob("*") if p.is_file()}
    assert {"metrics.jsonl", "config.json", "checkpoints/last.pt", "model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


# ---- no noise for a model built directly ---------------------------------------------------------------------------


def test_training_a_model_not_built_by_create_model_prints_no_warning(tmp_path, capsys):
    from _train_helpers import tiny_config
    from timm.models.vision_transformer import VisionTransformer

    from ratelab.train import ClassificationTask, Trainer

    class VitTask(ClassificationTask):
        def build_model(self, cfg):
            return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1,
                                     num_heads=2)

    trainer = Trainer(tiny_config(tmp_path, max_steps=2, eval_every=0), VitTask())
    trainer.fit()
    captured = capsys.readouterr()
    for stream in (captured.out, captured.err):
        assert "model_name" not in stream and "not built by" not in stream, stream
    # Its weights are where they always were: the checkpoint's "model" entry.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model"].keys() == trainer.model.state_dict().keys()
    assert not (tmp_path / "model.safetensors").exists()


def test_mae_style_checkpoint_with_argparse_namespace_loads(tmp_path):
    """FAIR MAE / CRATE-MAE training scripts pickle their argparse Namespace next to the weights."""
    import argparse

    from ratelab.core.checkpoint import load_torch_file, read_state_dict

    sd = {"w": torch.ones(2)}
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, model="mae"), "epoch": 3}, tmp_path / "ck.pth")
    obj = load_torch_file(tmp_path / "ck.pth")
    assert obj["args"].lr == 1e-3
    assert torch.equal(read_state_dict(tmp_path / "ck.pth")["w"], sd["w"])
