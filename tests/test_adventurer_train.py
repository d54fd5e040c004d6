"""Adventurer under the foundation's training stack: the CLI trains and evaluates it, and 2 gloo processes under
torchrun match one process with the same global batch (the chunked SSD scan is per sample, so data parallelism
changes only the float32 summation order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dist import run_torchrun
from _train_helpers import tiny_config

from ratelab.cli.main import main
from ratelab.train import ClassificationTask, Trainer

HELPER = Path(__file__).with_name("_train_helpers.py")


def test_cli_trains_and_evaluates_adventurer(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", "adventurer_nano_patch4_16", "--dataset", "digits", "--max-steps", "3",
            "--batch-size", "32", "--out-dir", str(run), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert (run / "checkpoints" / "last.pt").exists()
    assert main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "val_acc" in out or "accuracy" in out


@pytest.mark.distributed
def test_adventurer_ddp_matches_single_process(tmp_path):
    cfg = tiny_config(tmp_path / "ddp" / "run", model="adventurer_nano_patch4_16", batch_size=64, max_steps=3,
                      augment=False, eval_every=0, log_every=1)
    res = run_torchrun(HELPER, "--config-json", json.dumps(cfg.to_dict()), "--dump", tmp_path / "final.pt",
                       timeout=300)
    assert "world 2" in res.stdout
    single = Trainer(cfg.replace(out_dir=str(tmp_path / "single")), ClassificationTask())
    single.fit()
    ddp = torch.load(tmp_path / "final.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        # 1e-5 as foundation-v2 specifies for DDP == one process: gloo sums in another order, and AdamW's first
        # steps (update ~ lr * sign(g)) amplify that rounding to ~4e-6 on this model's near-zero gradients.
        assert torch.allclose(ddp["state"][k], v, rtol=1e-5, atol=1e-5), (k, (ddp["state"][k] - v).abs().max())
