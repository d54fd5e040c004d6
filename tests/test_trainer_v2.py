"""Foundation v2 of the trainer: accumulation, task hooks, plugins, variable and empty batches, the config tree and
resume semantics (README form, changed settings, missing runs, stale temporary files)."""

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
import torch.nn.functional as F
from _train_helpers import CrashAt, read_rows, tiny_config

from ratelab.cli.main import main
from ratelab.core.checkpoint import read_state_dict
from ratelab.core.errors import ConfigError, UnknownNameError
from ratelab.train import (
    ClassificationTask,
    MCR2Task,
    OptimizerSpec,
    Plugin,
    TrainConfig,
    Trainer,
    register_plugin,
)
from ratelab.train.data import PoissonBatchSampler

# ---- gradient accumulation ---------------------------------------------------------------------------------------


def test_accumulation_equals_one_big_batch(tmp_path):
    # 4 micro-steps of 8 == one batch of 32 (augmentation on: seeded per sample, so both see the same images).
    base = dict(batch_size=32, max_steps=3, lr=3e-3, grad_clip=1.0, eval_every=0, log_every=1)
    one = Trainer(tiny_config(tmp_path / "a", **base), ClassificationTask())
    one.fit()
    acc = Trainer(tiny_config(tmp_path / "b", accum_steps=4, **base), ClassificationTask())
    res = acc.fit()
    for k, v in one.model.state_dict().items():
        assert torch.allclose(acc.model.state_dict()[k], v, atol=1e-6, rtol=0), (k, (acc.model.state_dict()[k] - v)
                                                                                  .abs().max().item())
    assert res["optimizer_steps"] == 3
    ra, rb = read_rows(tmp_path / "a", "train"), read_rows(tmp_path / "b", "train")
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], abs=1e-6)


def test_accumulation_refused_for_whole_batch_losses(tmp_path):
    cfg = tiny_config(tmp_path, task="mcr2", model="mcr2_mlp_small", img_size=8, accum_steps=2, max_steps=1)
    with pytest.raises(ConfigError, match="accum_steps: task 'mcr2' computes its loss over the whole batch"):
        Trainer(cfg, MCR2Task(feature_dim=16))
    with pytest.raises(ConfigError, match="accum_steps: 128 micro-steps need at least"):
        Trainer(tiny_config(tmp_path / "x", batch_size=64, accum_steps=128), ClassificationTask())


# ---- task hooks --------------------------------------------------------------------------------------------------


class TwoOptimizers(ClassificationTask):
    """Head and body on separate optimizers, stepped in the order given, with a counter kept across resumes."""

    def __init__(self):
        super().__init__()
        self.order: list[str] = []
        self.setup_device = None
        self.counter = 0
        self.eval_contexts: list = []

    def setup(self, device, dist):
        self.setup_device = device

    def configure_optimizers(self, model, cfg):
        head = [p for n, p in model.named_parameters() if n.startswith("head.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        return [OptimizerSpec("body", torch.optim.SGD(body, lr=0.05)),
                OptimizerSpec("head", torch.optim.AdamW(head, lr=1e-3), grad_clip=0.5)]

    def training_step(self, model, batch, cfg, optimizer):
        self.order.append(optimizer)
        self.counter += 1
        loss, metrics = super().training_step(model, batch, cfg)
        return loss, metrics

    def evaluate(self, model, ctx):
        self.eval_contexts.append(ctx)
        return super().evaluate(model, ctx)

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = state["counter"]


def test_several_optimizers_setup_and_task_state(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, ckpt_every=2, eval_every=0)
    task = TwoOptimizers()
    trainer = Trainer(cfg, task)
    assert task.setup_device == torch.device("cpu")
    params = dict(trainer.model.named_parameters())
    body_name = next(n for n in params if not n.startswith("head.") and params[n].ndim == 2)
    head0, body0 = params["head.weight"].detach().clone(), params[body_name].detach().clone()
    res = trainer.fit()
    assert task.order == ["body", "head"] * 4
    assert not torch.equal(params["head.weight"], head0) and not torch.equal(params[body_name], body0)
    ckpt = torch.load(trainer.ckpt_path, weights_only=True)
    assert set(ckpt["optimizers"]) == {"body", "head"} and set(ckpt["schedulers"]) == {"body", "head"}
    assert ckpt["task_state"] == {"counter": 8}
    rows = read_rows(tmp_path, "train")
    assert {"body_loss", "head_loss", "body_grad_norm", "head_grad_norm"} <= set(rows[-1])
    # The final evaluation got a context with a loader, the run directory and the step.
    ctx = task.eval_contexts[-1]
    assert ctx.loader is not None and ctx.out_dir == Path(cfg.out_dir) and ctx.step == 4
    assert "val_acc" in res
    # Resuming restores the task state.
    again = TwoOptimizers()
    Trainer(cfg.replace(resume=True), again)
    assert again.counter == 8


class NoValidation(ClassificationTask):
    """A task whose evaluation needs no validation set (a stand-in for sample-based metrics)."""

    def build_datasets(self, cfg):
        train, _ = super().build_datasets(cfg)
        return train, None

    def evaluate(self, model, ctx):
        assert ctx.loader is None
        (ctx.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        return {"val_samples": float(ctx.step)}


def test_evaluate_runs_without_a_validation_set(tmp_path):
    res = Trainer(tiny_config(tmp_path, max_steps=3), NoValidation()).fit()
    assert res["val_samples"] == 3.0 and (tmp_path / "samples").is_dir()


# ---- plugins, variable and empty batches -------------------------------------------------------------------------


class CountingOptimizer:
    """Wraps an optimizer and counts its steps (what opacus' DPOptimizer does around the real one)."""

    def __init__(self, inner):
        self.inner, self.steps = inner, 0

    @property
    def param_groups(self):
        # A property, as opacus' DPOptimizer has: load_state_dict replaces the inner optimizer's list.
        return self.inner.param_groups

    def step(self):
        self.steps += 1
        self.inner.step()

    def zero_grad(self, set_to_none=True):
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]


@register_plugin("test_poisson")
class PoissonPlugin(Plugin):
    """Poisson sampling at q = B / N, wraps model and optimizer, keeps state, forbids raw gradient statistics."""

    allows_grad_stats = False
    step_on_empty_batch = False

    def __init__(self, config=None):
        super().__init__(config)
        self.wrapped_model = None
        self.optimizer = None
        self.steps_seen = 0

    def wrap_model(self, model):
        self.wrapped_model = model
        return model

    def wrap_optimizer(self, optimizer, model):
        self.optimizer = CountingOptimizer(optimizer)
        return self.optimizer

    def batch_sampler(self, n, *, global_batch, rank, world_size, seed, epoch, start_step):
        return PoissonBatchSampler(n, sample_rate=global_batch / n, rank=rank, world_size=world_size, seed=seed,
                                   epoch=epoch, start_step=start_step)

    def on_step_end(self, trainer):
        self.steps_seen += 1
        return {"plugin_steps": float(self.steps_seen)}

    def epoch_metrics(self, trainer):
        return {"val_plugin_steps": float(self.steps_seen)}

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.steps_seen = state["steps_seen"]


@register_plugin("test_empty_stepper")
class EmptyStepper(PoissonPlugin):
    step_on_empty_batch = True


def test_poisson_sampler_sizes_and_determinism():
    s = PoissonBatchSampler(1000, sample_rate=0.05, seed=3, epoch=1)
    sizes = [len(b) for b in s]
    assert len(sizes) == 20 and len(set(sizes)) > 1  # variable sizes, 1 / q steps
    assert list(PoissonBatchSampler(1000, sample_rate=0.05, seed=3, epoch=1, start_step=5)) == list(s)[5:]
    # Binomial(N, q) sizes: mean and variance over many batches.
    many = torch.tensor([len(PoissonBatchSampler(1000, sample_rate=0.05, seed=0, epoch=e).global_batch(0))
                         for e in range(400)], dtype=torch.float64)
    assert abs(many.mean().item() - 50) < 4 * (47.5 / 400) ** 0.5
    assert 0.7 * 47.5 < many.var().item() < 1.3 * 47.5
    # Two ranks split each global batch contiguously; together they hold it exactly.
    r0 = list(PoissonBatchSampler(1000, sample_rate=0.05, rank=0, world_size=2, seed=3, epoch=1))
    r1 = list(PoissonBatchSampler(1000, sample_rate=0.05, rank=1, world_size=2, seed=3, epoch=1))
    assert [a + b for a, b in zip(r0, r1)] == list(s)


def test_plugin_hooks_variable_batches_and_resume(tmp_path):
    cfg = tiny_config(tmp_path / "full", batch_size=32, max_steps=12, ckpt_every=5, plugins={"test_poisson": {}},
                      eval_every=0)
    trainer = Trainer(cfg, ClassificationTask())
    plugin = trainer.plugins[0]
    assert plugin.wrapped_model is trainer.model and trainer.optimizer is plugin.optimizer
    assert trainer.steps_per_epoch == round(len(trainer.train_dataset) / 32)
    res = trainer.fit()
    assert plugin.optimizer.steps == 12 and res["val_plugin_steps"] == 12.0
    rows = read_rows(tmp_path / "full", "train")
    assert rows and all("grad_norm" not in r for r in rows)  # raw gradient statistics never logged
    # Resumed from the step-10 checkpoint: the plugin state, the wrapped optimizer and the weights carry over.
    cut = cfg.replace(out_dir=str(tmp_path / "cut"))
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(cut, CrashAt(11)).fit()  # dies in step 11; last checkpoint at step 10
    resumed = Trainer(cut.replace(resume=True), ClassificationTask())
    assert resumed.plugins[0].steps_seen == 10 and resumed.optimizer.steps == 10
    resumed.fit()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_variable_batches_weight_the_global_mean(tmp_path):
    # One step on a Poisson batch == a hand-computed SGD step on the mean loss of exactly the sampled examples.
    cfg = tiny_config(tmp_path, batch_size=48, max_steps=1, plugins={"test_poisson": {}}, eval_every=0,
                      optimizer="adamw", lr=1e-3, weight_decay=0.0, warmup_steps=0, augment=False, accum_steps=3)
    trainer = Trainer(cfg, ClassificationTask())
    ref = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    idx = PoissonBatchSampler(len(trainer.train_dataset), sample_rate=48 / len(trainer.train_dataset),
                              seed=cfg.seed, epoch=0).global_batch(0)
    assert len(idx) > 3  # three micro-batches of (generally) uneven sizes
    trainer.fit()
    import copy

    fresh = copy.deepcopy(trainer.model)
    fresh.load_state_dict(ref)
    x = torch.stack([trainer.train_dataset[int(i)][0] for i in idx])
    y = torch.tensor([trainer.train_dataset[int(i)][1] for i in idx])
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.0)
    F.cross_entropy(fresh(x), y).backward()
    grads = {k: p.grad.clone() for k, p in fresh.named_parameters()}
    opt.step()
    for k, v in fresh.state_dict().items():
        # AdamW's first step is lr g / (|g| + 1e-8): where |g| is near 1e-8, float rounding of the micro-batch sum
        # moves the update by up to lr, so those few coordinates are left out.
        keep = grads[k].abs() > 1e-6 if k in grads else torch.ones_like(v, dtype=torch.bool)
        assert keep.float().mean() > 0.99, k
        assert torch.allclose(trainer.model.state_dict()[k][keep], v[keep], atol=1e-6), k


def test_empty_batches_skip_or_step(tmp_path):
    # q = 1 / N: a third of the batches are empty (P(0) = (1 - 1/N)^N ~ e^-1).
    for name, steps_on_empty in (("test_poisson", False), ("test_empty_stepper", True)):
        cfg = tiny_config(tmp_path / name, batch_size=1, max_steps=30, plugins={name: {}}, eval_every=0)
        trainer = Trainer(cfg, ClassificationTask())
        sampler = PoissonBatchSampler(len(trainer.train_dataset), sample_rate=1 / len(trainer.train_dataset),
                                      seed=cfg.seed, epoch=0)
        empty = sum(len(sampler.global_batch(s)) == 0 for s in range(30))
        assert 0 < empty < 30
        res = trainer.fit()
        assert res["steps"] == 30
        expected = 30 if steps_on_empty else 30 - empty
        assert res["optimizer_steps"] == expected and trainer.scheduler.last_step == expected
        assert trainer.optimizer.steps == expected


# ---- config tree ---------------------------------------------------------------------------------------------------


def test_task_section_in_config_cli_and_yaml(tmp_path, capsys):
    cfg = TrainConfig(task={"name": "mcr2", "eps": 0.5, "feature_dim": 16})
    assert cfg.task.name == "mcr2" and cfg.task.eps == 0.5 and cfg.task.n_components == 30
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig(task="mcr2").with_overrides([("task.eps", "0.25")]).task.eps == 0.25
    with pytest.raises(ConfigError, match="unknown config key\\(s\\) 'task.epsilon'"):
        TrainConfig(task={"name": "mcr2", "epsilon": 0.5})
    with pytest.raises(ConfigError, match="task.eps: must be float"):
        TrainConfig(task={"name": "mcr2", "eps": "big"})
    with pytest.raises(UnknownNameError, match="unknown task 'mcr'; did you mean 'mcr2'"):
        TrainConfig(task="mcr")
    f = tmp_path / "run.yaml"
    f.write_text("model: mcr2_mlp_small\nlr: 1e-3\ntask:\n  name: mcr2\n  eps: 0.5\n  feature_dim: 16\n")
    assert main(["train", "--config", str(f), "--task.eps", "0.3", "--set", "task.n_components=4",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out.split("[train] config:\n", 1)[1])
    assert printed["lr"] == 1e-3 and printed["task"] == {**printed["task"], "name": "mcr2", "eps": 0.3,
                                                         "feature_dim": 16, "n_components": 4}
    assert main(["train", "--task", "mcr2", "--task.gamma", "1", "--print-config"]) == 2
    assert "task.gamma: unknown key 'gamma' in task; valid:" in capsys.readouterr().err
    assert main(["train", "--task.eps", "abc", "--task", "mcr2", "--print-config"]) == 2
    assert main(["train", "--task", "icl", "--task.fewshot.noise_std", "0.7", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out.split("[train] config:\n", 1)[1])["task"]["fewshot"]["noise_std"] == 0.7
    # The pre-v2 route (few-shot options through dataset_kwargs) is an error pointing at the task section.
    from ratelab.train import ICLTask

    with pytest.raises(ConfigError, match="--task.fewshot.OPTION"):
        ICLTask().build_datasets(TrainConfig(task="icl", dataset_kwargs={"noise_std": 0.7}))


# ---- resume as a user types it -------------------------------------------------------------------------------------


def _train_cli(out: Path, *extra: str) -> int:
    return main(["train", "--model", "test_crate", "--img-size", "16", "--batch-size", "64", "--epochs", "3",
                 "--ckpt-every", "7", "--lr", "3e-3", "--no-progress", "--device", "cpu", "--out-dir", str(out),
                 *extra])


def test_readme_form_resume_uses_the_saved_run(tmp_path, capsys):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert _train_cli(ref) == 0
    # The same run, as the CLI configures it, dies in step 31 (regular checkpoint at 28, the emergency one at 30).
    cfg = TrainConfig(model="test_crate", img_size=16, batch_size=64, epochs=3, ckpt_every=7, lr=3e-3,
                      progress=False, device="cpu", out_dir=str(cut))
    assert TrainConfig.from_dict(json.loads((ref / "config.json").read_text())) == cfg.replace(out_dir=str(ref))
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(cfg, CrashAt(31)).fit()
    # The README's form: only --out-dir and --resume. The saved settings (3 epochs, ckpt every 7, lr 3e-3) are
    # used, not the defaults.
    capsys.readouterr()
    assert main(["train", "--out-dir", str(cut), "--resume"]) == 0
    assert "resumed at step 30" in capsys.readouterr().out
    a, b = read_state_dict(ref), read_state_dict(cut)
    for k, v in a.items():
        assert torch.equal(b[k], v), k
    # A setting that changes what is computed is refused, naming it; the run length may change (logged).
    assert main(["train", "--out-dir", str(cut), "--resume", "--lr", "0.01"]) == 2
    assert "lr: saved 0.003, now 0.01" in capsys.readouterr().err
    assert main(["train", "--out-dir", str(cut), "--resume", "--epochs", "4"]) == 0
    assert "resume: epochs changed 3 -> 4 (the learning-rate schedule keeps its length of 66 steps)" in \
        capsys.readouterr().out
    assert [r for r in read_rows(cut) if r["kind"] == "resume"][-1]["changed"] == {"epochs": [3, 4]}
    # Resuming nothing is an error, never a silent fresh start.
    assert main(["train", "--out-dir", str(tmp_path / "typo"), "--resume"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_stale_temporary_files_are_removed(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, ckpt_every=2)
    Trainer(cfg, ClassificationTask()).fit()
    stale = tmp_path / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"torn")
    Trainer(cfg.replace(resume=True, max_steps=5), ClassificationTask())
    assert not stale.exists()


# ---- kill -9 at several points, README-form resume, for each task ------------------------------------------------

_TASK_ARGS = {
    "classification": ["--model", "test_crate", "--img-size", "16", "--batch-size", "32"],
    "mcr2": ["--task", "mcr2", "--task.feature_dim", "16", "--task.n_components", "4", "--model", "mcr2_mlp_small",
             "--img-size", "8", "--batch-size", "64"],
    "icl": ["--task", "icl", "--task.val_sequences", "64", "--task.fewshot.n_pairs", "9", "--model", "icl_gpt_tiny",
            "--batch-size", "16"],
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ratelab", "train", *args]


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(_TASK_ARGS))
def test_sigkill_then_readme_resume_is_bitwise(tmp_path, task):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [*_TASK_ARGS[task], "--max-steps", "40", "--ckpt-every", "3", "--eval-every", "1", "--log-every", "1",
              "--no-progress", "--device", "cpu"]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*common, "--out-dir", str(ref)), env=env, check=True, capture_output=True, timeout=300)
    for kill_after in (4, 19):
        out = tmp_path / f"killed{kill_after}"
        proc = subprocess.Popen(_cli(*common, "--out-dir", str(out)), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if (out / "checkpoints" / "last.pt").exists() and metrics.exists():
                    steps = [json.loads(ln).get("step", 0) for ln in metrics.read_text().splitlines()[:-1]]
                    if steps and max(steps) >= kill_after:
                        break
                time.sleep(0.005)
            assert proc.poll() is None, f"{task}: the run ended before the kill at step {kill_after}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert not (out / "model.safetensors").exists()
        res = subprocess.run(_cli("--out-dir", str(out), "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "resumed at step" in res.stdout
        a, b = read_state_dict(ref), read_state_dict(out)
        for k, v in a.items():
            assert torch.equal(b[k], v), (task, kill_after, k)


# ---- FSDP through the trainer ----------------------------------------------------------------------------------


@pytest.mark.distributed
def test_trainer_fsdp_matches_one_process(tmp_path):
    from _dist import run_torchrun

    helper = Path(__file__).with_name("_train_helpers.py")
    cfg = tiny_config(tmp_path / "fsdp", batch_size=64, max_steps=4, accum_steps=2, grad_clip=1.0, eval_every=0,
                      strategy="fsdp", log_every=1)
    res = run_torchrun(helper, "--config-json", json.dumps(cfg.to_dict()), timeout=300)
    assert "world 2 (fsdp)" in res.stdout
    single = Trainer(cfg.replace(out_dir=str(tmp_path / "single"), strategy="ddp"), ClassificationTask())
    single.fit()
    sharded = read_state_dict(tmp_path / "fsdp")  # gathered full weights, the model's own keys
    assert set(sharded) == set(single.model.state_dict())
    for k, v in single.model.state_dict().items():
        assert torch.allclose(sharded[k], v, rtol=1e-5, atol=1e-5), (k, (sharded[k] - v).abs().max().item())
    assert (tmp_path / "fsdp" / "checkpoints" / "last" / "strategy.json").is_file()


@pytest.mark.distributed
def test_ddp_variable_and_empty_local_batches_match_one_process(tmp_path):
    # Expected batch 4 of 1438: ranks often hold 0 or 1 examples, some global batches are empty; gradients are then
    # summed explicitly, and the result must equal one process on the same draws.
    from _dist import run_torchrun

    helper = Path(__file__).with_name("_train_helpers.py")
    cfg = tiny_config(tmp_path / "ddp", batch_size=4, max_steps=25, plugins={"test_poisson": {}}, eval_every=0,
                      log_every=5)
    sampler = [PoissonBatchSampler(1438, sample_rate=4 / 1438, rank=r, world_size=2, seed=0) for r in (0, 1)]
    sizes = [[len(b) for b, _ in zip(s, range(25))] for s in sampler]
    assert 0 in sizes[0] and 0 in sizes[1] and any(a != b for a, b in zip(*sizes))
    res = run_torchrun(helper, "--config-json", json.dumps(cfg.to_dict()), "--dump", tmp_path / "final.pt",
                       timeout=300)
    assert "world 2" in res.stdout
    single = Trainer(cfg.replace(out_dir=str(tmp_path / "single")), ClassificationTask())
    out = single.fit()
    ddp = torch.load(tmp_path / "final.pt", weights_only=True)
    assert ddp["result"]["optimizer_steps"] == out["optimizer_steps"] < 25
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, rtol=1e-5, atol=1e-5), (k, (ddp["state"][k] - v).abs().max().item())
