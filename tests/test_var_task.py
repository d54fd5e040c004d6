"""The ``var`` task: VAR's lr rule, lin0 schedule and no-decay groups; training VAR / M-VAR on a frozen tiny
tokenizer's tokens (loss falls, samples written), and an exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ratelab import create_model
from ratelab.core.checkpoint import read_state_dict, save_model
from ratelab.core.errors import ConfigError
from ratelab.train import TrainConfig, Trainer, build_task
from ratelab.train.var_task import VARTask, var_lr_factor, var_param_groups

TOK_KW = {"ch": 16, "vocab_size": 32, "z_channels": 8, "ch_mult": [1, 2, 2], "patch_nums": [1, 2, 4, 8]}
VAR_KW = {"depth": 2, "embed_dim": 32, "num_heads": 2}
MVAR_KW = {**VAR_KW, "d_state": 8, "headdim": 16}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = create_model("var_vae_ch160v4096z32", **TOK_KW)
    d = tmp_path_factory.mktemp("tok")
    save_model(tok, d)
    return str(d)


def _cfg(tmp_path, tok, name="run", model="var_d16", model_kwargs=VAR_KW, task=None, **kw):
    base = dict(task={"name": "var", "tokenizer": tok, "n_samples": 2, "n_sample_classes": 2, "top_k": 8,
                      **(task or {})},
                model=model, model_kwargs=model_kwargs, dataset="shapes", dataset_kwargs={"size": 48}, epochs=1,
                batch_size=16, out_dir=str(tmp_path / name), progress=False, log_every=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_lin0_schedule_by_hand():
    f = lambda s: var_lr_factor(s, total_steps=121, warmup_steps=20, sche="lin0", wp0=0.005, wpe=0.01)  # noqa: E731
    assert f(0) == pytest.approx(0.005)
    assert f(10) == pytest.approx(0.005 + 0.995 * 0.5)
    assert f(20) == 1.0 and f(24) == 1.0  # held for 5 % of the 100 post-warmup steps
    assert f(120) == pytest.approx(0.01)  # the last step ends at wpe
    assert f(70) == pytest.approx(0.01 + 0.99 * 0.5 / 0.95)
    cos = var_lr_factor(70, total_steps=121, warmup_steps=20, sche="cos", wpe=0.0)
    assert cos == pytest.approx(0.5)


def test_no_decay_groups_follow_var():
    m = create_model("mvar_d16", **MVAR_KW, patch_nums=[1, 2], vocab_size=8)
    decay, no_decay = (set(g["param_names"]) for g in var_param_groups(m))
    for name in ("pos_embed", "pos_start", "lvl_embed.weight", "blocks.0.attn.logit_scale", "blocks.0.attn.q_bias",
                 "head.bias", "blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias"):
        assert name in no_decay, name
    for name in ("word_embed.weight", "class_emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.mixer.conv1d.weight",
                 "head.weight", "blocks.0.ada_lin.weight"):
        assert name in decay, name


def test_trains_var_and_writes_samples(tmp_path, tokenizer_dir):
    cfg = _cfg(tmp_path, tokenizer_dir, max_steps=8, epochs=3, task={"tblr": 2e-2, "wp": 0.25})
    task = build_task(cfg)
    trainer = Trainer(cfg, task)
    res = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] and losses[0] == pytest.approx(math.log(32), rel=0.05)
    assert 0 <= res["val_acc"] <= 1 and res["val_loss"] > 0
    assert (tmp_path / "run" / "samples" / f"step{res['steps']}.png").is_file()
    assert not any(p.requires_grad for p in task.tokenizer.parameters())
    assert trainer.model.cfg.cond_drop_rate == 0.1 and trainer.model.num_classes == 6


def test_lr_rule_and_first_lr(tmp_path, tokenizer_dir):
    cfg = _cfg(tmp_path, tokenizer_dir, max_steps=4, batch_size=16, task={"wp": 0.5})  # 2 warmup steps
    task = build_task(cfg)
    model = task.build_model(cfg) if task.build_datasets(cfg) else None
    (spec,) = task.configure_optimizers(model, cfg)
    peak = 1e-4 * 16 / 256
    assert spec.optimizer.param_groups[0]["lr"] == pytest.approx(peak * 0.005)
    assert spec.optimizer.defaults["betas"] == (0.9, 0.95) and spec.grad_clip == 2.0
    assert [g["weight_decay"] for g in spec.optimizer.param_groups] == [0.05, 0.0]
    for _ in range(3):
        spec.scheduler.step()
    assert spec.optimizer.param_groups[0]["lr"] == pytest.approx(peak * 0.01)  # the last of 4 steps


def test_tokens_are_fp32_under_autocast(tmp_path, tokenizer_dir):
    cfg = _cfg(tmp_path, tokenizer_dir)
    task = build_task(cfg)
    task.build_datasets(cfg)
    task.setup(torch.device("cpu"), None)
    images = torch.stack([task.train_dataset[i][0] for i in range(16)])
    x, target = task.tokens(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xa, ta = task.tokens(images)
    assert torch.equal(ta, target) and torch.equal(xa, x) and xa.dtype == torch.float32


class _Crash(VARTask):
    calls = 0

    def training_step(self, model, batch, cfg):
        type(self).calls += 1
        if type(self).calls == 4:
            raise RuntimeError("bad batch")
        return super().training_step(model, batch, cfg)


def test_mvar_resume_is_exact(tmp_path, tokenizer_dir):
    kw = dict(model="mvar_d16", model_kwargs=MVAR_KW, max_steps=6, epochs=3, ckpt_every=100,
              task={"n_samples": 0, "tblr": 1e-2})
    full = _cfg(tmp_path, tokenizer_dir, "full", **kw)
    Trainer(full, build_task(full)).fit()
    part = _cfg(tmp_path, tokenizer_dir, "part", **kw)
    with pytest.raises(RuntimeError, match="bad batch"):
        Trainer(part, _Crash(part.task)).fit()
    resumed = part.with_overrides([("resume", "true")])
    Trainer(resumed, build_task(resumed)).fit()
    a, b = read_state_dict(tmp_path / "full"), read_state_dict(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_errors(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="not a next-scale model"):
        cfg = _cfg(tmp_path, tokenizer_dir, model="test_crate", model_kwargs={})
        Trainer(cfg, build_task(cfg))
    with pytest.raises(ConfigError, match="task.sche"):
        VARTask(sche="step")


@pytest.mark.distributed
def test_fsdp_two_processes_match_one(tmp_path, tokenizer_dir):
    """`ratelab train --strategy fsdp` under torchrun (2 gloo ranks, M-VAR's blocks sharded) ends at the weights of
    one process on the same global batches; the sample grid is skipped while the model is sharded."""
    from pathlib import Path

    from _dist import run_torchrun

    import ratelab

    # label_dropout 0: the dropout draws come from each rank's own RNG stream, so they differ from one process's
    kw = dict(model="mvar_d16", model_kwargs=MVAR_KW, max_steps=3, eval_every=0,
              task={"tblr": 1e-2, "label_dropout": 0.0})
    cfg = _cfg(tmp_path, tokenizer_dir, "fsdp", strategy="fsdp", **kw)
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps(cfg.to_dict()))
    main = Path(ratelab.__file__).with_name("__main__.py")
    res = run_torchrun(main, "train", "--config", path, timeout=300)
    assert "world 2 (fsdp)" in res.stdout
    single = _cfg(tmp_path, tokenizer_dir, "single", **kw)
    Trainer(single, build_task(single)).fit()
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("fsdp",
                                                                                                         "single")]
    steps = [[(r["loss"], r["grad_norm"]) for r in rs if r.get("kind") == "train"] for rs in rows]
    assert len(steps[0]) == len(steps[1]) == 3
    for (la, ga), (lb, gb) in zip(*steps):
        assert la == pytest.approx(lb, rel=1e-5) and ga == pytest.approx(gb, rel=1e-3)
    a, b = read_state_dict(tmp_path / "fsdp"), read_state_dict(tmp_path / "single")
    assert a.keys() == b.keys()
    # Adam's first steps move a weight by ~lr whatever its gradient's size, so the near-zero gradients behind VAR's
    # tiny-gated init (AdaLN gates x 1e-3) flip with the summation order: bound each weight by one step's lr
    # (peak 1e-2 * 16 / 256), and the average difference far below it.
    peak = 1e-2 * 16 / 256
    for k in a:
        d = (a[k] - b[k]).abs()
        assert float(d.max()) <= peak and float(d.mean()) < peak / 20, (k, float(d.max()), float(d.mean()))
