"""The ``vqvae`` task: trains a small VAR tokenizer on shapes (reconstruction improves, usage tracked, dead codes
restarted), the patch-GAN on its own optimizer, LPIPS only from local files, and an exact resume."""

import json

import pytest
import torch

from ratelab.core.checkpoint import read_state_dict
from ratelab.core.errors import ConfigError
from ratelab.train import TrainConfig, Trainer, build_task
from ratelab.train.vqvae_task import LPIPS, PatchDiscriminator, VQVAETask

MODEL_KW = {"ch": 16, "vocab_size": 32, "z_channels": 8, "ch_mult": [1, 2, 2], "patch_nums": [1, 2, 4, 8]}


def _cfg(tmp_path, name="run", task=None, **kw):
    base = dict(task=task or {"name": "vqvae", "n_recon": 2}, model="var_vae_ch160v4096z32", model_kwargs=MODEL_KW,
                dataset="shapes", dataset_kwargs={"size": 48}, epochs=1, batch_size=16, lr=2e-3, weight_decay=0.0,
                warmup_steps=0, out_dir=str(tmp_path / name), progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _train_rows(path):
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def test_trains_tracks_usage_and_restarts_dead_codes(tmp_path):
    cfg = _cfg(tmp_path, max_steps=9, epochs=3, task={"name": "vqvae", "n_recon": 2, "restart_every": 3,
                                                      "dead_threshold": 0.5})
    task = build_task(cfg)
    trainer = Trainer(cfg, task)
    net = trainer.model
    emb0 = net.quantize.embedding.weight.detach().clone()
    res = trainer.fit()
    rows = _train_rows(tmp_path / "run")
    losses = [r["rec_loss"] for r in rows if "rec_loss" in r]
    assert len(losses) >= 8 and losses[-1] < losses[0]
    assert all(0 <= r["usage"] <= 100 for r in rows if "usage" in r)
    assert any(r.get("restarted", 0) > 0 for r in rows)  # 32 codes, few hits each: some fall below 0.5
    assert task.ema_updates == 9 and net.quantize.ema_vocab_hit_SV.sum() > 0
    assert not torch.equal(net.quantize.embedding.weight, emb0)
    assert res["val_psnr"] > 0 and 0 < res["val_usage"] <= 1 and res["val_rec_l1"] > 0
    assert (tmp_path / "run" / "reconstructions" / f"step{res['steps']}.png").is_file()
    # the trained tokenizer reloads by name from the run directory
    from ratelab.models._factory import load_model

    back = load_model(tmp_path / "run").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(back.img_to_idx(x), net.eval().img_to_idx(x), strict=True))


def test_usage_ema_momentum():
    from ratelab import create_model

    net = create_model("var_vae_ch160v4096z32", **{**MODEL_KW, "patch_nums": (1, 2, 4, 8)})
    task = VQVAETask()
    h1, h2 = torch.ones(4, 32), torch.full((4, 32), 3.0)
    task._update_usage(net.quantize, h1)
    assert torch.equal(net.quantize.ema_vocab_hit_SV, h1)  # first update: a copy
    task._update_usage(net.quantize, h2)
    assert torch.allclose(net.quantize.ema_vocab_hit_SV, 0.9 * h1 + 0.1 * h2)
    task.ema_updates = 100
    before = net.quantize.ema_vocab_hit_SV.clone()
    task._update_usage(net.quantize, h2)
    assert torch.allclose(net.quantize.ema_vocab_hit_SV, 0.99 * before + 0.01 * h2)
    margin = [0.08 * n / 32 for n in (16, 64, 256, 1024)]
    net.quantize.ema_vocab_hit_SV.zero_()
    net.quantize.ema_vocab_hit_SV[2, :8] = margin[2]
    assert task.usage_pct(net.quantize, [16, 64, 256, 1024]) == [0.0, 0.0, 25.0, 0.0]


class _FailingVQ(VQVAETask):
    calls = 0

    def training_step(self, model, batch, cfg, optimizer="vae"):
        type(self).calls += 1
        if type(self).calls == 9:  # step 5's generator call (two calls per step with the GAN)
            raise RuntimeError("bad batch")
        return super().training_step(model, batch, cfg, optimizer=optimizer)


def test_gan_two_optimizers_and_bitwise_resume(tmp_path):
    """Patch-GAN on a second optimizer from step 2, dead-code restarts every 3 steps; killed after step 4 and
    resumed: the tokenizer, its usage buffer and the discriminator equal an uninterrupted run's."""
    opts = {"name": "vqvae", "n_recon": 0, "gan_weight": 0.1, "gan_start": 2, "disc_ndf": 8, "disc_layers": 2,
            "restart_every": 3, "dead_threshold": 0.5}
    full = _cfg(tmp_path, "full", task=opts, max_steps=7, epochs=3, ckpt_every=100)
    t_full = build_task(full)
    Trainer(full, t_full).fit()
    rows = _train_rows(tmp_path / "full")
    steps = [r for r in rows if "vae_rec_loss" in r]
    assert len(steps) == 7  # one row per step (log_every=1), the GAN terms from the third step (gan_start=2) on
    assert [("vae_g_loss" in r, "disc_d_real" in r) for r in steps] == [(False, False)] * 2 + [(True, True)] * 5
    part = _cfg(tmp_path, "part", task=opts, max_steps=7, epochs=3, ckpt_every=100)
    with pytest.raises(RuntimeError, match="bad batch"):
        Trainer(part, _FailingVQ(part.task)).fit()
    resumed = part.with_overrides([("resume", "true")])
    t_res = build_task(resumed)
    Trainer(resumed, t_res).fit()
    a, b = read_state_dict(tmp_path / "full"), read_state_dict(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da, db = t_full.disc.state_dict(), t_res.disc.state_dict()
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_disc_shapes_and_errors(tmp_path):
    d = PatchDiscriminator(3, ndf=8, n_layers=2)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6) and d.min_size() == 12
    cfg = _cfg(tmp_path, task={"name": "vqvae", "gan_weight": 0.1, "disc_layers": 4})
    task = build_task(cfg)
    task.build_datasets(cfg)
    with pytest.raises(ConfigError, match="at least 48px"):
        task.build_model(cfg)
    cfg = _cfg(tmp_path, model_kwargs={**MODEL_KW, "patch_nums": [1, 2, 4]})
    task = build_task(cfg)
    task.build_datasets(cfg)
    with pytest.raises(ConfigError, match="codes 16px images, the dataset gives 32px"):
        task.build_model(cfg)
    cfg = _cfg(tmp_path, task={"name": "vqvae", "restart_every": 5}, strategy="fsdp")
    task = build_task(cfg)
    task.build_datasets(cfg)
    with pytest.raises(ConfigError, match="restart_every.*fsdp"):
        task.build_model(cfg)
    with pytest.raises(ConfigError, match="task.rec_loss"):
        VQVAETask(rec_loss="l3")
    with pytest.raises(ConfigError, match="task.gan_weight: the checkpoint has a discriminator"):
        VQVAETask().load_state_dict({"ema_updates": 0, "vae_calls": 0, "disc": {}})


def _fake_lpips_files(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    feats = make_layers(cfgs["D"])
    vgg = {f"features.{k}": v for k, v in feats.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg16.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "lpips_vgg.pth")
    return tmp_path / "lpips_vgg.pth", tmp_path / "vgg16.pth"


def test_lpips_needs_local_files_and_is_a_distance(tmp_path):
    with pytest.raises(ConfigError, match="task.lpips_weights: perceptual_weight > 0 needs the local"):
        VQVAETask(perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="missing.pth' does not exist"):
        VQVAETask(perceptual_weight=1.0, lpips_weights=str(tmp_path / "missing.pth"), vgg_weights="x")
    lin, vgg = _fake_lpips_files(tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, bad)
    with pytest.raises(ConfigError, match="lin1.model.1.weight"):
        LPIPS(bad, vgg)
    m = LPIPS(lin, vgg)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)
    assert (m(x, y) > 0).all() and torch.allclose(m(x, y), m(y, x))
    # the term reaches the loss of a training step
    cfg = _cfg(tmp_path, task={"name": "vqvae", "perceptual_weight": 1.0, "lpips_weights": str(lin),
                               "vgg_weights": str(vgg)}, max_steps=1, eval_every=0)
    task = build_task(cfg)
    Trainer(cfg, task).fit()
    assert "lpips" in _train_rows(tmp_path / "run")[0]
