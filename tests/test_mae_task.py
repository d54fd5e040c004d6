"""The ``mae`` task: trains CRATE-MAE and ViT-MAE, evaluates held-out reconstruction with fixed masks, probes the
frozen encoder, draws reconstruction grids, and resumes exactly."""

import json

import pytest
import torch

from ratelab.core.checkpoint import read_state_dict
from ratelab.train import MAETask, TrainConfig, Trainer, build_task
from ratelab.train.mae_task import eval_noise

MODELS = ("crate_mae_pico_patch4_16", "mae_vit_pico_patch4_16")


def _cfg(tmp_path, model, name="run", **kw):
    base = dict(task="mae", model=model, dataset="digits", epochs=1, batch_size=128, lr=1e-3, out_dir=str(tmp_path /
                name), progress=False, log_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def test_eval_noise_is_per_image():
    a = eval_noise([3, 7, 9], 16, seed=0)
    b = eval_noise([9, 3], 16, seed=0)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(eval_noise([3], 16, seed=1)[0], a[0])


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_mae_trains_and_evaluates(tmp_path, model):
    cfg = _cfg(tmp_path, model, epochs=3, task={"name": "mae", "n_recon": 4, "probe_max_fit": 600})
    trainer = Trainer(cfg, build_task(cfg))
    res = trainer.fit()
    assert res["val_loss"] > 0 and torch.isfinite(torch.tensor(res["val_loss"]))
    assert 0.1 < res["val_probe_acc_cls"] <= 1.0 and 0.1 < res["val_probe_acc_mean"] <= 1.0  # above chance
    assert (tmp_path / "run" / "reconstructions" / f"step{res['steps']}.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in rows if r.get("kind") == "train" and "loss" in r]
    assert train_losses and all(x > 0 for x in train_losses)


@pytest.mark.slow
def test_eval_loss_does_not_depend_on_batching(tmp_path):
    cfg = _cfg(tmp_path, MODELS[0], max_steps=2, task={"name": "mae", "probe": False, "n_recon": 0})
    Trainer(cfg, build_task(cfg)).fit()
    from ratelab.core.checkpoint import load_model
    from ratelab.core.dist import get_dist_info
    from ratelab.train.data import EvalShardSampler
    from ratelab.train.tasks import EvalContext

    model = load_model(tmp_path / "run").eval()
    task = build_task(cfg)
    _, val = task.build_datasets(cfg)
    out = []
    for bs in (50, 359):
        loader = torch.utils.data.DataLoader(val, batch_sampler=EvalShardSampler(len(val), batch_size=bs))
        ctx = EvalContext(loader=loader, out_dir=tmp_path, step=0, epoch=0, dist=get_dist_info("cpu"),
                          device=torch.device("cpu"))
        out.append(task.evaluate(model, ctx)["val_loss"])
    assert out[0] == pytest.approx(out[1], rel=1e-6)


class _FailingMAE(MAETask):
    """Raises in its 5th training step, like a bad batch met mid-run."""

    calls = 0

    def training_step(self, model, batch, cfg):
        type(self).calls += 1
        if type(self).calls == 5:
            raise RuntimeError("bad batch")
        return super().training_step(model, batch, cfg)


@pytest.mark.slow
def test_mae_resume_is_bitwise(tmp_path):
    """Killed mid-run (emergency checkpoint after step 4), resumed: the same weights as an uninterrupted run."""
    opts = {"name": "mae", "probe": False, "n_recon": 0}
    full = _cfg(tmp_path, MODELS[0], name="full", max_steps=8, epochs=2, task=opts)
    Trainer(full, build_task(full)).fit()
    part = _cfg(tmp_path, MODELS[0], name="part", max_steps=8, epochs=2, task=opts)
    with pytest.raises(RuntimeError, match="bad batch"):
        Trainer(part, _FailingMAE(part.task)).fit()
    resumed = part.with_overrides([("resume", "true")])
    Trainer(resumed, build_task(resumed)).fit()
    a, b = read_state_dict(tmp_path / "full"), read_state_dict(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mae_task_refuses_a_classifier(tmp_path):
    from ratelab.core.errors import ConfigError

    cfg = _cfg(tmp_path, "crate_pico_patch4_16")
    task = MAETask()
    task.build_datasets(cfg)
    with pytest.raises(ConfigError, match="not a masked autoencoder"):
        task.build_model(cfg)


def test_mae_config_checks():
    from ratelab.core.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="mask_ratio"):
        MAETask(mask_ratio=1.0)


@pytest.mark.slow
def test_cli_train_and_eval_mae(tmp_path, capsys):
    from ratelab.cli.main import main

    run = str(tmp_path / "cli")
    assert main(["train", "--task", "mae", "--task.mask_ratio", "0.5", "--model", MODELS[0], "--dataset", "digits",
                 "--max-steps", "3", "--batch-size", "128", "--out-dir", run, "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", run]) == 0
    out = capsys.readouterr().out
    assert "(mae) on digits/val" in out and "loss" in out and "probe_acc_cls" in out


@pytest.mark.parametrize("model", MODELS)
def test_norm_pix_loss_reaches_the_model(tmp_path, model):
    cfg = _cfg(tmp_path, model, task={"name": "mae", "norm_pix_loss": True})
    task = build_task(cfg)
    task.build_datasets(cfg)
    assert task.build_model(cfg).norm_pix_loss is True
