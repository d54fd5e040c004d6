"""The ``vqvae`` task under torchrun (2 gloo processes): with the patch-GAN (its own DDP wrapper) and dead-code
restarts (rank 0's draw broadcast), every rank ends with the same tokenizer, usage buffer and discriminator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dist import run_torchrun

from ratelab.train import TrainConfig

WORKER = Path(__file__).with_name("_vqvae_ddp_worker.py")


@pytest.mark.distributed
@pytest.mark.slow
def test_vqvae_gan_and_restarts_stay_in_sync_across_ranks(tmp_path):
    cfg = TrainConfig(
        task={"name": "vqvae", "n_recon": 0, "gan_weight": 0.1, "gan_start": 1, "disc_ndf": 8, "disc_layers": 2,
              "restart_every": 2, "dead_threshold": 0.5},
        model="var_vae_ch160v4096z32",
        model_kwargs={"ch": 16, "vocab_size": 32, "z_channels": 8, "ch_mult": [1, 2, 2], "patch_nums": [1, 2, 4, 8]},
        dataset="shapes", dataset_kwargs={"size": 32}, batch_size=16, max_steps=4, epochs=2, lr=2e-3,
        weight_decay=0.0, warmup_steps=0, eval_every=0, ckpt_every=0, out_dir=str(tmp_path / "run"), progress=False,
        device="cpu")
    run_torchrun(WORKER, "--config-json", json.dumps(cfg.to_dict()), "--out", tmp_path, timeout=300)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ema_updates"] == r1["ema_updates"] == 4
    for part in ("model", "disc"):
        assert r0[part].keys() == r1[part].keys()
        # BatchNorm running statistics are rank-local under DDP (rank 0's are broadcast at each DDP forward, and
        # rank 0 writes the checkpoints); the discriminator trains on batch statistics, so they never enter a loss
        bad = [k for k in r0[part] if not torch.equal(r0[part][k], r1[part][k]) and not k.endswith(
            ("running_mean", "running_var"))]
        assert not bad, f"{part} differs across ranks: {bad[:5]}"
    assert r0["model"]["quantize.ema_vocab_hit_SV"].sum() > 0
