"""DP-SGD (ratelab.privacy + the ``privacy`` trainer plugin): the checks that make a reported epsilon trustworthy.

* the clipped, summed gradient equals a ``torch.func`` per-sample oracle, for every layer type of the captioner
  (Linear, Conv, LayerNorm, Embedding, attention) and each clipping mode, across micro-batches;
* the added noise has std sigma * C (measured), drawn once per logical step; batch sizes follow Binomial(N, q);
* the reported epsilon equals opacus' accountant stepped through the same run; DP-Cap's setting gives 8.07 (RDP)
  and 7.37 (PRV);
* kill-and-resume ends with the same weights and epsilon; clear errors for what breaks DP.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _train_helpers import read_rows, tiny_config

import ratelab
from ratelab.core.errors import ConfigError
from ratelab.privacy import (
    PrivacyConfig,
    check_private_module,
    clipped_backward,
    clipped_gradient_sum_ref,
    compute_epsilon,
    epsilon_from_history,
    find_noise_multiplier,
    make_per_sample_module,
    tan_noise_multiplier,
)
from ratelab.train import ClassificationTask, TrainConfig, Trainer
from ratelab.train.tasks import Task

MODES = ("ghost", "hooks", "functorch")

pytestmark = pytest.mark.filterwarnings(
    # torch.func's vmap over SDPA on CPU (the oracle) has no batching rule yet: slower, exact.
    "ignore:There is a performance drop because we have not yet implemented:UserWarning")


# ---- accounting --------------------------------------------------------------------------------------------------


def test_dpcap_setting_epsilon_rdp_and_prv():
    # DP-Cap: sigma 0.728, B = 1,310,720 of N = 233M, T = 5,708, delta = 1/N (trust.md §1.4). PRV takes ~1.5 s.
    n, b, t = 233_000_000, 1_310_720, 5708
    assert compute_epsilon(0.728, b / n, t, 1 / n, "rdp") == pytest.approx(8.07, abs=0.01)
    assert compute_epsilon(0.728, b / n, t, 1 / n, "prv") == pytest.approx(7.37, abs=0.02)
    sigma = find_noise_multiplier(8.0, 1 / n, b / n, t, "rdp")
    assert sigma == pytest.approx(0.730, abs=0.002) and compute_epsilon(sigma, b / n, t, 1 / n) <= 8.0
    # More steps, less noise, bigger delta: epsilon moves the right way.
    assert compute_epsilon(0.728, b / n, 2 * t, 1 / n) > 8.07 > compute_epsilon(0.9, b / n, t, 1 / n)
    assert tan_noise_multiplier(0.728, b, 4096) == pytest.approx(0.728 * 4096 / b)
    with pytest.raises(ValueError, match="sample_rate"):
        compute_epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon(1.0, 0.01, 10, 1e-5, accountant="gdp")


def test_privacy_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="plugins.privacy: give exactly one of target_epsilon and noise_multiplier"):
        TrainConfig(plugins={"privacy": {}})
    with pytest.raises(ConfigError, match="exactly one"):
        TrainConfig(plugins={"privacy": {"target_epsilon": 8, "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="plugins.privacy.clipping: must be one of"):
        TrainConfig(plugins={"privacy": {"target_epsilon": 8, "clipping": "fast"}})
    with pytest.raises(ConfigError, match="delta: must be in"):
        TrainConfig(plugins={"privacy": {"noise_multiplier": 1.0, "delta": 2.0}})
    cfg = TrainConfig().with_overrides([("plugins.privacy.target_epsilon", "8"), ("plugins.privacy.accountant", "prv")])
    assert cfg.plugins["privacy"] == PrivacyConfig(target_epsilon=8.0, accountant="prv")


# ---- clipping vs the torch.func oracle --------------------------------------------------------------------------


class Attention(nn.Module):
    """Self- or cross-attention as the captioner writes it: Linear projections around SDPA (causal optional)."""

    def __init__(self, d: int, heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.q, self.kv, self.proj, self.heads, self.causal = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d), \
            nn.Linear(d, d), heads, causal

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        src = x if memory is None else memory
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Captioner(nn.Module):
    """Every layer type of DP-Cap in miniature: Conv patches, LayerNorm, self/cross attention, Embedding, head."""

    def __init__(self, d: int = 16, vocab: int = 11) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.norm = nn.LayerNorm(d)
        self.enc = Attention(d)
        self.bridge = nn.Linear(d, d)
        self.embed = nn.Embedding(vocab, d)
        self.self_attn = Attention(d, causal=True)
        self.cross = Attention(d)
        self.head_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, img: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = x + self.enc(self.norm(x))
        mem = self.bridge(x)
        h = self.embed(tokens)
        h = h + self.self_attn(h)
        h = h + self.cross(h, mem)
        return self.head(self.head_norm(h))


def caption_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    # Mean next-token cross-entropy over each caption's non-pad targets (pad id 0): the caption task's contract.
    tgt = tokens[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=0, reduction="none")
    return ce.sum(1) / (tgt != 0).sum(1)


def _layer_cases():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(6, 3, 8, 8, generator=g)
    tok = torch.randint(1, 11, (6, 5), generator=g)
    tok[1, 3:] = 0
    tok[4, 2:] = 0
    seq = torch.randn(6, 4, 16, generator=g)
    y = torch.randint(0, 3, (6,), generator=g)

    def cls(call, x, y):
        return F.cross_entropy(call(x).reshape(x.shape[0], -1)[:, :3], y)

    linear = nn.Sequential(nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3))
    # Over 12 tokens of width 4 -> 3 the direct norm is cheaper than the Gram route: both routes are exercised.
    tokens = nn.Sequential(nn.Linear(4, 3), nn.GELU(), nn.Flatten(1), nn.Linear(36, 3))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(1), nn.Linear(12, 3))
    norm = nn.Sequential(nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    embed = nn.Sequential(nn.Embedding(11, 8, padding_idx=0), nn.Flatten(1), nn.Linear(40, 3))
    attn = nn.Sequential(Attention(16), nn.Flatten(1), nn.Linear(64, 3))
    return {
        "linear": (linear, cls, (seq[:, 0], y)),
        "linear_tokens": (tokens, cls, (torch.randn(6, 12, 4, generator=g), y)),
        "conv": (conv, cls, (img, y)),
        "layernorm": (norm, cls, (seq[:, 0], y)),
        "embedding": (embed, cls, (tok, y)),
        "attention": (attn, cls, (seq, y)),
        "captioner": (Captioner(), lambda call, im, t: caption_losses(call(im, t), t)[0], (img, tok)),
        # A learned cls_token / pos_embed on the model itself: opacus vmaps the whole forward for them.
        "vit_tokens": (ratelab.create_model("test_crate", num_classes=3, img_size=8, in_chans=3), cls, (img, y)),
    }


CASES = _layer_cases()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_sum_equals_torch_func_oracle(case, mode):
    torch.manual_seed(1)
    model, loss_one, batch = CASES[case]
    model = copy.deepcopy(model)
    _, norms = clipped_gradient_sum_ref(model, loss_one, *batch, max_grad_norm=1.0)
    c = float(norms.median())  # about half the examples are clipped, half pass unchanged
    ref, _ = clipped_gradient_sum_ref(model, loss_one, *batch, max_grad_norm=c)
    unclipped, _ = clipped_gradient_sum_ref(model, loss_one, *batch, max_grad_norm=1e9)
    private = make_per_sample_module(model, mode)

    def losses(*mb):
        if case == "captioner":
            return caption_losses(private(*mb), mb[1])
        if case == "vit_tokens":
            return F.cross_entropy(private(mb[0]), mb[1], reduction="none")
        x, y = mb
        return F.cross_entropy(private(x).reshape(x.shape[0], -1)[:, :3], y, reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clipped_backward itself must be quiet
        for sl in (slice(0, 2), slice(2, 6)):  # two micro-batches accumulate into one clipped sum
            clipped_backward(private, losses(*(t[sl] for t in batch)), max_grad_norm=c)
    scale = max(g.abs().max().item() for g in ref.values())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[name], atol=1e-6 * scale, rtol=1e-4), (name, case, mode)
        assert getattr(p, "grad_sample", None) is None and not hasattr(p, "_norm_sample")  # nothing left behind
    # The clipping did something: the unclipped sum differs.
    assert any(not torch.allclose(unclipped[k], ref[k], atol=1e-5) for k in ref)


def test_dpcap_model_clipped_sum_and_bf16():
    # The real captioner (test size), ghost clipping; under bf16 autocast it stays within bf16 rounding.
    model = ratelab.create_model("test_dpcap")
    g = torch.Generator().manual_seed(0)
    s = model.img_size
    img = torch.randn(4, 3, s, s, generator=g)
    tok = torch.randint(4, 40, (4, 7), generator=g)
    tok[1, 5:] = 0
    ref, _ = clipped_gradient_sum_ref(model, lambda call, im, t: caption_losses(call(im, t), t)[0], img, tok,
                                      max_grad_norm=8.0)
    for amp in (False, True):
        m = copy.deepcopy(model)
        private = make_per_sample_module(m, "ghost")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            losses = caption_losses(private(img, tok), tok)
        clipped_backward(private, losses, max_grad_norm=8.0)
        tol = 5e-2 if amp else 1e-5
        for name, p in m.named_parameters():
            if p.requires_grad:
                assert (p.grad - ref[name]).abs().max() <= tol * ref[name].abs().max() + 1e-7, (name, amp)


def test_errors_for_what_breaks_dp():
    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"1 \(BatchNorm2d\): BatchNorm cannot support training"):
        check_private_module(bn)

    class MyBN(nn.BatchNorm2d):  # a subclass mixes examples just the same (opacus looks up the exact type)
        pass

    from timm.layers import BatchNormAct2d

    for sub in (MyBN(4), BatchNormAct2d(4, track_running_stats=False)):
        with pytest.raises(ConfigError, match=rf"1 \({type(sub).__name__}\)"):
            check_private_module(nn.Sequential(nn.Conv2d(3, 4, 3), sub))
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ConfigError, match=r"0 \(MultiheadAttention\)"):
        check_private_module(mha)
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match=r"parameter tying.*0.weight = 1.weight"):
        check_private_module(tied, "ghost")
    check_private_module(tied, "hooks")  # opacus' hooks sum a tied parameter's per-sample gradients

    class Reused(nn.Module):  # one module called twice: tying at run time
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    private = make_per_sample_module(Reused(), "ghost")
    with pytest.raises(ConfigError, match="'lin' .* ran twice in one forward pass"):
        private(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"per-example losses, got shape \(\)"):
        clipped_backward(make_per_sample_module(nn.Linear(4, 1)), torch.tensor(1.0), max_grad_norm=1.0)


class MeanLossTask(ClassificationTask):
    """Classification that does not declare per-example losses (a contrastive or batch-level loss would not)."""

    per_sample_loss = False


class WrongShapeTask(ClassificationTask):
    def training_step(self, model, batch, cfg, per_sample=False):
        loss, m = super().training_step(model, batch, cfg, per_sample=per_sample)
        return loss.mean(), m


def test_trainer_refuses_non_per_sample_losses(tmp_path):
    cfg = tiny_config(tmp_path / "a", batch_size=32, max_steps=1, plugins={"privacy": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="needs per-example losses, and task MeanLossTask does not provide them"):
        Trainer(cfg, MeanLossTask())
    with pytest.raises(TypeError, match=r"must return a \(\d+,\) vector of per-example losses"):
        Trainer(cfg.replace(out_dir=str(tmp_path / "b")), WrongShapeTask()).fit()
    assert isinstance(Task.per_sample_loss, bool) and not Task.per_sample_loss


# ---- the trainer plugin ------------------------------------------------------------------------------------------


def _dp_cfg(out, **privacy):
    # 1438 digits, B = 240: q = 0.167, 6 steps per epoch; 12 steps = 2 epochs, checkpoints every 5.
    opts = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "dp_seed": 7, **privacy}
    return tiny_config(out, batch_size=240, max_steps=12, ckpt_every=5, eval_every=1, plugins={"privacy": opts})


class CrashAt(ClassificationTask):
    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def training_step(self, model, batch, cfg, per_sample=False):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("crash")
        return super().training_step(model, batch, cfg, per_sample=per_sample)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "full"
    trainer = Trainer(_dp_cfg(out), ClassificationTask())
    return trainer, trainer.fit(), out


def test_dp_run_reports_epsilon_per_epoch_and_never_raw_gradients(dp_run):
    trainer, res, out = dp_run
    plugin = trainer.plugins[0]
    n = len(trainer.train_dataset)
    assert trainer.steps_per_epoch == 6 and res["optimizer_steps"] == 12
    # Reported epsilon == opacus' accountants stepped once per logical step (their own API, not our history).
    from opacus.accountants import PRVAccountant, RDPAccountant

    rdp, prv = RDPAccountant(), PRVAccountant()
    for _ in range(12):
        rdp.step(noise_multiplier=1.0, sample_rate=240 / n)
        prv.step(noise_multiplier=1.0, sample_rate=240 / n)
    assert res["dp_epsilon_rdp"] == pytest.approx(rdp.get_epsilon(1 / n), rel=1e-12)
    assert res["dp_epsilon_prv"] == pytest.approx(prv.get_epsilon(1 / n, eps_error=0.01), rel=1e-9)
    # dp_seed=7 is known: the noise and batches can be recomputed, so the run carries no guarantee and says so
    assert res["dp_epsilon"] == res["dp_epsilon_rdp"] and res["dp_delta"] == 1 / n and res["dp_guarantee"] == 0.0
    assert json.loads((out / "final_metrics.json").read_text())["dp_epsilon_prv"] == res["dp_epsilon_prv"]
    ev = read_rows(out, "eval")
    assert [r["step"] for r in ev] == [6, 12] and ev[0]["dp_epsilon_rdp"] < ev[1]["dp_epsilon_rdp"]
    assert ev[0]["dp_epsilon_rdp"] == pytest.approx(epsilon_from_history([(1.0, 240 / n, 6)], 1 / n))
    report = json.loads((out / "privacy.json").read_text())
    assert [e["epoch"] for e in report["per_epoch"]] == [1, 2] and report["formal_guarantee"] is False
    assert report["history"] == [[1.0, 240 / n, 12]] and report["epsilon_rdp"] == res["dp_epsilon_rdp"]
    assert report["no_guarantee_reasons"] == [PrivacyConfig(noise_multiplier=1.0, dp_seed=7).no_guarantee_reasons()[0]]
    assert not any(k.startswith("tan_") for k in res)
    for row in read_rows(out):
        assert not any("grad" in k or "norm" in k for k in row), row  # no raw gradient statistics, ever
    assert plugin.optimizer.noise_multiplier == 1.0 and plugin.optimizer.expected_batch_size == 240


def test_kill_and_resume_same_weights_and_epsilon(dp_run, tmp_path):
    trainer, res, _ = dp_run
    cut = _dp_cfg(tmp_path / "cut")
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(cut, CrashAt(11)).fit()  # dies in step 11; the checkpoint of step 10 has 10 steps of history
    resumed = Trainer(cut.replace(resume=True), ClassificationTask())
    assert resumed.plugins[0].ledger.steps == 10
    out = resumed.fit()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    for k in ("dp_epsilon_rdp", "dp_epsilon_prv", "dp_steps"):
        assert out[k] == res[k], k
    assert resumed.plugins[0].ledger.history == trainer.plugins[0].ledger.history
    assert torch.equal(resumed.plugins[0].generator.get_state(), trainer.plugins[0].generator.get_state())


def test_noise_std_is_sigma_c_and_drawn_once_per_step(tmp_path):
    # A loss with zero gradient: the update is pure noise, N(0, (sigma C)^2) / B per coordinate, one draw per step.
    class ZeroGrad(ClassificationTask):
        def training_step(self, model, batch, cfg, per_sample=False):
            losses, m = super().training_step(model, batch, cfg, per_sample=True)
            return losses * 0.0, m

    sigma, c = 0.8, 2.5
    trainer = Trainer(_dp_cfg(tmp_path, noise_multiplier=sigma, max_grad_norm=c).replace(max_steps=4, ckpt_every=0),
                      ZeroGrad())
    plugin = trainer.plugins[0]
    seen = []
    inner = plugin.optimizer.original_optimizer
    step = inner.step

    def capture(*a, **k):
        seen.append(torch.cat([p.grad.reshape(-1) for g in inner.param_groups for p in g["params"]]).clone())
        return step(*a, **k)

    inner.step = capture
    replica = torch.Generator().manual_seed(0)
    replica.set_state(plugin.generator.get_state())
    shapes = [p.shape for g in inner.param_groups for p in g["params"]]
    trainer.fit()
    noise = torch.stack(seen) * 240  # the update divides the noisy sum by the expected batch size
    assert noise.numel() > 30_000
    assert noise.std().item() == pytest.approx(sigma * c, rel=0.02) and abs(noise.mean().item()) < 0.03
    assert not torch.equal(noise[0], noise[1])
    for _ in range(4):  # exactly one N(0, I) draw per parameter per step, from this generator
        for s in shapes:
            torch.normal(0, 1.0, s, generator=replica)
    assert torch.equal(replica.get_state(), plugin.generator.get_state())


def test_poisson_batch_sizes_follow_binomial(tmp_path):
    from scipy import stats

    trainer = Trainer(_dp_cfg(tmp_path, poisson=True), ClassificationTask())
    sampler = trainer._batch_sampler(epoch=0, start_step=0)
    # q from the config, not from the sampler: a sampler that computes its rate wrongly must fail here.
    n = len(trainer.train_dataset)
    q = trainer.cfg.batch_size / n
    sizes = torch.tensor([len(sampler.global_batch(s)) for s in range(1500)]).numpy()
    # Pool the tails so that every bin expects >= 20 draws, then chi-square against Binomial(N, q).
    lo, hi = int(stats.binom.ppf(0.02, n, q)), int(stats.binom.ppf(0.98, n, q))
    obs = [(sizes < lo).sum()] + [(sizes == k).sum() for k in range(lo, hi + 1)] + [(sizes > hi).sum()]
    p = [stats.binom.cdf(lo - 1, n, q)] + [stats.binom.pmf(k, n, q) for k in range(lo, hi + 1)] + \
        [stats.binom.sf(hi, n, q)]
    exp = [pi * len(sizes) for pi in p]
    merged_o, merged_e, acc_o, acc_e = [], [], 0, 0.0
    for o, e in zip(obs, exp):
        acc_o, acc_e = acc_o + o, acc_e + e
        if acc_e >= 20:
            merged_o.append(acc_o)
            merged_e.append(acc_e)
            acc_o, acc_e = 0, 0.0
    merged_o[-1] += acc_o
    merged_e[-1] += acc_e
    assert stats.chisquare(merged_o, merged_e).pvalue > 1e-3
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / len(sizes))


def test_poisson_sampling_is_exact_at_tiny_rates():
    """q = 1.5 / 2^24: a float32 uniform compared with q joins with probability 2 / 2^24 (33% too often, as
    DP-Cap-like rates q = 128 / 233M would be 8.5% too often); the batch sizes must average N q."""
    from ratelab.train.data import PoissonBatchSampler

    n, q, steps = 2**24, 1.5 / 2**24, 400
    sampler = PoissonBatchSampler(n, sample_rate=q, seed=3, steps=steps)
    batches = [sampler.global_batch(s) for s in range(steps)]
    total = sum(len(b) for b in batches)
    assert abs(total - steps * n * q) < 4 * math.sqrt(steps * n * q)  # 600 +- 98; float32 draws give ~800
    assert all(bool((b.diff() > 0).all()) and (len(b) == 0 or 0 <= int(b[0]) <= int(b[-1]) < n) for b in batches)
    # Every example joins with the same probability q (the size is Binomial(N, q), the subset uniform).
    small = PoissonBatchSampler(40, sample_rate=0.3, seed=5, steps=3000)
    counts = torch.zeros(40)
    for s in range(3000):
        counts[small.global_batch(s)] += 1
    assert (counts - 900).abs().max() < 5 * math.sqrt(3000 * 0.3 * 0.7)
    full = PoissonBatchSampler(40, sample_rate=1.0, seed=5)
    assert torch.equal(full.global_batch(0), torch.arange(40))


def test_empty_batches_step_with_noise_and_count(tmp_path):
    # q = 1/N: about a third of the batches are empty; each still spends budget and takes a noisy update.
    cfg = tiny_config(tmp_path, batch_size=1, max_steps=20, eval_every=0,
                      plugins={"privacy": {"noise_multiplier": 2.0, "dp_seed": 1}})
    trainer = Trainer(cfg, ClassificationTask())
    sampler = trainer._batch_sampler(epoch=0, start_step=0)
    assert any(len(sampler.global_batch(s)) == 0 for s in range(20))
    res = trainer.fit()
    assert res["optimizer_steps"] == 20 and res["dp_steps"] == 20.0


def test_physical_batches_equal_one_big_batch(tmp_path):
    # The same logical batches and noise, split into micro-batches of <= 16: the same update up to float rounding.
    runs = {}
    for name, phys in (("one", None), ("split", 16)):
        cfg = _dp_cfg(tmp_path / name, physical_batch_size=phys, clipping="hooks").replace(max_steps=2, ckpt_every=0,
                                                                                          eval_every=0)
        trainer = Trainer(cfg, ClassificationTask())
        calls = []
        backward = trainer.plugins[0].backward
        trainer.plugins[0].backward = lambda losses, calls=calls, backward=backward, **k: (
            calls.append(len(losses)), backward(losses, **k))
        trainer.fit()
        runs[name] = (trainer.model.state_dict(), calls)
    assert max(runs["split"][1]) <= 16 < max(runs["one"][1]) and sum(runs["split"][1]) == sum(runs["one"][1])
    for k, v in runs["one"][0].items():
        assert torch.allclose(runs["split"][0][k], v, atol=1e-5), k


def test_tan_simulation_scales_sigma_and_says_no_guarantee(tmp_path):
    cfg = _dp_cfg(tmp_path, tan_batch_size=60).replace(max_steps=6, ckpt_every=0)
    trainer = Trainer(cfg, ClassificationTask())
    plugin = trainer.plugins[0]
    n = len(trainer.train_dataset)
    assert trainer.steps_per_epoch == 6  # the full-batch run's epoch length: same steps
    assert plugin.optimizer.noise_multiplier == pytest.approx(1.0 * 60 / 240) and plugin.expected_batch == 60
    assert trainer._batch_sampler(epoch=0, start_step=0).q == pytest.approx(60 / n)
    res = trainer.fit()
    assert res["dp_guarantee"] == 0.0 and res["dp_tan_noise_multiplier"] == pytest.approx(0.25)
    # The simulated run's epsilon, named so that nothing reads as this run's guarantee: no dp_epsilon* anywhere.
    assert res["tan_simulated_epsilon_rdp"] == pytest.approx(compute_epsilon(1.0, 240 / n, 6, 1 / n))
    assert res["tan_simulated_epsilon"] == res["tan_simulated_epsilon_rdp"] and res["tan_simulated_epsilon_prv"] > 0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["guarantee"].startswith("NO PRIVACY GUARANTEE") and "TAN simulation" in report["guarantee"]
    assert report["tan_simulated_epsilon_rdp"] == res["tan_simulated_epsilon_rdp"]
    assert set(report["per_epoch"][0]) == {"epoch", "step", "tan_simulated_epsilon_rdp", "tan_simulated_epsilon_prv"}
    outputs = [res, report, *report["per_epoch"], json.loads((tmp_path / "final_metrics.json").read_text()),
               *read_rows(tmp_path)]
    assert not [k for o in outputs for k in o if k.startswith(("dp_epsilon", "epsilon"))]


def test_target_epsilon_solves_sigma_for_the_run(tmp_path):
    # B = 24 keeps opacus' sigma search short (~1 s); 12 steps of the 60-step epoch.
    cfg = _dp_cfg(tmp_path, noise_multiplier=None, target_epsilon=3.0, accountant="rdp").replace(
        ckpt_every=0, batch_size=24, eval_every=0)
    trainer = Trainer(cfg, ClassificationTask())
    res = trainer.fit()
    assert 2.9 <= res["dp_epsilon_rdp"] <= 3.0 and res["dp_epsilon"] == res["dp_epsilon_rdp"]


class _Captions(torch.utils.data.Dataset):
    """A few random 8x8 images with short captions (items ``(image, caption)``, as the caption datasets give)."""

    WORDS = ("red", "blue", "square", "circle", "small", "big", "left", "right")

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        lens = torch.randint(1, 5, (n,), generator=g)
        self.caps = [" ".join(self.WORDS[int(i)] for i in torch.randint(0, 8, (int(k),), generator=g)) for k in lens]

    def __len__(self) -> int:
        return len(self.caps)

    def __getitem__(self, i: int):
        return self.images[i], self.caps[i]

    def captions(self) -> list[str]:
        return list(self.caps)


def test_caption_task_dp_step_equals_hand_computed_dp_sgd(tmp_path):
    # One trainer step of the caption task under the plugin == Poisson batch -> oracle clipped sum (per-caption
    # mean CE) -> + the same N(0, (sigma C)^2) draw -> / B -> AdamW, computed here by hand.
    from ratelab.data.text_tokenizer import CaptionTokenizer
    from ratelab.train.caption_task import CaptionTask

    data = _Captions()
    # The vocabulary from the dataset's word list (code, public): one fit on the captions would be refused under DP.
    tok = CaptionTokenizer.train([" ".join(_Captions.WORDS)], 48, public=True, source="the test's word list")
    task = CaptionTask(train_dataset=data, tokenizer=tok, max_len=8, vocab_size=48, n_generate=0)
    cfg = TrainConfig(model="test_dpcap", task=task.config, batch_size=12, max_steps=1, lr=1e-3, warmup_steps=0,
                      weight_decay=0.0, progress=False, out_dir=str(tmp_path), device="cpu", eval_every=0,
                      img_size=8, plugins={"privacy": {"noise_multiplier": 0.9, "max_grad_norm": 0.7, "dp_seed": 4,
                                                       "physical_batch_size": 5}})
    trainer = Trainer(cfg, task)
    plugin = trainer.plugins[0]
    start = ratelab.create_model("test_dpcap", **task.model_kwargs(trainer.cfg))  # no opacus hooks on this one
    start.load_state_dict(trainer.model.state_dict())
    noise_gen = torch.Generator().manual_seed(0)
    noise_gen.set_state(plugin.generator.get_state())
    idx = trainer._batch_sampler(epoch=0, start_step=0).global_batch(0)
    assert len(idx) > 5  # several physical micro-batches
    trainer.fit()
    img = torch.stack([trainer.train_dataset[int(i)][0] for i in idx])
    tok = torch.stack([trainer.train_dataset[int(i)][1] for i in idx])
    ref, _ = clipped_gradient_sum_ref(start, lambda call, im, t: caption_losses(call(im, t), t)[0], img, tok,
                                      max_grad_norm=0.7)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_name = dict(start.named_parameters())
    params = [by_name[names[id(p)]] for p in plugin.optimizer.params]  # the DP optimizer's noise order
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    name_of = {id(v): k for k, v in by_name.items()}
    for p in params:
        noise = torch.normal(mean=0, std=0.9 * 0.7, size=p.shape, generator=noise_gen)
        p.grad = (ref[name_of[id(p)]] + noise) / 12
    opt.step()
    for k, v in start.state_dict().items():
        assert torch.allclose(trainer.model.state_dict()[k], v, atol=1e-6), k


@pytest.mark.parametrize("mode", MODES)
def test_fp16_loss_scale_scales_the_threshold(mode):
    # With a GradScaler the backward runs on scaled losses: p.grad must be S x the unscaled clipped sum (the
    # scaler unscales it). An overflowing example is dropped (tests/test_privacy_fast.py).
    class Scaler:
        def __init__(self, s):
            self.s = s

        def get_scale(self):
            return self.s

    model, loss_one, (x, y) = CASES["layernorm"]
    ref, norms = clipped_gradient_sum_ref(model, loss_one, x, y, max_grad_norm=1.0)
    c = float(norms.median())
    ref, _ = clipped_gradient_sum_ref(model, loss_one, x, y, max_grad_norm=c)
    m = copy.deepcopy(model)
    private = make_per_sample_module(m, mode)
    clipped_backward(private, F.cross_entropy(private(x)[:, :3], y, reduction="none"), max_grad_norm=c,
                     scaler=Scaler(1024.0))
    for name, p in m.named_parameters():
        assert torch.allclose(p.grad / 1024.0, ref[name], atol=1e-6, rtol=1e-4), name


def test_default_seed_is_fresh_entropy_and_checkpointed(tmp_path):
    # dp_seed unset: every run draws its own secret seed (batches and noise unknown to whoever knows the config),
    # and a resumed run takes it from the checkpoint.
    cfg = tiny_config(tmp_path / "a", batch_size=240, max_steps=2, eval_every=0,
                      plugins={"privacy": {"noise_multiplier": 1.0}})
    a = Trainer(cfg, ClassificationTask())
    b = Trainer(cfg.replace(out_dir=str(tmp_path / "b")), ClassificationTask())
    pa, pb = a.plugins[0], b.plugins[0]
    assert pa._seed != pb._seed and not torch.equal(pa.generator.get_state(), pb.generator.get_state())
    batches = [list(t._batch_sampler(epoch=0, start_step=0))[0] for t in (a, b)]
    assert batches[0] != batches[1]
    a.fit()
    resumed = Trainer(cfg.replace(resume=True, max_steps=3), ClassificationTask())
    assert resumed.plugins[0]._seed == pa._seed
    assert torch.equal(resumed.plugins[0].generator.get_state(), pa.generator.get_state())


def test_a_known_seed_or_a_simulation_is_never_reported_as_a_guarantee():
    """Only Poisson sampling with fresh noise is (epsilon, delta)-DP: with dp_seed known anyone can regenerate every
    noise draw and batch; TAN and shuffled batches are not what the accountant assumes."""
    assert PrivacyConfig(noise_multiplier=1.0).has_guarantee
    for cfg in (PrivacyConfig(noise_multiplier=1.0, dp_seed=0), PrivacyConfig(noise_multiplier=1.0, tan_batch_size=8),
                PrivacyConfig(noise_multiplier=1.0, poisson=False)):
        assert not cfg.has_guarantee and cfg.guarantee_note().startswith("NO PRIVACY GUARANTEE")
    assert "dp_seed=0" in PrivacyConfig(noise_multiplier=1.0, dp_seed=0).guarantee_note()


def test_optimizer_parameters_outside_the_model_are_refused():
    """A parameter the optimizer steps but the wrapped model does not own would keep its raw gradient."""
    from ratelab.train.privacy_plugin import PrivacyPlugin

    model, extra = nn.Linear(4, 2), nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(ConfigError, match=r"1 trainable parameter\(s\) that are not in the model"):
        PrivacyPlugin(PrivacyConfig(noise_multiplier=1.0)).wrap_optimizer(opt, model)
