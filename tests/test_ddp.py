"""Data parallelism: 2 gloo processes under torchrun match one process with the same global batch, and the
collectives (all_gather_with_grad above all) have the right values and gradients.

Augmentation is ON in the DDP comparison: each sample's random shift is drawn under a seed of (seed, epoch, index)
(``seeded_augmentation``, the default), so it does not depend on the rank that loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _dist import run_torchrun
from _train_helpers import read_rows, tiny_config

from ratelab.train import ClassificationTask, Trainer
from ratelab.train.data import EvalShardSampler, ShardedBatchSampler, epoch_permutation

HELPER = Path(__file__).with_name("_train_helpers.py")


def _cfg(out):
    # Global batch 64 (32 per rank): one full epoch of 22 steps (evaluated, checkpointed) and 4 steps into the next.
    return tiny_config(
        out,
        batch_size=64,
        max_steps=26,
        augment=True,
        label_smoothing=0.1,
        grad_clip=1.0,
        ema_decay=0.9,
        ckpt_every=10,
        log_every=1,
        eval_every=1,
    )


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cfg = _cfg(root / "run")
    res = run_torchrun(HELPER, "--mode", "ddp", "--config-json", json.dumps(cfg.to_dict()), "--dump",
                       root / "final.pt", timeout=300)
    return root, cfg, res


@pytest.mark.distributed
def test_ddp_matches_single_process(ddp_run, tmp_path):
    root, cfg, res = ddp_run
    assert "world 2" in res.stdout
    single = Trainer(cfg.replace(out_dir=str(tmp_path)), ClassificationTask())
    single_result = single.fit()
    ddp = torch.load(root / "final.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        d = ddp["state"][k]
        # gloo's all-reduce sums in another order than one process's batch mean: float32 rounding only.
        assert torch.allclose(d, v, rtol=1e-5, atol=1e-6), (k, (d - v).abs().max().item())
    for k, v in single.ema_model.state_dict().items():
        assert torch.allclose(ddp["ema"][k], v, rtol=1e-5, atol=1e-6), k
    rows_d, rows_s = read_rows(root / "run", "train"), read_rows(tmp_path, "train")
    assert [r["step"] for r in rows_d] == [r["step"] for r in rows_s] == list(range(1, 27))
    for a, b in zip(rows_d, rows_s):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    ev_d, ev_s = read_rows(root / "run", "eval"), read_rows(tmp_path, "eval")
    assert [r["step"] for r in ev_d] == [r["step"] for r in ev_s] == [22, 26]
    for a, b in zip(ev_d, ev_s):  # eval over both ranks' halves of the val set, all-reduced
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1 / 359 + 1e-12)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert ddp["result"]["steps"] == single_result["steps"] == 26
    ckpt = torch.load(root / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG state is kept


@pytest.mark.distributed
def test_all_gather_with_grad_two_ranks(ddp_run):
    root = ddp_run[0]
    parts = [torch.load(root / f"gather_rank{r}.pt", weights_only=False) for r in range(2)]
    xs = [p["x"] for p in parts]
    full = torch.cat(xs)
    for p in parts:
        assert torch.equal(p["gathered"], full) and torch.equal(p["plain"], full)
        assert p["mean"].item() == 0.5
        assert "same shape" in p["mismatch"] and "(1, 2), (2, 2)" in p["mismatch"]
    # Reference: one process, the sum of both ranks' losses over the concatenated input.
    X = full.clone().requires_grad_(True)
    total = sum((X * p["weight"]).sum() + (r + 1) * (X**2).sum() for r, p in enumerate(parts))
    total.backward()
    for r, p in enumerate(parts):
        assert torch.allclose(p["grad"], X.grad[3 * r : 3 * (r + 1)], rtol=1e-6, atol=1e-6), r


def test_sharded_batches_union_is_the_single_process_batch():
    n, B = 103, 12
    single = list(ShardedBatchSampler(n, global_batch=B, seed=3, epoch=2))
    r0 = list(ShardedBatchSampler(n, global_batch=B, rank=0, world_size=2, seed=3, epoch=2))
    r1 = list(ShardedBatchSampler(n, global_batch=B, rank=1, world_size=2, seed=3, epoch=2))
    assert len(single) == len(r0) == len(r1) == n // B
    assert all(a + b == s for a, b, s in zip(r0, r1, single))
    assert single[0] == epoch_permutation(n, seed=3, epoch=2)[:B].tolist()
    assert not torch.equal(epoch_permutation(n, seed=3, epoch=2), epoch_permutation(n, seed=3, epoch=3))
    assert list(ShardedBatchSampler(n, global_batch=B, seed=3, epoch=2, start_step=5)) == single[5:]
    with pytest.raises(ValueError, match="not divisible by world size 5"):
        ShardedBatchSampler(n, global_batch=B, world_size=5)
    ev = [i for r in range(3) for b in EvalShardSampler(10, batch_size=3, rank=r, world_size=3) for i in b]
    assert ev == list(range(10))
