"""The wrong-line data model (ratelab.analysis.wrong_line): solvers against references, the Wishart and the
exact-accuracy shortcuts against explicit sampling, the d_n -> ∞ reduction, the bound, and the note's correlations."""

import math
from dataclasses import replace

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from ratelab.analysis.wrong_line import (
    LiteralConfig,
    WrongLineConfig,
    fit_model,
    gaussian_accuracy,
    hard_margin_svm_dual,
    hard_margin_svm_dual_ref,
    literal_sweep,
    ood_error_lower_bound_approx,
    sample_stream,
    squared_hinge_svm,
    summarize_sweep,
    wishart_gram,
    wrong_line_sweep,
)


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Dense solves on a shared 2-core machine are ~10x slower with threaded BLAS.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _svm_problem(n=60, d=90, seed=0, flip=0.2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / math.sqrt(d)
    x[:, 0] *= 3
    y = np.sign(x[:, 0])
    y[rng.random(n) < flip] *= -1
    return x, y


def test_active_set_dual_matches_nnls_reference_and_kkt(monkeypatch):
    import ratelab.analysis.wrong_line as wl

    def no_fallback(Q):
        raise AssertionError("the active-set solver fell back to the reference")

    for seed, flip in ((0, 0.0), (1, 0.2), (2, 0.4)):
        x, y = _svm_problem(seed=seed, flip=flip)
        Q = (x @ x.T) * np.outer(y, y)
        with monkeypatch.context() as m:
            m.setattr(wl, "hard_margin_svm_dual_ref", no_fallback)
            a = hard_margin_svm_dual(Q)
        ref = hard_margin_svm_dual_ref(Q)
        np.testing.assert_allclose(a, ref, atol=1e-7 * max(1.0, ref.max()))
        margins = Q @ a
        assert a.min() >= 0 and margins.min() >= 1 - 1e-8
        np.testing.assert_allclose(margins[a > 1e-10], 1.0, atol=1e-8)  # complementary slackness
        # Warm start from a wrong guess of the support set reaches the same solution.
        np.testing.assert_allclose(hard_margin_svm_dual(Q, alpha0=(np.arange(len(y)) % 3 == 0) * 1.0), a,
                                   atol=1e-9 * max(1.0, a.max()))


def test_squared_hinge_is_the_orthogonal_nuisance_limit_of_the_hard_margin_svm():
    # Hard-margin SVM on (x, z) with orthogonal z_i of squared norm a: kernel x xᵀ + a I.
    x, y = _svm_problem(n=80, d=6, seed=3, flip=0.2)
    a = 0.3
    Q = (x @ x.T + a * np.eye(len(y))) * np.outer(y, y)
    alpha = hard_margin_svm_dual_ref(Q)
    w, xi = squared_hinge_svm(x, y, a)
    np.testing.assert_allclose(w, x.T @ (alpha * y), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(xi, a * alpha, atol=1e-7)  # the nuisance weight supplies the slack ξ = a α
    # Warm start does not change the optimum.
    np.testing.assert_allclose(squared_hinge_svm(x, y, a, w0=w + 1.0)[0], w, atol=1e-8)


def test_wishart_gram_moments():
    rng = np.random.default_rng(0)
    n, dof, scale = 3, 12, 0.5
    G = np.stack([wishart_gram(n, dof, scale, rng) for _ in range(6000)])
    np.testing.assert_allclose(G, np.swapaxes(G, 1, 2))
    mean, var = G.mean(0), G.var(0)
    np.testing.assert_allclose(mean, dof * scale * np.eye(n), atol=0.15)  # E = dof·scale·I = 6 I
    np.testing.assert_allclose(np.diag(var), 2 * dof * scale**2, rtol=0.1)  # 6
    np.testing.assert_allclose(var[~np.eye(n, dtype=bool)], dof * scale**2, rtol=0.1)  # 3
    with pytest.raises(ValueError, match="dof >= n"):
        wishart_gram(5, 4, 1.0, rng)


def test_exact_accuracy_matches_monte_carlo_on_explicit_features():
    # Note §2.4: explicit nuisance coordinates, SVM on the explicit matrix, Monte-Carlo test points.
    cfg = WrongLineConfig(d_core=8, d_nuis=1500, mode="explicit", sizes=(300,), n_seeds=1)
    rec, _ = fit_model(cfg, sample_stream(cfg, 300, seed=0), 300, 0.2, return_weights=True)
    assert rec["min_train_margin"] >= 1 - 1e-8  # interpolates the noisy labels
    wc, wn = rec["w_core"], rec["w_nuis"]
    rng = np.random.default_rng(1)
    m, sd = 16000, math.sqrt(cfg.nuis_energy / cfg.d_nuis)
    x = rng.standard_normal((m, cfg.d_core))
    y = np.sign(x[:, 0])
    zw = np.concatenate([rng.standard_normal((2000, cfg.d_nuis)) @ wn for _ in range(m // 2000)]) * sd
    for s, key in ((1.0, "id_acc"), (cfg.ood_scale, "ood_acc")):
        mc = float(np.mean(np.sign(x @ wc + s * zw) == y))
        assert abs(mc - rec[key]) < 4 * math.sqrt(0.25 / m) + 1e-3, (key, mc, rec[key])
    assert rec["ood_acc"] < rec["id_acc"] - 0.05  # the shift matters here


def test_wishart_gram_mode_matches_explicit_features_in_distribution():
    base = WrongLineConfig(d_core=8, d_nuis=2000, sizes=(100, 200, 300), noise_rates=(0.2,), n_seeds=6)
    acc = {}
    for mode in ("exact", "explicit"):
        sw = wrong_line_sweep(replace(base, mode=mode), seed=10)
        acc[mode] = np.array([[m["id_acc"], m["ood_acc"]] for m in sw["models"]])
    # Same core data per seed, different nuisance draws from the same law: means agree.
    np.testing.assert_allclose(acc["exact"].mean(0), acc["explicit"].mean(0), atol=0.01)
    assert np.abs(acc["exact"] - acc["explicit"]).max() > 1e-6  # the nuisance draws really differ


def test_reduction_matches_exact_model_and_bound_holds():
    cfg = WrongLineConfig(mode="exact", sizes=(300, 600), noise_rates=(0.0, 0.2), n_seeds=1)
    ex = wrong_line_sweep(cfg, seed=4)
    red = wrong_line_sweep(replace(cfg, mode="reduced"), seed=4)
    for a, b in zip(ex["models"], red["models"]):
        assert abs(a["id_acc"] - b["id_acc"]) < 3e-3 and abs(a["ood_acc"] - b["ood_acc"]) < 3e-3
        assert a["min_train_margin"] >= 1 - 1e-7
        assert a["bound_is_exact"]
        assert 1 - a["ood_acc"] >= a["ood_error_lb"]  # algorithm-independent lower bound (note §3)
    noisy = [m for m in ex["models"] if m["eta"] == 0.2]
    assert all(m["ood_error_lb"] > 0.01 for m in noisy)
    assert all(m["ood_error_lb"] == 0 for m in ex["models"] if m["eta"] == 0.0)  # no flipped points, no bound


def test_bound_closed_form():
    # R ≈ m / (√d_n + √m)², m = η n: at the note's largest model ≈ 0.095 (note: bound 0.09 at n = 4000).
    b = ood_error_lower_bound_approx([400, 4000], 0.2, 800_000, 10.0)
    m = 800
    assert b[1] == pytest.approx(math.atan(10 * math.sqrt(m / (math.sqrt(8e5) + math.sqrt(m)) ** 2)) / math.pi)
    assert 0.02 < b[0] < b[1] < 0.1
    assert ood_error_lower_bound_approx([4000], 0.0, 800_000, 10.0)[0] == 0


def test_gaussian_accuracy_hand_values():
    assert gaussian_accuracy(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert gaussian_accuracy(1.0, 1.0, 0.0) == pytest.approx(0.75)  # 45° from the teacher
    assert gaussian_accuracy(1.0, 0.0, 1.0 / 4, scale=2.0) == pytest.approx(0.75)
    assert gaussian_accuracy(1.0, 1.0 / 4, 0.0, core_shift=2.0) == pytest.approx(0.75)


def test_note_correlations_reduced_model():
    # Note §2.2/§4 at its settings (fewer seeds): clean r ≈ +1, η = 0.2 r ≈ -0.87 per learning curve.
    sw = wrong_line_sweep(WrongLineConfig(mode="reduced", n_seeds=8, noise_rates=(0.0, 0.2)), seed=0)
    summ = summarize_sweep(sw, n_boot=200)
    clean = [c["pearson"] for c in sw["curves"] if c["eta"] == 0.0]
    noisy = [c["pearson"] for c in sw["curves"] if c["eta"] == 0.2]
    assert min(clean) > 0.9
    assert sum(r < -0.5 for r in noisy) >= 7
    assert -0.95 < summ[0.2]["r_mean"] < -0.7
    assert summ[0.2]["r_mean_ci"][1] < 0 < summ[0.0]["r_mean_ci"][0]
    assert summ[0.2]["ood_last"] < summ[0.2]["ood_first"] and summ[0.2]["id_last"] > summ[0.2]["id_first"]
    assert summ[0.2]["ratio_last"] > 5 * summ[0.2]["ratio_first"]  # memorisation grows with n


def test_literal_reading_stays_on_the_line():
    for cfg in (LiteralConfig(n_seeds=4), LiteralConfig(n_seeds=4, majority_weight=1.0),
                LiteralConfig(n_seeds=3, learner="svm")):
        out = literal_sweep(cfg, seed=0)
        assert out["r_min"] > 0.9
        if cfg.minority_center == "neg_y":
            # ID and OOD accuracy are both monotone in one scalar ‖w_n‖/|w_1|: identical ordering (note §1.4).
            assert all(c["spearman"] == pytest.approx(1.0) for c in out["curves"])


def test_config_errors():
    with pytest.raises(ValueError, match="mode"):
        WrongLineConfig(mode="fast")
    with pytest.raises(ValueError, match="d_nuis >= max"):
        WrongLineConfig(mode="exact", d_nuis=100, sizes=(50, 200))
    with pytest.raises(ValueError, match="noise_rates"):
        WrongLineConfig(noise_rates=(0.6,))
    with pytest.raises(ValueError, match="max\\(sizes\\) < dim"):
        LiteralConfig(dim=50)


def test_probit_pearson_signs_and_twin_of_fit_line():
    from scipy.stats import norm

    from ratelab.analysis.accuracy_line import fit_line, probit_pearson

    a = [0.6, 0.7, 0.8, 0.9]
    assert probit_pearson(a, a) == pytest.approx(1.0)
    # Exactly linear in probit space with negative slope -> r = -1 (a reversed list is only ~-0.98: probit bends).
    b = norm.cdf(1.0 - 0.5 * norm.ppf(a))
    assert probit_pearson(a, b) == pytest.approx(-1.0)
    assert math.isnan(probit_pearson([0.5, 0.6], [0.5, 0.6]))  # fewer than 3 models
    assert math.isnan(probit_pearson([0.5, 0.5, 0.5], [0.2, 0.4, 0.6]))  # constant ID accuracy
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.4, 1.0, 20), rng.uniform(0.1, 1.0, 20)
    x[0] = 1.0  # a perfect score: the clip decides where it lands
    for clip in (1e-4, 1e-3):
        assert probit_pearson(x, y, clip=clip) == pytest.approx(fit_line(x, y, n_boot=0, clip=clip).pearson, abs=1e-12)
    assert probit_pearson(x, y, clip=1e-3) != pytest.approx(probit_pearson(x, y, clip=1e-4), abs=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        probit_pearson([0.5, 0.6, 0.7], [0.5, 0.6, 0.1, 0.2])
