"""A run that fails after training started leaves a checkpoint of its last completed step, and resuming it after the
cause is fixed ends with bitwise the weights of an uninterrupted run. Also: the dataset's files are checked before
training starts (a bad image fails at once, named), and when no consistent state exists nothing is written.

CPU, one process, num_workers=0 (the trainer's bitwise-resume contract).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _train_helpers import read_rows, tiny_config
from torch.utils.data import Dataset

from ratelab.cli.main import main
from ratelab.core.checkpoint import read_state_dict
from ratelab.core.errors import DatasetError
from ratelab.data import build_dataset
from ratelab.train import ClassificationTask, Trainer
from ratelab.train.data import epoch_permutation
from ratelab.train.plugins import Plugin


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(b[k], v), f"weights differ at {k}"


def _rows(out: Path) -> list[dict]:
    # The resumed run carries one "failed" row (the record of the crash); every other row matches, times aside.
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_rows(out) if r["kind"] != "failed"]


class FlakyItems(Dataset):
    """``base`` whose ``fail_at``-th item load (1-based, counted over the object's life) raises, like a corrupt
    file met mid-epoch; ``fail_at=None`` is the repaired data."""

    def __init__(self, base: Dataset, fail_at: int | None) -> None:
        self.base, self.fail_at, self.loads = base, fail_at, 0
        for name in ("num_classes", "img_size", "in_chans"):
            setattr(self, name, getattr(base, name))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.loads += 1
        if self.loads == self.fail_at:
            raise DatasetError(f"cannot read image file item{index}.png: broken data stream")
        return self.base[index]


def _digits_task(fail_at: int | None) -> ClassificationTask:
    train = FlakyItems(build_dataset("digits", "train", augment=None), fail_at)
    return ClassificationTask(train_dataset=train, val_dataset=build_dataset("digits", "val"))


def _cfg(out: Path, **kw):
    # 1438 digits / 64 = 22 steps per epoch, 2 epochs; random-shift augmentation, EMA and clipping all carried over.
    return tiny_config(out, ema_decay=0.8, grad_clip=1.0, ckpt_every=8, log_every=1, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    trainer = Trainer(_cfg(out), _digits_task(None))
    trainer.fit()
    return out, trainer.model.state_dict(), trainer.ema_model.state_dict()


def test_bad_item_mid_epoch_leaves_a_checkpoint_and_resume_is_bitwise(tmp_path, reference, capsys):
    ref_out, ref_state, ref_ema = reference
    cfg = _cfg(tmp_path)
    # Load 64 * 29 + 10 is inside step 30's batch: epoch 1, batch 8; the regular checkpoint is at step 24.
    with pytest.raises(DatasetError, match="item.*png"):
        Trainer(cfg, _digits_task(fail_at=64 * 29 + 10)).fit()
    ckpt = _ckpt(tmp_path)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (29, 1, 7)
    err = capsys.readouterr().err
    assert f"wrote the emergency checkpoint {tmp_path / 'checkpoints' / 'last.pt'}" in err
    assert f"ratelab train --out-dir {tmp_path} --resume" in err
    failed = read_rows(tmp_path, "failed")
    assert [r["step"] for r in failed] == [29] and "DatasetError" in failed[0]["error"]

    resumed = Trainer(cfg.replace(resume=True), _digits_task(None))  # the data is fixed
    assert resumed.resumed_from == 29
    resumed.fit()
    _same_weights(ref_state, resumed.model.state_dict())
    _same_weights(ref_ema, resumed.ema_model.state_dict())
    assert _rows(tmp_path) == _rows(ref_out)


class FailingEval(ClassificationTask):
    def __init__(self, fail_step: int | None) -> None:
        super().__init__()
        self.fail_step = fail_step

    def evaluate(self, model, ctx):
        if ctx.step == self.fail_step:
            raise RuntimeError("evaluation crashed")
        return super().evaluate(model, ctx)


@pytest.mark.parametrize("fail_step", [22, 44], ids=["first_eval", "last_eval"])
def test_exception_in_an_evaluation(tmp_path, capsys, fail_step):
    ref_cfg = tiny_config(tmp_path / "ref", ema_decay=0.8, ckpt_every=0)
    ref = Trainer(ref_cfg, FailingEval(None))
    ref_result = ref.fit()
    cfg = ref_cfg.replace(out_dir=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        Trainer(cfg, FailingEval(fail_step)).fit()  # end of epoch 0 (step 22) or of the run (44)
    ckpt = _ckpt(tmp_path / "cut")
    # The state of the epoch's last step, before its evaluation: the resumed run evaluates first.
    assert (ckpt["step"], ckpt["batch_in_epoch"]) == (fail_step, 22)
    assert "wrote the emergency checkpoint" in capsys.readouterr().err
    resumed = Trainer(cfg.replace(resume=True), FailingEval(None))
    result = resumed.fit()
    _same_weights(ref.model.state_dict(), resumed.model.state_dict())
    _same_weights(ref.ema_model.state_dict(), resumed.ema_model.state_dict())
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "ref")
    assert [r["step"] for r in read_rows(tmp_path / "cut", "eval")] == [22, 44]
    # The epoch's training averages survived the failed evaluation (they are in the final metrics).
    skip = ("time_s", "out_dir", "resumed_from_step")
    assert {k: v for k, v in result.items() if k not in skip} == {k: v for k, v in ref_result.items() if k not in skip}


class NoisyInputs(ClassificationTask):
    """Adds input noise drawn from torch's global RNG in every micro-step (as dropout would), and raises in the
    ``fail_at``-th micro-step, after the earlier micro-steps of the same step drew their noise."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def training_step(self, model, batch, cfg):
        self.calls += 1
        x = batch[0] + 0.1 * torch.randn_like(batch[0])
        if self.calls == self.fail_at:
            raise RuntimeError("crash mid-accumulation")
        return super().training_step(model, (x, batch[1]), cfg)


def test_exception_mid_accumulation_resumes_with_the_step_rng(tmp_path):
    ref_cfg = tiny_config(tmp_path / "ref", accum_steps=2, max_steps=16, eval_every=0, ckpt_every=0)
    ref = Trainer(ref_cfg, NoisyInputs())
    ref.fit()
    cfg = ref_cfg.replace(out_dir=str(tmp_path / "cut"))
    # Micro-step 20 is the second of step 10: its first micro-step ran forward and backward and drew noise.
    with pytest.raises(RuntimeError, match="mid-accumulation"):
        Trainer(cfg, NoisyInputs(fail_at=20)).fit()
    assert _ckpt(tmp_path / "cut")["step"] == 9
    resumed = Trainer(cfg.replace(resume=True), NoisyInputs())
    resumed.fit()
    _same_weights(ref.model.state_dict(), resumed.model.state_dict())


class FailingStepEnd(Plugin):
    plugin_name = "failing_step_end"

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_step_end(self, trainer):
        if trainer.step == self.at:
            raise RuntimeError("plugin failed")
        return {}


def test_exception_in_the_middle_of_an_update_writes_nothing(tmp_path, capsys):
    # The weights of step 7 are updated when the plugin fails: no consistent state, the step-4 checkpoint stays.
    cfg = tiny_config(tmp_path, max_steps=10, ckpt_every=4, eval_every=0)
    with pytest.raises(RuntimeError, match="plugin failed"):
        Trainer(cfg, ClassificationTask(), plugins=[FailingStepEnd(7)]).fit()
    assert _ckpt(tmp_path)["step"] == 4
    assert "in the middle of an update" in capsys.readouterr().err
    assert read_rows(tmp_path, "failed") == []


def test_failure_right_after_a_checkpoint_or_before_any_step(tmp_path, capsys):
    # Nothing new since the step-8 checkpoint: it is left as it is and named.
    cfg = tiny_config(tmp_path / "a", max_steps=12, ckpt_every=8, eval_every=0)
    with pytest.raises(DatasetError):
        Trainer(cfg, _digits_task(fail_at=64 * 8 + 1)).fit()
    assert _ckpt(tmp_path / "a")["step"] == 8
    assert "(step 8) is current" in capsys.readouterr().err
    # The first batch fails: nothing was learned, so nothing is written (and a fresh start needs no --resume).
    cfg = tiny_config(tmp_path / "b", max_steps=4)
    with pytest.raises(DatasetError):
        Trainer(cfg, _digits_task(fail_at=3)).fit()
    assert not (tmp_path / "b" / "checkpoints").exists()
    Trainer(cfg, _digits_task(None)).fit()


# ---- imagefolder: the real path, through the CLI ----------------------------------------------------------------


def _image_folder(root: Path, n: int = 24) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", n), ("val", 8)):
        for i in range(count):
            cls = ("a", "b")[i % 2]
            pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            if cls == "b":
                pixels[:, :, 0] = 255
            path = root / split / cls / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)


def _train_args(root: Path, out: Path) -> list[str]:
    return ["train", "--model", "test_crate", "--dataset", "imagefolder", "--data-root", str(root), "--img-size", "8",
            "--batch-size", "4", "--epochs", "2", "--ckpt-every", "0", "--lr", "3e-3", "--no-progress",
            "--device", "cpu", "--out-dir", str(out)]


def test_corrupt_image_found_before_training_names_the_file(tmp_path, capsys):
    root = tmp_path / "data"
    _image_folder(root)
    bad = root / "train" / "b" / "005.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    assert main(_train_args(root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "1 of 24 image files cannot be read" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # Skippable: the run then starts and meets the file when it loads it (and leaves a checkpoint if it can).
    assert main([*_train_args(root, tmp_path / "run2"), "--no-validate-data"]) == 2
    assert str(bad) in capsys.readouterr().err


def test_corrupt_image_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path, capsys):
    root = tmp_path / "data"
    _image_folder(root)
    assert main(_train_args(root, tmp_path / "ref")) == 0
    # A file that breaks after the up-front check (a disk or a sync gone wrong mid-run): the one that epoch 0
    # loads in its 4th batch (6 steps per epoch).
    ds = build_dataset("imagefolder", "train", root=root, img_size=8)
    bad = Path(ds.samples[int(epoch_permutation(len(ds), seed=0, epoch=0)[3 * 4 + 1])][0])
    good = bad.read_bytes()

    real_validate = type(ds).validate

    def validate_then_break(self, **kw):
        real_validate(self, **kw)
        if self.split == "train":
            bad.write_bytes(good[: len(good) // 2])

    cut = tmp_path / "cut"
    try:
        type(ds).validate = validate_then_break
        assert main(_train_args(root, cut)) == 2
    finally:
        type(ds).validate = real_validate
    err = capsys.readouterr().err
    assert str(bad) in err and "wrote the emergency checkpoint" in err
    assert _ckpt(cut)["step"] == 3
    bad.write_bytes(good)
    assert main(["train", "--out-dir", str(cut), "--resume"]) == 0
    _same_weights(read_state_dict(tmp_path / "ref"), read_state_dict(cut))
    assert os.path.exists(cut / "final_metrics.json")


# ---- several ranks: no collective save from one failing rank ----------------------------------------------------


def test_one_rank_failing_under_ddp_writes_no_emergency_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    from _dist import free_port

    out = tmp_path / "run"
    cfg = tiny_config(out, max_steps=12, ckpt_every=4, eval_every=0, log_every=100)
    worker = Path(__file__).with_name("_emergency_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(worker),
           "--config-json", json.dumps(cfg.to_dict()), "--rank", "1", "--at", "7"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode != 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The failing rank says why it saved nothing (and does not hang in a collective of its own).
    assert "crash on rank 1" in res.stderr
    assert "after step 6 (epoch 0) on rank 1: no emergency checkpoint with 2 ranks" in res.stderr, res.stderr[-3000:]
    assert _ckpt(out)["step"] == 4
