"""Rate reduction DeltaR and the MCR² loss: fast path vs the dense reference, identities, gradients, the constrained
MCR² optimum (rate_reduction.md §1.2, §1.3, §7), soft memberships, precision, and the PyPI ``mcr2`` package."""

import math

import pytest
import torch
import torch.nn.functional as F

from ratelab.objectives import mcr2_loss, rate_reduction, rate_reduction_ref
from ratelab.objectives.rate_reduction import _MAX_PAD_RATIO

torch.set_num_threads(1)


def _rel(a, b, floor: float = 1e-12) -> float:
    """Max abs difference relative to the largest entry of b (at least ``floor``)."""
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def _data(n, d, K, seed, unit=False):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    if unit:
        Z = F.normalize(Z, dim=1)
    y = torch.randint(0, K, (n,), generator=g)
    return Z, y


# (n, d, K, labels): balanced (padded path), K > n with empty classes, d > n_max (sample side), very unbalanced
# classes (per-class slice path), a single class.
def _labels_unbalanced(n):
    y = torch.zeros(n, dtype=torch.long)
    y[-20:] = torch.arange(1, 21) % 7 + 1
    return y


CASES = [
    (50, 8, 3, None),
    (10, 20, 100, None),
    (30, 40, 3, None),
    (100, 5, 9, "unbalanced"),
    (12, 4, 1, None),
]


@pytest.mark.parametrize("n,d,K,kind", CASES)
def test_matches_reference_values_and_gradients(n, d, K, kind):
    Z, y = _data(n, d, K, seed=n + d + K)
    if kind == "unbalanced":
        y = _labels_unbalanced(n)
        counts = torch.bincount(y)
        assert (counts > 0).sum() * counts.max() > _MAX_PAD_RATIO * n  # the per-class slice path is exercised
    if K > n:
        assert torch.bincount(y, minlength=K).eq(0).any()
    Z1 = Z.clone().requires_grad_(True)
    Z2 = Z.clone().requires_grad_(True)
    out = rate_reduction(Z1, y, 0.5, num_classes=K)
    ref = rate_reduction_ref(Z2, y, 0.5, num_classes=K)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float64
        assert _rel(a, b) < 1e-10
    (g1,) = torch.autograd.grad(out[0], Z1)
    (g2,) = torch.autograd.grad(ref[0], Z2)
    assert _rel(g1, g2, floor=1.0) < 1e-8  # floor: one class gives DeltaR = 0 and a zero gradient


def test_reference_matches_scalar_formula():
    """The reference against the paper's formula evaluated with explicit per-class column subsets and det."""
    Z, y = _data(9, 3, 3, seed=1)
    eps, n, d = 0.3, 9, 3
    W = Z.T
    R = 0.5 * math.log(torch.det(torch.eye(d, dtype=torch.float64) + d / (n * eps**2) * W @ W.T))
    Rc = 0.0
    for j in range(3):
        Wj = W[:, y == j]
        mj = Wj.shape[1]
        if mj:
            Rc += mj / (2 * n) * math.log(torch.det(torch.eye(d, dtype=torch.float64) + d / (mj * eps**2) * Wj @ Wj.T))
    dr, r, rc = rate_reduction_ref(Z, y, eps)
    assert r.item() == pytest.approx(R, rel=1e-12) and rc.item() == pytest.approx(Rc, rel=1e-12)
    assert dr.item() == pytest.approx(R - Rc, rel=1e-12)


@pytest.mark.parametrize("n,d,K", [(40, 6, 3), (8, 30, 4), (25, 25, 5)])
def test_sides_agree_hard_and_soft(n, d, K):
    Z, y = _data(n, d, K, seed=7)
    Pi = torch.softmax(torch.randn(n, K, dtype=torch.float64), 1)
    for mem in (y, Pi):
        f = rate_reduction(Z, mem, 0.4, side="feature")
        s = rate_reduction(Z, mem, 0.4, side="sample")
        a = rate_reduction(Z, mem, 0.4)
        for x, y_, z in zip(f, s, a):
            assert _rel(x, y_) < 1e-10 and _rel(z, y_) < 1e-10


def test_delta_r_nonnegative_random():
    g = torch.Generator().manual_seed(3)
    worst = math.inf
    for t in range(60):
        n, d, K = int(torch.randint(2, 40, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g)), 1 + t % 6
        Z = torch.randn(n, d, generator=g, dtype=torch.float64) * (0.1 + t / 10)
        y = torch.randint(0, K, (n,), generator=g)
        Pi = torch.softmax(3 * torch.randn(n, K, generator=g, dtype=torch.float64), 1)
        worst = min(worst, rate_reduction(Z, y, 0.5)[0].item(), rate_reduction(Z, Pi, 0.5)[0].item())
    assert worst >= -1e-12


def test_identical_class_copies_give_zero():
    A = torch.randn(7, 5, dtype=torch.float64)
    Z = torch.cat([A, A, A])
    y = torch.arange(3).repeat_interleave(7)
    dr, R, Rc = rate_reduction(Z, y, 0.5)
    assert R.item() > 1.0 and abs(dr.item()) < 1e-12
    # Uniform soft memberships: every class sees all samples with weight 1/K, again identical second moments.
    Pi = torch.full((21, 4), 0.25, dtype=torch.float64)
    assert abs(rate_reduction(Z, Pi, 0.5)[0].item()) < 1e-12


def test_orthogonal_and_permutation_invariance():
    Z, y = _data(30, 6, 4, seed=11)
    dr = rate_reduction(Z, y, 0.5)[0]
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert _rel(rate_reduction(Z @ Q, y, 0.5)[0], dr) < 1e-10
    p = torch.randperm(30)
    assert _rel(rate_reduction(Z[p], y[p], 0.5)[0], dr) < 1e-10
    # Relabelling the classes does not matter either.
    assert _rel(rate_reduction(Z, (y + 2) % 4, 0.5)[0], dr) < 1e-10


@pytest.mark.parametrize("n,d", [(200, 8), (5, 16)])
def test_unit_norm_bound(n, d):
    eps = 0.5
    r = min(n, d)
    for seed in range(5):
        Z, y = _data(n, d, 3, seed=seed, unit=True)
        _, R, Rc = rate_reduction(Z, y, eps)
        assert R.item() <= r / 2 * math.log(1 + d / (r * eps**2)) + 1e-12
        assert R.item() <= d / 2 * math.log(1 + 1 / eps**2) + 1e-12
    # The bound is attained by an isotropic tight frame (n = 2d rows: +-e_i).
    E = torch.eye(8, dtype=torch.float64)
    R = rate_reduction(torch.cat([E, -E]), torch.zeros(16, dtype=torch.long), eps)[1]
    assert R.item() == pytest.approx(4 * math.log(1 + 1 / eps**2), rel=1e-12)


def test_gradient_matches_closed_form():
    n, d, K, eps = 30, 5, 3, 0.5
    Z, y = _data(n, d, K, seed=5)
    Z.requires_grad_(True)
    dr, R, Rc = rate_reduction(Z, y, eps)
    gR, gRc = torch.autograd.grad(R, Z, retain_graph=True)[0], torch.autograd.grad(Rc, Z)[0]
    Zd = Z.detach()
    alpha = d / (n * eps**2)
    I = torch.eye(d, dtype=torch.float64)
    assert _rel(gR, alpha * Zd @ torch.linalg.inv(I + alpha * Zd.T @ Zd)) < 1e-8
    expect = torch.zeros_like(Zd)
    for j in range(K):
        Zj = Zd[y == j]
        aj = d / (Zj.shape[0] * eps**2)
        expect[y == j] = alpha * Zj @ torch.linalg.inv(I + aj * Zj.T @ Zj)  # (m_j/m) alpha_j = alpha
    assert _rel(gRc, expect) < 1e-8


def _closed_form(ranks, m_k, d, eps2):
    m = sum(m_k)
    alpha = d / (m * eps2)
    R = 0.5 * sum(r * math.log(1 + alpha * mk / r) for r, mk in zip(ranks, m_k))
    Rc = sum(mk / (2 * m) * r * math.log(1 + d / (r * eps2)) for r, mk in zip(ranks, m_k))
    return R - Rc


def test_constrained_optimum_constructed():
    """Orthogonal class subspaces of dims (4,4,4) with equal singular values sqrt(m_k/r_k), unit rows: the value is
    6 ln 3 - 2 ln 7 and the gradient is normal to the sphere (a critical point of the constrained problem)."""
    d, K, mk, eps = 12, 3, 20, math.sqrt(0.5)
    assert _closed_form([4, 4, 4], [20] * 3, d, 0.5) == pytest.approx(6 * math.log(3) - 2 * math.log(7), rel=1e-14)
    # = 2.698534 (rate_reduction.md §7 prints 2.69995, a digit slip; §1.3's "2.6999" is this value rounded)
    assert 6 * math.log(3) - 2 * math.log(7) == pytest.approx(2.699853, abs=1e-6)
    rows = []
    for k in range(K):
        block = torch.eye(d, dtype=torch.float64)[4 * k : 4 * k + 4]
        rows.append(block.repeat(5, 1))  # 20 unit rows, Z_k^T Z_k = 5 I_4
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    Z = (torch.cat(rows) @ Q).requires_grad_(True)
    y = torch.arange(K).repeat_interleave(mk)
    dr = rate_reduction(Z, y, eps)[0]
    assert dr.item() == pytest.approx(6 * math.log(3) - 2 * math.log(7), rel=1e-10)
    (g,) = torch.autograd.grad(dr, Z)
    tangent = g - (g * Z).sum(1, keepdim=True) * Z
    assert tangent.abs().max().item() < 1e-10
    # The unbalanced split (3, 5, 4) built the same way has the lower closed-form value 2.6742.
    assert _closed_form([3, 5, 4], [20] * 3, d, 0.5) == pytest.approx(2.6742, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_mcr2_projected_gradient_ascent(seed):
    """Projected gradient ascent on the unit sphere (d=12, K=3, m_k=20, eps^2=0.5) reaches an orthogonal point with
    equal singular values sqrt(m_k/r_k) whose value matches the closed form of its rank split."""
    d, K, mk, eps = 12, 3, 20, math.sqrt(0.5)
    y = torch.arange(K).repeat_interleave(mk)
    g = torch.Generator().manual_seed(seed)
    Z = F.normalize(torch.randn(K * mk, d, generator=g, dtype=torch.float64), dim=1)
    for _ in range(400):
        Z.requires_grad_(True)
        (grad,) = torch.autograd.grad(rate_reduction(Z, y, eps)[0], Z)
        with torch.no_grad():
            Z = F.normalize(Z + 2.0 * grad, dim=1)
    cross = (Z @ Z.T).abs()[y[:, None] != y[None]]
    assert cross.max().item() < 1e-8
    ranks = []
    for k in range(K):
        s = torch.linalg.svdvals(Z[y == k])
        r = int((s > 1e-6).sum())
        ranks.append(r)
        assert torch.allclose(s[:r], torch.full((r,), math.sqrt(mk / r), dtype=torch.float64), atol=1e-6)
    assert sum(ranks) == d
    assert rate_reduction(Z, y, eps)[0].item() == pytest.approx(_closed_form(ranks, [mk] * K, d, 0.5), abs=1e-6)
    if seed == 1:  # this start reaches the balanced (global) split
        assert ranks == [4, 4, 4]
        assert rate_reduction(Z, y, eps)[0].item() == pytest.approx(6 * math.log(3) - 2 * math.log(7), abs=1e-6)


def test_soft_memberships():
    Z, y = _data(40, 6, 4, seed=2)
    onehot = F.one_hot(y, 4).double()
    for a, b in zip(rate_reduction(Z, onehot, 0.5), rate_reduction(Z, y, 0.5)):
        assert _rel(a, b) < 1e-12
    Pi = torch.softmax(2 * torch.randn(40, 4, dtype=torch.float64), 1)
    Pi[:, 3] = 0.0  # an empty soft class
    Pi = Pi / Pi.sum(1, keepdim=True)
    P1, P2 = Pi.clone().requires_grad_(True), Pi.clone().requires_grad_(True)
    Z1, Z2 = Z.clone().requires_grad_(True), Z.clone().requires_grad_(True)
    out, ref = rate_reduction(Z1, P1, 0.5), rate_reduction_ref(Z2, P2, 0.5)
    for a, b in zip(out, ref):
        assert _rel(a, b) < 1e-10
    g1 = torch.autograd.grad(out[0], (Z1, P1))
    g2 = torch.autograd.grad(ref[0], (Z2, P2))
    assert _rel(g1[0], g2[0]) < 1e-8 and _rel(g1[1], g2[1]) < 1e-8


def test_float32_matches_float64_and_bf16_upcast():
    Z, y = _data(300, 32, 5, seed=4, unit=True)
    d64 = rate_reduction(Z, y, 0.5)
    d32 = rate_reduction(Z.float(), y, 0.5)
    assert d32[0].dtype == torch.float32
    for a, b in zip(d32, d64):
        assert _rel(a, b) < 1e-5
    Zb = Z.bfloat16().requires_grad_(True)
    db = rate_reduction(Zb, y, 0.5)[0]
    assert db.dtype == torch.float32  # upcast, not computed in bf16
    assert _rel(db, rate_reduction(Zb.detach().double(), y, 0.5)[0]) < 1e-5
    db.backward()
    assert Zb.grad.dtype == torch.bfloat16 and torch.isfinite(Zb.grad.float()).all()


def test_mcr2_loss_default_and_gammas():
    Z, y = _data(50, 8, 4, seed=9, unit=True)
    eps = 0.6
    loss, stats = mcr2_loss(Z, y, eps)
    dr, R, Rc = rate_reduction_ref(Z, y, eps)
    assert loss.item() == pytest.approx(-dr.item(), rel=1e-10)
    assert stats["R"].item() == pytest.approx(R.item(), rel=1e-10)
    assert stats["Rc"].item() == pytest.approx(Rc.item(), rel=1e-10)
    assert stats["delta_R"].item() == pytest.approx(dr.item(), rel=1e-10)
    # Official weighting: -gam2 * 1/2 logdet(I + gam1 d/(n eps^2) Z^T Z) + Rc.
    g1, g2 = 2.5, 0.3
    loss, stats = mcr2_loss(Z, y, eps, gamma1=g1, gamma2=g2)
    R_g1 = 0.5 * torch.logdet(torch.eye(8, dtype=torch.float64) + g1 * 8 / (50 * eps**2) * Z.T @ Z)
    assert loss.item() == pytest.approx((-g2 * R_g1 + Rc).item(), rel=1e-10)
    assert stats["delta_R"].item() == pytest.approx(dr.item(), rel=1e-10)  # logged values are the gamma-free ones
    Zg = Z.clone().requires_grad_(True)
    mcr2_loss(Zg, y, eps, gamma1=g1, gamma2=g2)[0].backward()
    Zr = Z.clone().requires_grad_(True)
    W = Zr.T
    ref = -g2 * 0.5 * torch.logdet(torch.eye(8, dtype=torch.float64) + g1 * 8 / (50 * eps**2) * W @ W.T)
    (ref + rate_reduction_ref(Zr, y, eps)[2]).backward()
    assert _rel(Zg.grad, Zr.grad) < 1e-8
    # Without a process group, distributed=True is the single-process loss.
    assert mcr2_loss(Z, y, eps, distributed=True)[0].item() == pytest.approx(-dr.item(), rel=1e-12)


def test_matches_pypi_mcr2():
    mcr2 = pytest.importorskip("mcr2.primitives.coding_rate")  # dev extra; rows as samples, eps not squared
    Z, y = _data(120, 16, 10, seed=8, unit=True)
    y[y == 3] = 4  # an empty class
    Y = F.one_hot(y, 10).float()
    Z32 = Z.float()  # the package casts the one-hot labels to float32, so it only runs in float32
    for eps in (0.5, math.sqrt(0.5)):
        dr, R, Rc = rate_reduction(Z, y, eps, num_classes=10)
        assert _rel(dr, mcr2.DeltaR(Z32, Y, eps)) < 1e-5
        assert _rel(R, mcr2.R(Z32, eps)) < 1e-5
        assert _rel(Rc, mcr2.Rc(Z32, Y, eps)) < 1e-5
        Zg = Z32.clone().requires_grad_(True)
        mcr2.DeltaR(Zg, Y, eps).backward()
        Zo = Z.clone().requires_grad_(True)
        rate_reduction(Zo, y, eps)[0].backward()
        assert _rel(Zo.grad, Zg.grad) < 1e-4


def test_bad_inputs_raise_clear_errors():
    Z, y = _data(10, 3, 2, seed=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        rate_reduction(Z, y[:5], 0.5)
    with pytest.raises(ValueError, match="out of range for num_classes=2"):
        rate_reduction(Z, y + 1, 0.5, num_classes=2)
    with pytest.raises(ValueError, match="non-negative"):
        rate_reduction(Z, y - 1, 0.5)
    with pytest.raises(ValueError, match="sum to 1"):
        rate_reduction(Z, torch.rand(10, 3, dtype=torch.float64) + 0.5, 0.5)
    with pytest.raises(ValueError, match="columns but num_classes"):
        rate_reduction(Z, torch.full((10, 3), 1 / 3), 0.5, num_classes=4)
    with pytest.raises(ValueError, match="eps"):
        rate_reduction(Z, y, -1.0)
    with pytest.raises(ValueError, match=r"shape \(n, d\)"):
        rate_reduction(Z[None], y, 0.5)
    with pytest.raises(ValueError, match="side"):
        rate_reduction(Z, y, 0.5, side="both")
    with pytest.raises(TypeError, match="integer class indices"):
        rate_reduction(Z, y > 0, 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rate_reduction(torch.full((10, 3), float("nan")), y, 0.5)
