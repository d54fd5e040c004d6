"""DP-SGD under DDP: 2 gloo processes equal one process on the same Poisson batches and noise, so the noise is ONE
draw on the global clipped sum per logical step (independent per-rank draws would add sqrt(2) times the noise and
change the weights); local batches are often empty and split into physical micro-batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dist import run_torchrun
from _train_helpers import tiny_config

from ratelab.train import ClassificationTask, Trainer

HELPER = Path(__file__).with_name("_train_helpers.py")


@pytest.mark.distributed
def test_ddp_dp_sgd_matches_one_process(tmp_path):
    cfg = tiny_config(tmp_path / "ddp", batch_size=4, max_steps=8, eval_every=0, log_every=4,
                      plugins={"privacy": {"noise_multiplier": 1.2, "max_grad_norm": 0.5, "dp_seed": 13,
                                           "physical_batch_size": 2}})
    res = run_torchrun(HELPER, "--config-json", json.dumps(cfg.to_dict()), "--dump", tmp_path / "final.pt",
                       timeout=300)
    assert "world 2" in res.stdout
    single = Trainer(cfg.replace(out_dir=str(tmp_path / "single")), ClassificationTask())
    sampler = [single.plugins[0].batch_sampler(1438, global_batch=4, rank=r, world_size=2, seed=0, epoch=0,
                                               start_step=0) for r in (0, 1)]
    sizes = [[len(b) for b, _ in zip(s, range(8))] for s in sampler]
    # Empty local shares, a globally empty batch (a pure-noise step) and shares split into micro-batches (dp_seed 13
    # draws all three in 8 steps).
    assert 0 in sizes[0] and any(a == b == 0 for a, b in zip(*sizes)) and max(sizes[0] + sizes[1]) > 2
    out = single.fit()
    ddp = torch.load(tmp_path / "final.pt", weights_only=True)
    assert ddp["result"]["optimizer_steps"] == out["optimizer_steps"] == 8
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, rtol=1e-5, atol=1e-6), (k, (ddp["state"][k] - v).abs().max().item())
    assert ddp["result"]["dp_epsilon_rdp"] == out["dp_epsilon_rdp"]
    # Both processes drew exactly what the single process drew: the generator states agree.
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(ckpt["plugins"]["privacy"]["generator"], single.plugins[0].generator.get_state())
