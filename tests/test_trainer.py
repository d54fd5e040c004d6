"""Trainer end to end, its parts (schedule, optimizers, weight-decay groups, label smoothing, clipping, EMA), the NaN
guard, the config <-> CLI mapping, `ratelab train` / `ratelab eval`, and the classification evaluation helpers."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _train_helpers import NaNAt, read_rows, tiny_config
from torch.utils.data import TensorDataset

from ratelab import create_model
from ratelab.core.checkpoint import load_model, read_state_dict
from ratelab.data import build_dataset
from ratelab.eval.classification import evaluate_classifier, predict
from ratelab.train import (
    ClassificationTask,
    ModelEma,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    WarmupCosine,
    add_config_args,
    build_optimizer,
    config_from_args,
    warmup_cosine_lr,
    weight_decay_groups,
)

# ---- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 3-epoch run on digits with EMA, label smoothing, clipping and save_init (about 3 s)."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(
        out, epochs=3, ema_decay=0.9, label_smoothing=0.1, grad_clip=1.0, save_init=True, ckpt_every=10, log_every=2
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, ClassificationTask())
    result = trainer.fit()
    return cfg, trainer, result


def test_fit_learns_and_logs(run):
    cfg, trainer, result = run
    spe = trainer.steps_per_epoch
    assert spe == 1438 // 64 and trainer.total_steps == 3 * spe == result["steps"]
    train = read_rows(cfg.out_dir, "train")
    evals = read_rows(cfg.out_dir, "eval")
    assert [r["step"] for r in train] == list(range(2, 3 * spe + 1, 2)) + ([3 * spe] if (3 * spe) % 2 else [])
    for r in train:
        assert {"lr", "loss", "acc", "grad_norm", "time_s"} <= set(r) and r["epoch"] == (r["step"] - 1) // spe
    assert [(r["step"], r["epoch"]) for r in evals] == [(spe, 0), (2 * spe, 1), (3 * spe, 2)]
    assert {"val_loss", "val_acc", "val_loss_ema", "val_acc_ema"} <= set(evals[-1])
    first = sum(r["loss"] for r in train[:3]) / 3
    last = sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert result["val_acc"] == evals[-1]["val_acc"] > 0.15  # chance is 0.1
    assert result["train_loss"] < first
    assert {"val_loss", "val_acc", "train_loss", "train_acc", "steps", "epochs", "time_s"} <= set(result)
    assert json.loads((trainer.out_dir / "config.json").read_text()) == cfg.to_dict()
    assert json.loads((trainer.out_dir / "final_metrics.json").read_text()) == result


def test_checkpoint_contents(run):
    cfg, trainer, result = run
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    need = {
        "model",
        "optimizers",
        "schedulers",
        "task_state",
        "plugins",
        "scaler",
        "ema",
        "step",
        "epoch",
        "batch_in_epoch",
        "rng",
        "config",
        "format_version",
        "data_order",
        "model_config",
    }
    assert need <= set(ckpt)
    assert ckpt["step"] == trainer.total_steps and ckpt["epoch"] == 3 and ckpt["batch_in_epoch"] == 0
    assert ckpt["config"] == cfg.to_dict()
    assert set(ckpt["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["schedulers"]["main"]["last_step"] == trainer.total_steps and set(ckpt["optimizers"]) == {"main"}
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    for k, v in trainer.ema_model.state_dict().items():
        assert torch.equal(ckpt["ema"]["module"][k], v), k


def test_saved_model_reloads_with_same_logits(run):
    cfg, trainer, result = run
    val = build_dataset("digits", "val", seed=cfg.seed)
    x = torch.stack([val[i][0] for i in range(16)])
    loaded = load_model(cfg.out_dir).eval()
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), trainer.model(x))
        # the training checkpoint carries its model config, so it rebuilds the same model on its own
        from_ckpt = load_model(f"{cfg.out_dir}/checkpoints/last.pt").eval()
        assert torch.equal(from_ckpt(x), trainer.model(x))
    ema = load_model(f"{cfg.out_dir}/ema")
    for k, v in trainer.ema_model.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    init = read_state_dict(f"{cfg.out_dir}/init")
    assert not torch.equal(init["head.weight"], trainer.model.head.weight.detach())
    # The task's distributed evaluation and the standalone evaluator agree.
    ev = evaluate_classifier(loaded, val, batch_size=100)
    assert ev["n"] == len(val) and ev["acc"] == pytest.approx(result["val_acc"], abs=1e-12)
    assert ev["loss"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_refuses_to_overwrite_and_resumes_finished_run(run):
    cfg, trainer, result = run
    with pytest.raises(ValueError, match="already exists.*resume"):
        Trainer(cfg, ClassificationTask())
    again = Trainer(cfg.replace(resume=True), ClassificationTask())
    assert again.step == trainer.total_steps
    res = again.fit()  # nothing left to train: returns the stored final metrics
    assert res["val_acc"] == result["val_acc"] and res["train_loss"] == result["train_loss"]


class _RandomEval(ClassificationTask):
    """Evaluation that draws from every global RNG, as a stochastic evaluator would."""

    def evaluate(self, model, ctx):
        import random

        import numpy as np

        torch.rand(100), np.random.rand(3), random.random()
        return super().evaluate(model, ctx)


def test_evaluation_does_not_shift_training_rng(tmp_path):
    # Without seeded augmentation, digits' train augmentation draws from torch's global RNG stream (as dropout would);
    # evaluating between epochs must not change it.
    states = []
    for every in (1, 0):
        cfg = tiny_config(tmp_path / f"e{every}", batch_size=256, max_steps=11, eval_every=every,
                          seeded_augmentation=False)
        trainer = Trainer(cfg, _RandomEval())
        trainer.fit()
        states.append(trainer.model.state_dict())
        assert len(read_rows(cfg.out_dir, "eval")) == (3 if every else 1)
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_bad_batch_sizes(tmp_path):
    with pytest.raises(ValueError, match="larger than the training set"):
        Trainer(tiny_config(tmp_path, batch_size=5000), ClassificationTask())
    with pytest.raises(ValueError, match="batch_size: must be positive"):
        tiny_config(tmp_path, batch_size=0)
    with pytest.raises(TypeError, match=r"does not implement \['build_datasets'"):
        Trainer(tiny_config(tmp_path), object())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Trainer(tiny_config(tmp_path, device="cuda"), ClassificationTask())
        with pytest.raises(ValueError, match="amp: fp16 .* needs CUDA"):
            Trainer(tiny_config(tmp_path, amp="fp16"), ClassificationTask())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_cuda_mixed_precision(tmp_path, amp):
    cfg = tiny_config(tmp_path, device="cuda", amp=amp, max_steps=30, ckpt_every=10, log_every=5)
    trainer = Trainer(cfg, ClassificationTask())
    assert trainer.amp_dtype == (torch.bfloat16 if amp == "auto" else torch.float16)
    assert (trainer.scaler is not None) == (amp == "fp16")
    result = trainer.fit()
    rows = read_rows(tmp_path, "train")
    assert rows[-1]["loss"] < rows[0]["loss"] and math.isfinite(result["val_loss"])
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["rng"][0]["cuda"] is not None
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    loaded = load_model(tmp_path).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), trainer.model.eval().cpu()(x), atol=1e-5)


# ---- NaN guard -----------------------------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=20, ckpt_every=3)
    trainer = Trainer(cfg, NaNAt(7))
    with pytest.raises(TrainingDiverged, match=r"step 7 .*loss = nan.*last good checkpoint .* \(step 6\).*lower lr"):
        trainer.fit()
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad step was never applied
    assert read_rows(tmp_path, "diverged")[0]["step"] == 7
    assert not (tmp_path / "model.safetensors").exists()


def test_cli_train_diverged_exit_code(tmp_path, capsys):
    from ratelab.cli.main import main

    rc = main(
        [
            "train",
            "--model",
            "test_crate",
            "--max-steps",
            "3",
            "--lr",
            "1e30",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
            "--batch-size",
            "32",
            "--warmup-steps",
            "0",
            "--optimizer",
            "lion",
        ]
    )
    # lr 1e30 with Lion: every weight moves by ~1e30 at once, the next forward overflows.
    assert rc == 1
    assert "diverged" in capsys.readouterr().err


# ---- schedule, optimizers, regularizers ----------------------------------------------------------------------------


def test_warmup_cosine_values():
    f = lambda s: warmup_cosine_lr(s, base_lr=1.0, warmup_steps=4, total_steps=12, min_lr=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(8) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert warmup_cosine_lr(0, base_lr=2.0, warmup_steps=0, total_steps=10) == 2.0


def test_warmup_cosine_scheduler_drives_optimizer_and_restores():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.5)
    sch = WarmupCosine(opt, warmup_steps=3, total_steps=10, min_lr=0.05)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    want = [warmup_cosine_lr(s, base_lr=0.5, warmup_steps=3, total_steps=10, min_lr=0.05) for s in range(10)]
    assert seen == pytest.approx(want)
    opt2 = torch.optim.SGD([p], lr=0.5)
    sch2 = WarmupCosine(opt2, warmup_steps=3, total_steps=10, min_lr=0.05)
    sch2.load_state_dict(sch.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_weight_decay_groups_split():
    model = create_model("test_crate")
    groups = weight_decay_groups(model, 0.3)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert {"cls_token", "pos_embed", "head.bias", "patch_norm.weight", "fc_norm.bias"} <= set(no_decay["param_names"])
    assert {"patch_proj.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= set(decay["param_names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    named = dict(model.named_parameters())
    assert sorted(decay["param_names"] + no_decay["param_names"]) == sorted(named)


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_optimizers_first_step(name):
    # First step of both from zero state moves every weight by lr * sign(g) (AdamW: g / (|g| + eps) ~ sign(g)),
    # plus decoupled decay lr * wd * w on the decayed group only.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, name=name, lr=0.01, weight_decay=0.5)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        wd = 0.5 if p.ndim >= 2 else 0.0
        want = before[n] * (1 - 0.01 * wd) - 0.01 * torch.sign(grads[n])
        tol = 0 if name == "lion" else 1e-6
        assert torch.allclose(p.detach(), want, atol=tol, rtol=0), (name, n)
    assert type(opt).__name__ == {"adamw": "AdamW", "lion": "Lion"}[name]


def test_label_smoothing_loss():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])

    class Fixed(nn.Module):
        def forward(self, x):
            return logits

    task = ClassificationTask()
    eps = 0.2
    loss, metrics = task.training_step(Fixed(), (torch.zeros(2, 1), y), tiny_config("unused", label_smoothing=eps))
    logp = torch.log_softmax(logits, -1)
    want = ((1 - eps) * -logp[torch.arange(2), y] + eps * -logp.mean(-1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    plain, _ = task.training_step(Fixed(), (torch.zeros(2, 1), y), tiny_config("unused"))
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert plain.item() != pytest.approx(loss.item())
    assert metrics["acc"].item() == 0.5


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_grad_clip_caps_global_norm(tmp_path, clip):
    trainer = Trainer(tiny_config(tmp_path, max_steps=1, grad_clip=clip), ClassificationTask())
    trainer.fit()
    raw = read_rows(tmp_path, "train")[0]["grad_norm"]  # logged before clipping
    after = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()]).item()
    assert raw > 0.05 * 2
    if clip:
        assert after == pytest.approx(clip, rel=1e-4)
    else:
        assert after == pytest.approx(raw, rel=1e-5)


def test_ema_update_math():
    model = nn.Linear(2, 1)
    model.register_buffer("count", torch.tensor(3))
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = ModelEma(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(5.0)
        model.bias.fill_(-4.0)
        model.count.fill_(7)
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.full((1, 2), 0.75 * 1 + 0.25 * 5))  # 2.0
    assert torch.equal(ema.module.bias, torch.tensor([0.25 * -4.0]))
    assert int(ema.module.count) == 7
    ema.update(model)
    assert torch.equal(ema.module.weight, torch.full((1, 2), 0.75 * 2.0 + 0.25 * 5))  # 2.75
    assert not ema.module.weight.requires_grad and not ema.module.training
    other = ModelEma(model, decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, decay=1.0)


# ---- config and CLI ------------------------------------------------------------------------------------------------


def test_config_round_trip_and_validation():
    cfg = TrainConfig(model="test_crate", model_kwargs={"depth": 1}, betas=(0.8, 0.9), max_steps=5)
    again = TrainConfig.from_json(json.dumps(cfg.to_dict()))
    assert again == cfg and again.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'lrr'"):
        TrainConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ValueError, match="lr: must be float"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="epochs: must be int"):
        TrainConfig(epochs=2.5)
    with pytest.raises(ValueError, match="optimizer: must be one of"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    assert TrainConfig(warmup_epochs=2).warmup_epochs == 2.0  # ints are accepted for floats


def _parser():
    p = argparse.ArgumentParser(prog="ratelab train", exit_on_error=True)
    add_config_args(p, TrainConfig)
    return p


def test_cli_options_parse(tmp_path):
    args = _parser().parse_args(
        [
            "--lr",
            "0.01",
            "--model-kwargs",
            '{"depth": 1, "pool": "mean"}',
            "--betas",
            "0.9,0.95",
            "--dataset-kwargs",
            "val_fraction=0.3",
            "--no-progress",
            "--max-steps",
            "none",
            "--augment",
            "false",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.lr == 0.01 and cfg.model_kwargs == {"depth": 1, "pool": "mean"} and cfg.betas == (0.9, 0.95)
    assert cfg.dataset_kwargs == {"val_fraction": 0.3} and cfg.progress is False and cfg.augment is False
    assert cfg.max_steps is None and cfg.epochs == TrainConfig().epochs
    # --config supplies a base; explicit options win.
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.5\nepochs: 7\nmodel: test_crate\n")
    cfg = config_from_args(_parser().parse_args(["--config", str(f), "--lr", "0.02"]))
    assert (cfg.lr, cfg.epochs, cfg.model) == (0.02, 7, "test_crate")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"epochs": "seven"}))
    with pytest.raises(ValueError, match=r"c.json.*epochs: must be int"):
        config_from_args(_parser().parse_args(["--config", str(j)]))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        config_from_args(_parser().parse_args(["--config", str(tmp_path / "missing.json")]))
    with pytest.raises(ValueError, match="^--min-lr: must not exceed lr"):
        config_from_args(_parser().parse_args(["--min-lr", "1"]))
    help_text = _parser().format_help()
    assert "Peak learning rate" in help_text and "--label-smoothing" in help_text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lr", "abc"], "argument --lr: expected float, got 'abc'"),
        (["--epochs", "1.5"], "argument --epochs: expected int"),
        (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
        (["--model-kwargs", "{bad"], "argument --model-kwargs: invalid JSON"),
        (["--model-kwargs", "depth"], "argument --model-kwargs: expected JSON or key=value"),
        (["--betas", "0.9"], "argument --betas: expected tuple of float, float"),
        (["--progress", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_cli_option_errors_name_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_train_then_eval(tmp_path, capsys):
    from ratelab.cli.main import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            "test_crate",
            "--max-steps",
            "6",
            "--batch-size",
            "32",
            "--out-dir",
            str(out),
            "--no-progress",
            "--lr",
            "2e-3",
        ]
    )
    assert rc == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert "[train] config:" in capsys.readouterr().out
    rc = main(["eval", "--checkpoint", str(out), "--out", str(tmp_path / "ev")])
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["dataset"] == "digits" and ev["split"] == "val" and ev["n"] == 359
    assert ev["acc"] == pytest.approx(final["val_acc"], abs=1e-12)
    # The training checkpoint alone is enough too.
    rc = main(["eval", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path / "ev2")])
    assert rc == 0 and json.loads((tmp_path / "ev2" / "eval.json").read_text())["acc"] == ev["acc"]
    rc = main(["eval", "--checkpoint", str(tmp_path / "nope")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


# ---- classification helpers ----------------------------------------------------------------------------------------


def test_predict_and_evaluate_classifier():
    torch.manual_seed(0)
    x = torch.randn(37, 5)
    y = torch.randint(0, 3, (37,))
    model = nn.Linear(5, 3)
    ds = TensorDataset(x, y)
    logits, labels = predict(model, ds, batch_size=8)
    with torch.no_grad():
        full = model(x)
    assert torch.allclose(logits, full, atol=1e-6) and torch.equal(labels, y)
    res = evaluate_classifier(model, ds, batch_size=10)
    assert res["n"] == 37
    assert res["acc"] == pytest.approx((full.argmax(1) == y).float().mean().item())
    assert res["loss"] == pytest.approx(F.cross_entropy(full, y).item(), rel=1e-5)
    model.train()
    evaluate_classifier(model, ds, batch_size=10)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="empty"):
        evaluate_classifier(model, TensorDataset(x[:0], y[:0]))
