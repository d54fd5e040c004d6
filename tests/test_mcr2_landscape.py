"""Tests of the regularized-MCR² landscape toolkit (rate_reduction.md §3 and the regularized rows of §7)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ratelab.analysis import mcr2_landscape as ml

EPS = 0.5


def _labels(sizes):
    return torch.cat([torch.full((nk,), k, dtype=torch.int64) for k, nk in enumerate(sizes)])


def _naive_F(Z, labels, eps, lam):
    """Straight from the definitions with d x d logdets (column-sample convention transposed)."""
    n, d = Z.shape
    eye = torch.eye(d, dtype=torch.float64)
    F = 0.5 * torch.logdet(eye + d / (n * eps**2) * Z.T @ Z)
    for k in labels.unique():
        Zk = Z[labels == k]
        nk = Zk.shape[0]
        F = F - nk / (2 * n) * torch.logdet(eye + d / (nk * eps**2) * Zk.T @ Zk)
    return F - lam / 2 * (Z**2).sum()


def _g(s, nk, n, d, eps, lam):
    a, ak = d / (n * eps**2), d / (nk * eps**2)
    return 0.5 * math.log1p(a * s) - nk / (2 * n) * math.log1p(ak * s) - lam * s / 2


# ---------------------------------------------------------------------------------------------------- closed forms


def test_closed_forms_match_the_study_numbers():
    assert ml.closed_form_sigma(16, [10, 10], EPS, 0.1) == pytest.approx([2.126135, 2.126135], abs=1e-6)
    assert ml.closed_form_sigma(12, [10, 6, 4], EPS, 0.05) == pytest.approx([3.0603, 3.6680, 3.9367], abs=5e-5)
    assert ml.closed_form_sigma(30, [8, 8, 8], EPS, 0.1) == pytest.approx([2.529410] * 3, abs=1e-6)
    assert ml.predicted_global_ranks(12, [10, 6, 4], EPS, 0.05) == [2, 6, 4]
    assert ml.optimal_value(12, [10, 6, 4], EPS, 0.05, [2, 6, 4]) == pytest.approx(8.6956, abs=1e-4)
    assert ml.optimal_value(16, [10, 10], EPS, 0.1, [8, 8]) == pytest.approx(4.6969, abs=1e-4)
    assert ml.optimal_value(16, [10, 10], EPS, 0.1, [7, 7]) == pytest.approx(4.1098, abs=1e-4)
    assert ml.lambda_max(128, [100] * 10, EPS) == pytest.approx(0.2660, abs=1e-4)
    assert ml.lambda_max(16, [10, 10], EPS) == pytest.approx(0.549, abs=1e-3)


def test_roots_are_stationary_points_of_g_and_merge_at_lambda_max():
    d, sizes, lam = 12, [10, 6, 4], 0.05
    n = sum(sizes)
    s_minus, s_plus = ml.stationary_roots(d, sizes, EPS, lam)
    h = 1e-6
    for k, nk in enumerate(sizes):
        for s in (s_minus[k], s_plus[k]):
            dg = (_g(s + h, nk, n, d, EPS, lam) - _g(s - h, nk, n, d, EPS, lam)) / (2 * h)
            assert abs(dg) < 1e-8
        # s_+ is a local max of g, s_- a local min
        assert _g(s_plus[k] * 1.01, nk, n, d, EPS, lam) < _g(s_plus[k], nk, n, d, EPS, lam)
        assert _g(s_minus[k] * 1.01, nk, n, d, EPS, lam) > _g(s_minus[k], nk, n, d, EPS, lam)
    lmax = ml.lambda_max(d, sizes, EPS)
    sm, sp = ml.stationary_roots(d, sizes, EPS, lmax * (1 - 1e-10))
    assert sm[0] == pytest.approx(sp[0], rel=1e-3)  # the largest class's roots merge
    assert sm[2] < 0.5 * sp[2]  # the others do not


def test_predicted_split_maximizes_value_over_all_feasible_splits():
    for d, sizes, lam in [(12, [10, 6, 4], 0.05), (10, [12, 6], 0.1), (7, [3, 5, 2], 0.05)]:
        lam = min(lam, 0.5 * ml.lambda_max(d, sizes, EPS))
        best = max(
            ml.optimal_value(d, sizes, EPS, lam, r)
            for r in itertools.product(*[range(min(nk, d) + 1) for nk in sizes])
            if sum(r) <= min(sum(sizes), d)
        )
        pred = ml.predicted_global_ranks(d, sizes, EPS, lam)
        assert ml.optimal_value(d, sizes, EPS, lam, pred) == pytest.approx(best, rel=1e-12)
        assert ml.is_global_split(d, sizes, pred)
    assert not ml.is_global_split(12, [10, 6, 4], [4, 4, 4])
    assert not ml.is_global_split(12, [10, 6, 4], [2, 6, 3])
    assert ml.is_global_split(16, [10, 10], [9, 7])  # equal sizes: any split of min(N, d) is global


def test_argument_errors():
    with pytest.raises(ValueError, match="lambda_max"):
        ml.closed_form_sigma(16, [10, 10], EPS, 0.6)
    with pytest.raises(ValueError, match="lambda_max"):
        ml.certify(torch.zeros(20, 16, dtype=torch.float64), _labels([10, 10]), EPS, 1.0)
    with pytest.raises(ValueError, match="lam"):
        ml.closed_form_sigma(16, [10, 10], EPS, 0.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ml.lambda_max(16, [10], EPS)
    with pytest.raises(ValueError, match="eps"):
        ml.lambda_max(16, [10, 10], -1.0)
    with pytest.raises(ValueError, match="d must be"):
        ml.lambda_max(0, [10, 10], EPS)
    with pytest.raises(ValueError, match="class_sizes"):
        ml.lambda_max(4, [3, 0], EPS)
    with pytest.raises(ValueError, match=r"ranks\[0\]"):
        ml.optimal_value(12, [10, 6, 4], EPS, 0.05, [11, 0, 0])
    with pytest.raises(ValueError, match="exceeds min"):
        ml.optimal_value(12, [10, 6, 4], EPS, 0.05, [6, 6, 4])
    with pytest.raises(ValueError, match="rank 0"):
        ml.construct_critical_point(12, [10, 6, 4], EPS, 0.05, [2, 6, 0], saddle_classes=(2,))
    with pytest.raises(ValueError, match="labels has 3 entries"):
        ml.regularized_objective(torch.zeros(4, 2), torch.tensor([0, 1, 1]), EPS, 0.1)
    with pytest.raises(ValueError, match="classes \\[1\\] are empty"):
        ml.regularized_objective(torch.zeros(3, 2), torch.tensor([0, 2, 2]), EPS, 0.1)
    with pytest.raises(ValueError, match="shape"):
        ml.regularized_objective(torch.zeros(3), torch.tensor([0, 1, 1]), EPS, 0.1)
    with pytest.raises(ValueError, match="Z0"):
        ml.ascend(_labels([2, 2]), 3, EPS, 0.1, Z0=torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------------- objective


def test_objective_and_closed_form_gradient_match_references():
    g = torch.Generator().manual_seed(0)
    labels = _labels([5, 3, 4])
    Z = torch.randn(12, 7, generator=g, dtype=torch.float64)
    F = ml.regularized_objective(Z, labels, EPS, 0.1)
    assert float(F) == pytest.approx(float(_naive_F(Z, labels, EPS, 0.1)), rel=1e-12)
    # shuffled rows: labels need not be grouped
    perm = torch.randperm(12, generator=g)
    assert float(ml.regularized_objective(Z[perm], labels[perm], EPS, 0.1)) == pytest.approx(float(F), rel=1e-12)
    # invariance under Z -> Z Q
    Q = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))[0]
    assert float(ml.regularized_objective(Z @ Q, labels, EPS, 0.1)) == pytest.approx(float(F), rel=1e-12)
    Zr = Z.clone().requires_grad_(True)
    ml.regularized_objective(Zr, labels, EPS, 0.1).backward()
    Fc, Gc = ml.objective_and_grad(Z[perm], labels[perm], EPS, 0.1)
    assert float(Fc) == pytest.approx(float(F), rel=1e-12)
    torch.testing.assert_close(Gc, Zr.grad[perm], rtol=1e-10, atol=1e-12)
    Fb, Gb = ml.objective_and_grad(torch.stack([Z, 2 * Z]), labels, EPS, 0.1)
    torch.testing.assert_close(Fb[1], ml.regularized_objective(2 * Z, labels, EPS, 0.1), rtol=1e-12, atol=0)
    torch.testing.assert_close(Gb[0], Zr.grad, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- Hessian


def test_hvp_matches_double_backward_and_dense_hessian():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 1, 1])
    Z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    H = ml.dense_hessian(Z, labels, EPS, 0.1)
    hvp = ml.hessian_vector_product(Z, labels, EPS, 0.1)
    hvp_ref = ml.hessian_vector_product_ref(Z, labels, EPS, 0.1)
    for _ in range(3):
        v = torch.randn(20, generator=g, dtype=torch.float64)
        torch.testing.assert_close(hvp(v), H @ v, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(hvp(v), hvp_ref(v), rtol=1e-9, atol=1e-11)
    # finite differences of the closed-form gradient: an independent check on the reference itself
    v = torch.randn(5, 4, generator=g, dtype=torch.float64)
    h = 1e-6
    fd = (ml.objective_and_grad(Z + h * v, labels, EPS, 0.1)[1] - ml.objective_and_grad(Z - h * v, labels, EPS, 0.1)[1])
    torch.testing.assert_close(hvp(v.reshape(-1)), (fd / (2 * h)).reshape(-1), rtol=1e-6, atol=1e-7)


def test_lanczos_extremes_match_eigvalsh():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(120, 120, generator=g, dtype=torch.float64)
    A = A + A.T
    ev = torch.linalg.eigvalsh(A)
    full = ml.lanczos_extreme(lambda v: A @ v, 120, iters=120)
    assert full["max_eig"] == pytest.approx(float(ev[-1]), rel=1e-10)
    assert full["min_eig"] == pytest.approx(float(ev[0]), rel=1e-10)
    torch.testing.assert_close(full["ritz"], ev, rtol=1e-8, atol=1e-8)
    vec = full["max_vec"]
    assert float((A @ vec - ev[-1] * vec).norm()) < 1e-8
    # a low-rank operator breaks down early: the restart must still recover the whole spectrum
    B = torch.randn(40, 3, generator=g, dtype=torch.float64)
    P = B @ B.T - 0.5 * torch.eye(40, dtype=torch.float64)
    out = ml.lanczos_extreme(lambda v: P @ v, 40, iters=40, seed=3)
    evp = torch.linalg.eigvalsh(P)
    assert out["max_eig"] == pytest.approx(float(evp[-1]), rel=1e-10)
    assert out["min_eig"] == pytest.approx(float(evp[0]), rel=1e-10)
    # on a landscape Hessian: Lanczos with HVPs vs the dense Hessian
    Z, labels = ml.construct_critical_point(5, [4, 3], EPS, 0.1, [2, 2], saddle_classes=(1,), seed=0)
    evh = torch.linalg.eigvalsh(ml.dense_hessian(Z, labels, EPS, 0.1))
    he = ml.hessian_extremes(Z, labels, EPS, 0.1)
    assert he["max_eig"] == pytest.approx(float(evh[-1]), rel=1e-8)
    assert he["min_eig"] == pytest.approx(float(evh[0]), rel=1e-8)


def test_certify_constructed_saddle_and_local_max():
    d, sizes, lam = 12, [10, 6, 4], 0.05
    Zs, labels = ml.construct_critical_point(d, sizes, EPS, lam, [2, 6, 4], saddle_classes=(2,), seed=0)
    cs = ml.certify(Zs, labels, EPS, lam)
    assert cs["grad_norm"] < 1e-12
    assert cs["kind"] == "strict_saddle" and cs["hessian_max_eig"] > 1e-2
    assert not cs["is_global"]
    # the curvature along the saddle singular pair is d^2/dsigma^2 g(sigma^2) = 4 s g''(s) at s = s_-
    s = ml.stationary_roots(d, sizes, EPS, lam)[0][2]
    n, h = sum(sizes), 1e-4
    g = [_g(s * (1 + t * h), 4, n, d, EPS, lam) for t in (-1, 0, 1)]
    g2 = (g[0] - 2 * g[1] + g[2]) / (h * s) ** 2
    U, S, Vh = torch.linalg.svd(Zs[labels == 2], full_matrices=False)
    j = int(torch.argmin(S))
    D = torch.zeros_like(Zs)
    D[labels == 2] = torch.outer(U[:, j], Vh[j])
    curv = float(D.reshape(-1) @ ml.hessian_vector_product(Zs, labels, EPS, lam)(D.reshape(-1)))
    assert curv == pytest.approx(4 * s * g2, rel=1e-4)
    assert cs["hessian_max_eig"] >= curv - 1e-10

    Zl, labels = ml.construct_critical_point(d, sizes, EPS, lam, [2, 6, 4], seed=0)
    cl = ml.certify(Zl, labels, EPS, lam)
    assert cl["kind"] == "local_max" and abs(cl["hessian_max_eig"]) < 1e-8 and cl["hessian_min_eig"] < -1e-2
    assert cl["is_global"] and cl["ranks"] == [2, 6, 4] and abs(cl["value_gap"]) < 1e-10
    assert cl["sigma_rel_error"] < 1e-12 and cl["max_cross_cos"] < 1e-12
    Zn, labels = ml.construct_critical_point(d, sizes, EPS, lam, [4, 4, 4], seed=0)
    cn = ml.certify(Zn, labels, EPS, lam)
    assert cn["kind"] == "local_max" and not cn["is_global"] and cn["value_gap"] > 0.1
    # a generic point is not critical
    cr = ml.certify(torch.randn(20, 12, dtype=torch.float64), labels, EPS, lam)
    assert cr["kind"] == "not_critical" and cr["grad_norm"] > 1e-3


# ---------------------------------------------------------------------------------------------------- ascent (§7)


def test_ascent_balanced_classes_reaches_closed_form_local_max():
    labels = _labels([10, 10])
    Z, hist = ml.ascend(labels, 16, EPS, 0.1, seed=0, tol=1e-10)
    assert hist["converged"] and hist["grad_norm"][-1] <= 1e-10
    assert all(b >= a - 1e-12 for a, b in zip(hist["objective"], hist["objective"][1:]))  # ascent is monotone here
    c = ml.certify(Z, labels, EPS, 0.1)
    assert c["kind"] == "local_max"
    assert c["max_cross_cos"] < 1e-8
    assert c["sigma_rel_error"] < 1e-8
    assert all(abs(s - 2.126135) < 1e-6 for cls in c["sigma"] for s in cls)
    assert c["rank_sum"] <= 16
    g = ml.per_dimension_value(16, [10, 10], EPS, 0.1)[0]
    assert c["objective"] == pytest.approx(c["rank_sum"] * g, abs=1e-8)


def test_ascent_unequal_classes_reaches_closed_form_local_max():
    labels = _labels([10, 6, 4])
    Z, hist = ml.ascend_many(labels, 12, EPS, 0.05, starts=2, seed=0, tol=1e-9)
    assert all(hist["converged"])
    for z in Z:
        c = ml.certify(z, labels, EPS, 0.05)
        assert c["kind"] == "local_max" and c["max_cross_cos"] < 1e-6 and c["sigma_rel_error"] < 1e-6
        assert c["rank_sum"] <= 12
        assert c["objective"] == pytest.approx(c["value_at_split"], abs=1e-8)
        assert c["objective"] <= c["F_star"] + 1e-8


def test_tiny_init_is_trapped_at_trivial_local_maximizers():
    # documented behaviour (§3.4), not a failure: Z = 0 is a local maximizer (Hessian -lambda I)
    labels = _labels([10, 6, 4])
    Z, hist = ml.ascend_many(labels, 12, EPS, 0.05, starts=3, init_scale=0.01, seed=0, tol=1e-7)
    assert all(hist["converged"])
    norms = Z.flatten(1).norm(dim=1)
    assert int((norms < 1e-5).sum()) >= 2
    for z in Z:
        c = ml.certify(z, labels, EPS, 0.05)
        assert c["kind"] == "local_max" and c["rank_sum"] <= 1
    h0 = ml.hessian_extremes(torch.zeros(20, 12, dtype=torch.float64), labels, EPS, 0.05)
    assert h0["max_eig"] == pytest.approx(-0.05, abs=1e-12) and h0["min_eig"] == pytest.approx(-0.05, abs=1e-12)


def test_escape_from_constructed_saddle():
    d, sizes, lam = 16, [10, 10], 0.1
    Z, labels = ml.construct_critical_point(d, sizes, EPS, lam, [8, 8], saddle_classes=(0,), seed=1)
    he = ml.hessian_extremes(Z, labels, EPS, lam)
    v = he["max_vec"] if float((he["max_vec"] * Z).sum()) >= 0 else -he["max_vec"]
    Zf, hist = ml.ascend(labels, d, EPS, lam, Z0=Z + 1e-3 * v, tol=1e-10)
    c = ml.certify(Zf, labels, EPS, lam)
    assert c["kind"] == "local_max" and c["objective"] > ml.regularized_objective(Z, labels, EPS, lam) + 0.1
    assert c["ranks"] == [8, 8] and c["is_global"]


# ---------------------------------------------------------------------------------------------------- recipe


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_recipe_smoke(tmp_path_factory):
    from _recipe_fixtures import smoke_run

    from ratelab.recipes.mcr2.landscape import SCALES

    run = smoke_run("mcr2-landscape", tmp_path_factory)
    data, out, smoke = run.saved, run.out_dir, SCALES["smoke"]
    assert data["recipe"] == "mcr2-landscape" and data["scale"] == "smoke"
    assert data["summary"]["starts_total"] == smoke.starts * len(smoke.settings)
    # One constructed saddle per setting, certified strict (construction and certificate need no converged ascent).
    assert data["summary"]["saddles_certified_strict"] == data["summary"]["saddles_constructed"] == len(smoke.settings)
    assert all(set(c) == {"claim", "holds", "measured"} for c in data["checks"])
    for f in ("sigma_vs_closed_form.png", "gram_heatmap.png", "objective.png", "report.html"):
        assert (out / f).stat().st_size > 0
    assert [r["name"] for r in data["settings"]] == list(smoke.settings)
