"""MCR² training task, subspace evaluators and the mcr2-label-noise recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _dist import run_torchrun

from ratelab.eval.subspace import (
    class_subspace_cosines,
    linear_probe,
    nearest_subspace_fit,
    nearest_subspace_predict,
    nearest_subspace_residuals,
    principal_angles,
)


def _orthogonal_subspace_data(n_per: int, K: int, dim: int, d: int, seed: int, noise: float = 0.0):
    """K mutually orthogonal dim-dimensional subspaces of R^d (one random orthonormal frame cut in blocks)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    X, y = [], []
    for k in range(K):
        U = Q[:, k * dim : (k + 1) * dim]
        X.append(torch.randn(n_per, dim, generator=g, dtype=torch.float64) @ U.T)
        y.append(torch.full((n_per,), k))
    X = torch.cat(X)
    X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)
    return X, torch.cat(y), Q


# ---- nearest subspace ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
def test_nearest_subspace_orthogonal_subspaces_perfect(centered):
    X, y, _ = _orthogonal_subspace_data(40, 4, 3, 16, seed=0, noise=0.01)
    Xt, yt, _ = _orthogonal_subspace_data(25, 4, 3, 16, seed=0, noise=0.01)  # same frame (same seed), new draws
    Xt, yt = Xt[-100:], yt[-100:]
    fit = nearest_subspace_fit(X, y, n_components=3, centered=centered)
    assert fit.ranks.tolist() == [3, 3, 3, 3]
    assert (nearest_subspace_predict(fit, Xt) == yt).all()
    # Residual to its own subspace is ~noise; to another orthogonal subspace it is ~ the whole norm.
    res = nearest_subspace_residuals(fit, Xt)
    own = res[torch.arange(len(yt)), yt]
    assert own.max() < 0.2 and res.min(1).values.equal(own)


def test_nearest_subspace_fails_when_classes_share_a_subspace():
    # Two classes drawn from the SAME 3-d subspace (different scales don't matter to a subspace): nearest subspace
    # cannot tell them apart, so accuracy must be near chance, not 100%.
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    X = torch.randn(400, 3, generator=g, dtype=torch.float64) @ U.T
    y = torch.arange(400) % 2
    fit = nearest_subspace_fit(X[:200], y[:200], n_components=3, centered=False)
    acc = (nearest_subspace_predict(fit, X[200:]) == y[200:]).double().mean().item()
    assert 0.3 < acc < 0.7


def test_nearest_subspace_too_few_components_fails():
    # Both classes share a dominant direction e1 and differ only in a weaker second one (e2 vs e3): with one
    # component per class both fits are ~e1 and the classifier is near chance; with two it is perfect.
    g = torch.Generator().manual_seed(3)
    n = 300
    big = 5 * torch.randn(2 * n, generator=g, dtype=torch.float64)
    small = torch.randn(2 * n, generator=g, dtype=torch.float64)
    X = torch.zeros(2 * n, 4, dtype=torch.float64)
    X[:, 0] = big
    X[:n, 1], X[n:, 2] = small[:n], small[n:]
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    tr, te = torch.arange(2 * n) % 2 == 0, torch.arange(2 * n) % 2 == 1
    acc = {}
    for r in (1, 2):
        fit = nearest_subspace_fit(X[tr], y[tr], n_components=r, centered=False)
        acc[r] = (nearest_subspace_predict(fit, X[te]) == y[te]).double().mean().item()
    assert acc[2] == 1.0
    assert acc[1] < 0.75


def test_nearest_subspace_edge_cases():
    X, y, _ = _orthogonal_subspace_data(5, 2, 2, 8, seed=4)
    fit = nearest_subspace_fit(X, y, n_components=50, num_classes=3)  # capped; class 2 absent
    assert fit.ranks.tolist()[:2] == [2, 2] and fit.ranks[2] == 0
    assert not fit.present[2]
    assert math.isinf(nearest_subspace_residuals(fit, X)[0, 2].item())
    assert (nearest_subspace_predict(fit, X) != 2).all()
    with pytest.raises(ValueError, match="n_components"):
        nearest_subspace_fit(X, y, n_components=0)
    with pytest.raises(ValueError, match="labels"):
        nearest_subspace_fit(X, y[:-1], n_components=2)
    with pytest.raises(ValueError, match="num_classes"):
        nearest_subspace_fit(X, y, n_components=2, num_classes=1)
    with pytest.raises(ValueError, match="d=8"):
        nearest_subspace_predict(fit, torch.zeros(3, 5))


# ---- principal angles ----------------------------------------------------------------------------------------------


def test_principal_angles_hand_case():
    t = 0.3
    e = torch.eye(4, dtype=torch.float64)
    A = e[:, :2]
    B = torch.stack([e[:, 0], math.cos(t) * e[:, 1] + math.sin(t) * e[:, 2]], 1)
    ang = principal_angles(A, B)
    torch.testing.assert_close(ang, torch.tensor([0.0, t], dtype=torch.float64), atol=1e-7, rtol=0)
    # Not orthonormal input, same spans -> same angles; orthogonal spans -> pi/2.
    torch.testing.assert_close(principal_angles(3 * A + A[:, [1, 0]], B), ang, atol=1e-7, rtol=0)
    torch.testing.assert_close(principal_angles(e[:, :1], e[:, 2:]), torch.tensor([math.pi / 2], dtype=torch.float64))
    with pytest.raises(ValueError, match="ambient"):
        principal_angles(A, torch.eye(3, dtype=torch.float64)[:, :1])


def test_class_subspace_cosines_orthogonal_vs_shared():
    X, y, _ = _orthogonal_subspace_data(30, 3, 2, 10, seed=5)
    m = class_subspace_cosines(nearest_subspace_fit(X, y, 2, centered=False))
    torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
    assert m[~torch.eye(3, dtype=torch.bool)].abs().max() < 1e-8
    # Class 0's 30 samples (one 2-d subspace) split into two labels: both fits span the same plane.
    shared = class_subspace_cosines(nearest_subspace_fit(X[:30], torch.arange(30) % 2, 2, centered=False))
    assert shared[0, 1] == pytest.approx(1.0, abs=1e-8)


# ---- linear probe --------------------------------------------------------------------------------------------------


def test_linear_probe_separable_vs_random_and_reference():
    g = torch.Generator().manual_seed(6)
    M = 3 * torch.randn(4, 20, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    X = M[y] + torch.randn(300, 20, generator=g)
    out = linear_probe(X[:200], y[:200], X[200:], y[200:])
    assert out["test_acc"] > 0.95 and out["train_acc"] > 0.95 and out["converged"]
    ref = linear_probe(X[:200], y[:200], X[200:], y[200:], backend="sklearn")
    # Same objective (scikit-learn's C convention), two solvers: predictions agree to within a sample or two.
    assert abs(out["test_acc"] - ref["test_acc"]) <= 0.02 and abs(out["train_acc"] - ref["train_acc"]) <= 0.02
    # Labels independent of the features: test accuracy near chance (1/4).
    yr = torch.randint(0, 4, (300,), generator=g)
    rnd = linear_probe(X[:200], yr[:200], X[200:], yr[200:])
    assert rnd["test_acc"] < 0.45
    with pytest.raises(ValueError, match="single class"):
        linear_probe(X[:10], torch.zeros(10, dtype=torch.long), X[:5], y[:5])


# ---- label corruption ----------------------------------------------------------------------------------------------


def test_corrupt_labels_fraction_determinism_nesting():
    # The recipe's corruption: a share redrawn from all classes, nested across shares for one seed.
    from ratelab.data.noise import RelabeledDataset, symmetric_noise

    def corrupt_labels(y, fraction, k, seed):
        return symmetric_noise(y, fraction, k, generator=seed, to="any").labels

    y = torch.arange(2000) % 10
    a = corrupt_labels(y, 0.4, 10, seed=3)
    assert torch.equal(a, corrupt_labels(y, 0.4, 10, seed=3))
    assert not torch.equal(a, corrupt_labels(y, 0.4, 10, seed=4))
    assert torch.equal(corrupt_labels(y, 0.0, 10, seed=3), y)
    wrong = (a != y).double().mean().item()
    assert abs(wrong - 0.4 * 0.9) < 0.04  # redrawn uniformly from all 10 classes: ~1/10 land on the true label
    b = corrupt_labels(y, 0.2, 10, seed=3)
    assert ((b != y) <= (a != y)).all()  # nested noise levels
    assert a.min() >= 0 and a.max() <= 9
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(y, 1.5, 10, seed=0)

    base = torch.utils.data.TensorDataset(torch.randn(2000, 1, 2, 2), y)
    ds = RelabeledDataset(base, a)
    assert len(ds) == 2000 and ds[5][1] == int(a[5]) and torch.equal(ds[5][0], base[5][0])


# ---- the task ------------------------------------------------------------------------------------------------------


def test_mcr2_task_training_increases_delta_R(tmp_path):
    from ratelab.data import build_dataset
    from ratelab.train import MCR2Task, TrainConfig, Trainer, build_task

    assert isinstance(build_task("mcr2"), MCR2Task)
    train = build_dataset("digits", "train", img_size=8, seed=0, augment=False)
    val = build_dataset("digits", "val", img_size=8, seed=0)
    idx = torch.arange(600)
    sub = torch.utils.data.Subset(train, idx.tolist())
    sub.num_classes, sub.img_size, sub.in_chans = 10, 8, 1
    task = MCR2Task(feature_dim=32, n_components=5, probe=True, train_dataset=sub, val_dataset=val)
    cfg = TrainConfig(task="mcr2", model="mcr2_mlp_small", model_kwargs={"hidden": 64}, img_size=8, epochs=6,
                      batch_size=200, lr=3e-3, weight_decay=0.0, warmup_epochs=0, out_dir=str(tmp_path / "run"),
                      ckpt_every=0, eval_every=0, log_every=1, device="cpu", progress=False)
    trainer = Trainer(cfg, task)
    assert trainer.model.head.out_features == 32
    with torch.no_grad():
        z0 = trainer.model.eval()(sub[0][0][None].repeat(4, 1, 1, 1))
    assert z0.shape == (4, 32)
    final = trainer.fit()
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    first, last = train_rows[0], train_rows[-1]
    assert last["delta_R"] > first["delta_R"] + 1.0
    assert last["loss"] == pytest.approx(-last["delta_R"], rel=1e-5)  # gamma1 = gamma2 = 1
    for r in train_rows:
        assert r["R"] - r["Rc"] == pytest.approx(r["delta_R"], rel=1e-4, abs=1e-4)
    assert final["val_acc"] > 0.8 and final["val_probe_acc"] > 0.8
    assert final["val_delta_R"] > 0 and {"val_R", "val_Rc"} <= set(final)


def test_mcr2_task_loss_matches_objective_and_bad_args():
    from ratelab.objectives.rate_reduction import rate_reduction
    from ratelab.train import MCR2Task

    task = MCR2Task(num_classes=3)
    g = torch.Generator().manual_seed(0)
    F = torch.randn(30, 8, generator=g, dtype=torch.float64) * 5  # unnormalized: the task normalizes rows
    y = torch.arange(30) % 3
    loss, stats = task.loss(F, y)
    Z = torch.nn.functional.normalize(F.float(), dim=1).double()
    dR, R, Rc = rate_reduction(Z, y, task.eps, num_classes=3)
    assert loss.item() == pytest.approx(-dR.item(), rel=1e-4)
    assert task.eps == pytest.approx(math.sqrt(0.5))  # official eps^2 = 0.5
    with pytest.raises(ValueError, match="feature_dim"):
        MCR2Task(feature_dim=0)
    with pytest.raises(ValueError, match="eps"):
        MCR2Task(eps=-1.0)
    with pytest.raises(ValueError, match="without train_dataset"):
        MCR2Task(val_dataset=torch.utils.data.TensorDataset(torch.zeros(1)))


# ---- the recipe ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_label_noise_recipe_smoke(tmp_path_factory):
    from _recipe_fixtures import smoke_run

    from ratelab.recipes.mcr2.label_noise import SCALES

    run = smoke_run("mcr2-label-noise", tmp_path_factory)
    out, d, smoke = run.saved, run.out_dir, SCALES["smoke"]
    assert out["recipe"] == "mcr2-label-noise" and out["scale"] == "smoke"
    # One MCR² and one CE run per noise level and seed of the scale.
    assert sorted((r["method"], r["noise"]) for r in out["runs"]) == sorted(
        (m, p) for m in ("mcr2", "ce") for p in smoke.noise_levels for _ in range(smoke.seeds))
    for r in out["runs"]:
        assert 0.0 <= r["ns_acc"] <= 1.0 and 0.0 <= r["probe_acc"] <= 1.0
        assert r["wrong_label_frac"] == 0.0 if r["noise"] == 0.0 else 0.4 < r["wrong_label_frac"] < 0.65
    assert any("60% noise" in c["claim"] for c in out["checks"])
    assert (d / "accuracy_vs_noise.png").stat().st_size > 1000
    assert (d / "subspace_angles.png").stat().st_size > 1000
    assert (d / "report.html").exists() and out["summary"]["seeds"] == smoke.seeds


# ---- DDP -----------------------------------------------------------------------------------------------------------

_DDP_SCRIPT = """
import json, sys, torch
from ratelab.core.dist import barrier, cleanup
from ratelab.train import MCR2Task, TrainConfig, Trainer
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg, MCR2Task(feature_dim=16, n_components=4))
result = trainer.fit()
if trainer.dist.is_main:
    torch.save({"state": trainer.model.state_dict(), "result": result}, sys.argv[2])
barrier()
cleanup()
"""


def _ddp_cfg(out):
    from ratelab.train import TrainConfig

    # LayerNorm model (CRATE): BatchNorm would see per-rank batch statistics and differ from one process.
    return TrainConfig(task="mcr2", model="crate_pico_patch4_16", dataset="digits", img_size=16, augment=False,
                       batch_size=64, max_steps=3, lr=1e-3, warmup_epochs=0, out_dir=str(out), ckpt_every=0,
                       eval_every=0, log_every=1, device="cpu", progress=False)


@pytest.mark.distributed
def test_mcr2_task_ddp_matches_single_process(tmp_path):
    from ratelab.train import MCR2Task, Trainer

    script = tmp_path / "ddp_mcr2.py"
    script.write_text(_DDP_SCRIPT)
    cfg = _ddp_cfg(tmp_path / "ddp")
    run_torchrun(script, json.dumps(cfg.to_dict()), tmp_path / "ddp.pt", timeout=240)
    single = Trainer(cfg.replace(out_dir=str(tmp_path / "single")), MCR2Task(feature_dim=16, n_components=4))
    single_result = single.fit()
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, rtol=1e-4, atol=1e-5), (k, (ddp["state"][k] - v).abs().max())
    for key in ("train_delta_R", "val_delta_R"):
        assert ddp["result"][key] == pytest.approx(single_result[key], rel=1e-4), key
    assert ddp["result"]["val_acc"] == pytest.approx(single_result["val_acc"], abs=1 / 359 + 1e-12)


@pytest.mark.parametrize("name,size", [("mcr2_mlp_small", 8), ("mcr2_cnn_small", 16)])
def test_small_feature_nets_shapes_and_reload(name, size, tmp_path):
    import ratelab.train  # noqa: F401  (registers the mcr2_* nets; ratelab.models does not import them)
    from ratelab.core.checkpoint import load_model, save_model
    from ratelab.core.registry import create_model

    m = create_model(name, num_classes=24, img_size=size, in_chans=1).eval()
    x = torch.randn(3, 1, size, size)
    assert m(x).shape == (3, 24) and m.forward_features(x).shape == (3, m.num_features)
    save_model(m, tmp_path)
    torch.testing.assert_close(load_model(tmp_path).eval()(x), m(x))
    with pytest.raises(ValueError, match="multiple of 4"):
        create_model("mcr2_cnn_small", img_size=10)
