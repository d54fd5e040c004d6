"""Resumption: a run interrupted at any point and resumed ends with bitwise the same weights as an uninterrupted run.

The configuration exercises everything resumption must carry: mid-epoch checkpoints (skipping consumed batches),
digits' random-shift augmentation (torch's global RNG), warmup + cosine, EMA, clipping, and evaluation between
epochs (which must not perturb the training RNG stream). CPU, one process, num_workers=0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import CrashAt, read_rows, tiny_config

from ratelab.core.checkpoint import read_state_dict
from ratelab.train import ClassificationTask, Trainer

HELPER = Path(__file__).with_name("_train_helpers.py")


def _cfg(out, **kw):
    # 1438 digits / 128 = 11 steps per epoch, 3 epochs = 33 steps; checkpoints every 4 steps land mid-epoch.
    base = dict(
        batch_size=128,
        epochs=3,
        ckpt_every=4,
        ema_decay=0.8,
        grad_clip=1.0,
        label_smoothing=0.1,
        eval_every=1,
        log_every=1,
    )
    base.update(kw)
    return tiny_config(out, **base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    trainer = Trainer(_cfg(out), ClassificationTask())
    result = trainer.fit()
    return out, trainer, result


def _assert_same_run(out, trainer_or_state, ref):
    ref_out, ref_trainer, ref_result = ref
    state = trainer_or_state
    for k, v in ref_trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v), f"weights differ at {k}"
    for k, v in ref_trainer.ema_model.state_dict().items():
        assert torch.equal(state["ema"][k], v), f"EMA weights differ at {k}"
    # Logged training metrics match too (their running averages are checkpointed); times naturally differ.
    # An emergency checkpoint leaves one "failed" row behind (the record of the crash); every other row matches.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows if r["kind"] != "failed"]  # noqa: E731
    assert strip(read_rows(out)) == strip(read_rows(ref_out))


def test_crash_and_resume_in_process_is_bitwise(tmp_path, reference):
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(cfg, CrashAt(15)).fit()  # dies in step 15; regular checkpoint at 12, the emergency one at 14
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (14, 1, 3)
    assert [r["step"] for r in read_rows(tmp_path, "failed")] == [14]
    trainer = Trainer(cfg.replace(resume=True), ClassificationTask())
    assert trainer.resumed_from == 14
    result = trainer.fit()
    _assert_same_run(tmp_path, {"model": trainer.model.state_dict(), "ema": trainer.ema_model.state_dict()}, reference)
    ref_result = reference[2]
    assert {k: v for k, v in result.items() if k not in ("time_s", "out_dir", "resumed_from_step")} == {
        k: v for k, v in ref_result.items() if k not in ("time_s", "out_dir")
    }


def test_resume_config_mismatch_is_an_error(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4)
    Trainer(cfg, ClassificationTask()).fit()
    with pytest.raises(ValueError, match=r"settings differ from the run saved in .*seed: saved 0, now 1"):
        Trainer(cfg.replace(resume=True, seed=1), ClassificationTask())


def test_sigkill_and_resume_is_bitwise(tmp_path, reference):
    """Kill a real training process with SIGKILL mid-run, resume it in a new process, compare with `reference`."""
    out = tmp_path / "run"
    cfg = _cfg(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HELPER), "--config-json", json.dumps(cfg.to_dict())]
    # 0.1 s of sleep per step (test hook of the runner, not the library) so the kill lands mid-run.
    proc = subprocess.Popen(
        cmd + ["--sleep-per-step", "0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        # Wait until the run is past its first evaluation (step 11) and its step-12 checkpoint.
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and any(r.get("step", 0) >= 14 for r in _rows(metrics)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 12 <= ckpt["step"] < 33, ckpt["step"]
    assert not (out / "model.safetensors").exists()
    killed_at = max(r["step"] for r in _rows(metrics))
    assert killed_at < 33

    dump = tmp_path / "final.pt"
    cfg_resume = cfg.replace(resume=True)
    res = subprocess.run(
        cmd[:-1] + [json.dumps(cfg_resume.to_dict()), "--dump", str(dump)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resumed at step {ckpt['step']}" in res.stdout
    final = torch.load(dump, weights_only=True)
    _assert_same_run(out, {"model": final["state"], "ema": final["ema"]}, reference)
    saved = read_state_dict(out)  # model.safetensors written at the end of the resumed run
    for k, v in reference[1].model.state_dict().items():
        assert torch.equal(saved[k], v), k
    assert final["result"]["val_acc"] == reference[2]["val_acc"]
    assert final["result"]["train_loss"] == reference[2]["train_loss"]


def _rows(path: Path) -> list[dict]:
    rows = []
    for ln in path.read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows
