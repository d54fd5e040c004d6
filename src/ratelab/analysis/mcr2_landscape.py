"""The landscape of regularized MCR²: closed forms, a gradient-ascent solver and critical-point certificates.

Problem (Wang et al., "A Global Geometric Analysis of Maximal Coding Rate Reduction", ICML 2024; restated in the
book's chapter on rate reduction). With Z of shape (n, d) -- rows are samples, as everywhere in ratelab -- and hard
labels splitting the rows into K classes Z_k of N_k rows (N = n = sum_k N_k):

    F(Z) = R(Z) - Rc(Z) - lam/2 ||Z||_F^2,
    R(Z)  = 1/2 logdet(I_d + alpha Z^T Z),                       alpha   = d / (N eps^2),
    Rc(Z) = sum_k (N_k / N) * 1/2 logdet(I_d + alpha_k Z_k^T Z_k), alpha_k = d / (N_k eps^2),

natural log, ``eps`` is epsilon (not its square). These are exactly the MCR² rates of the NeurIPS 2020 paper
(per-class weight N_k/N, per-class scale d/(N_k eps^2)), with no normalization of Z: the Frobenius penalty fixes
the scale instead.

Closed forms (Theorem 1 of the ICML paper). Admissible regularization: 0 < lam < lambda_max with
lambda_max = alpha (r - 1)/(r + 1), r = sqrt(N / N_max). If the blocks Z_k have mutually orthogonal row spaces,
F separates over singular values: every singular value sigma of Z_k contributes g_k(sigma^2) with

    g_k(s) = 1/2 log(1 + alpha s) - (N_k / 2N) log(1 + alpha_k s) - lam s / 2,

whose stationary points solve lam alpha_k s^2 - eta_k s + lam / alpha = 0, eta_k = (alpha_k - alpha) - lam (N/N_k + 1):
the larger root s_+ is a local maximum of g_k (the singular value of every local maximizer of F) and the smaller root
s_- a local minimum (a singular value there makes a strict saddle of F). A local maximizer has orthogonal class
subspaces and every nonzero singular value of Z_k equal to sqrt(s_+,k); its value is sum_k r_k g_k(s_+,k). It is a
global maximizer iff sum_k r_k = min(N, d) and smaller classes are filled to full rank min(N_k, d) before a larger
class gets any dimension (Theorem 1 (ii)).

Symmetries: F(Z Q) = F(Z) for any orthogonal Q (d x d), and F is unchanged when the rows of one class are mixed by
an orthogonal N_k x N_k matrix, so every critical point lies on a manifold of critical points and the Hessian has
exact zero eigenvalues along it. A local maximizer therefore has Hessian maximal eigenvalue ~0 (not < 0); a strict
saddle has a clearly positive one. :func:`certify` classifies with that in mind.

Everything here is float64, small-size analysis code: readable, with per-class Python loops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch

from ratelab.objectives.coding_rate import logdet_i_plus

# --------------------------------------------------------------------------------------------------------------------
# argument checks


def _check_d(d: Any, fn: str) -> int:
    if isinstance(d, bool) or not isinstance(d, Integral) or d < 1:
        raise ValueError(f"{fn}: d must be a positive integer (feature dimension), got {d!r}")
    return int(d)


def _check_sizes(class_sizes: Any, fn: str) -> list[int]:
    try:
        sizes = list(class_sizes)
    except TypeError:
        raise ValueError(f"{fn}: class_sizes must be a sequence of positive integers, got {class_sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(
            f"{fn}: class_sizes needs at least 2 classes (with one class R = Rc and lambda_max = 0), got {sizes}"
        )
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, Integral) or s < 1:
            raise ValueError(f"{fn}: class_sizes must be positive integers, got {sizes}")
    return [int(s) for s in sizes]


def _check_pos(x: Any, name: str, fn: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, Real) or not (0.0 < float(x) < math.inf):
        raise ValueError(f"{fn}: {name} must be a finite positive number, got {x!r}")
    return float(x)


def _check_lam(d: int, sizes: list[int], eps: float, lam: Any, fn: str) -> float:
    lam = _check_pos(lam, "lam", fn)
    lmax = lambda_max(d, sizes, eps)
    if lam >= lmax:
        raise ValueError(
            f"{fn}: lam={lam:g} must be < lambda_max(d={d}, class_sizes={sizes}, eps={eps:g}) = {lmax:.6g}. "
            "At or above lambda_max the largest class has no nonzero critical singular value (the local-max and "
            "saddle roots merge or vanish), so Theorem 1 does not apply and the closed forms are undefined."
        )
    return lam


def _check_labels(labels: Any, n: int | None, fn: str) -> tuple[torch.Tensor, list[int]]:
    """Returns labels as int64 and the class sizes (classes 0..K-1, all must be non-empty)."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{fn}: labels must be a 1-D integer tensor, got dtype {labels.dtype} shape "
                         f"{tuple(labels.shape)}")
    if n is not None and labels.numel() != n:
        raise ValueError(f"{fn}: labels has {labels.numel()} entries but Z has {n} rows")
    labels = labels.to(torch.int64).cpu()
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError(f"{fn}: labels must be non-empty and non-negative")
    counts = torch.bincount(labels).tolist()
    if any(c == 0 for c in counts):
        missing = [k for k, c in enumerate(counts) if c == 0]
        raise ValueError(f"{fn}: labels must use every class 0..K-1; classes {missing} are empty")
    if len(counts) < 2:
        raise ValueError(f"{fn}: labels need at least 2 classes")
    return labels, counts


def _check_Z(Z: Any, fn: str) -> torch.Tensor:
    if not isinstance(Z, torch.Tensor):
        raise TypeError(f"{fn}: Z must be a torch.Tensor of shape (n, d), got {type(Z).__name__}")
    if Z.ndim != 2 or Z.shape[0] == 0 or Z.shape[1] == 0:
        raise ValueError(f"{fn}: Z must have shape (n, d) with rows as samples, got {tuple(Z.shape)}")
    if not Z.is_floating_point():
        raise TypeError(f"{fn}: Z must be a floating-point tensor, got {Z.dtype}")
    return Z


# --------------------------------------------------------------------------------------------------------------------
# closed forms (Theorem 1), plain Python floats


def _alphas(d: int, sizes: list[int], eps: float) -> tuple[float, list[float]]:
    n = sum(sizes)
    return d / (n * eps * eps), [d / (nk * eps * eps) for nk in sizes]


def lambda_max(d: int, class_sizes: Sequence[int], eps: float) -> float:
    """Upper end of the admissible regularization interval of Theorem 1.

    lambda_max = alpha (r - 1) / (r + 1), alpha = d / (N eps^2), r = sqrt(N / N_max); it is the value at which the
    local-max and saddle singular values of the largest class merge.

    Args:
        d: feature dimension.
        class_sizes: N_k for each class (at least 2 classes).
        eps: epsilon (> 0).
    """
    fn = "lambda_max"
    d = _check_d(d, fn)
    sizes = _check_sizes(class_sizes, fn)
    eps = _check_pos(eps, "eps", fn)
    alpha, _ = _alphas(d, sizes, eps)
    r = math.sqrt(sum(sizes) / max(sizes))
    return alpha * (r - 1.0) / (r + 1.0)


def stationary_roots(d: int, class_sizes: Sequence[int], eps: float, lam: float) -> tuple[list[float], list[float]]:
    """Both roots (s_-, s_+) of g_k'(s) = 0, in terms of the squared singular value s = sigma^2, per class.

    Returns:
        (s_minus, s_plus): lists of length K. sqrt(s_plus) is the local-maximizer singular value, sqrt(s_minus) the
        saddle value.
    """
    fn = "stationary_roots"
    d = _check_d(d, fn)
    sizes = _check_sizes(class_sizes, fn)
    eps = _check_pos(eps, "eps", fn)
    lam = _check_lam(d, sizes, eps, lam, fn)
    alpha, alpha_k = _alphas(d, sizes, eps)
    n = sum(sizes)
    s_minus, s_plus = [], []
    for nk, ak in zip(sizes, alpha_k):
        eta = (ak - alpha) - lam * (n / nk + 1.0)
        disc = eta * eta - 4.0 * lam * lam * n / nk
        root = math.sqrt(max(disc, 0.0))
        s_plus.append((eta + root) / (2.0 * lam * ak))
        # s_- * s_+ = 1 / (alpha alpha_k); the product form avoids cancellation when lam is small.
        s_minus.append(1.0 / (alpha * ak * s_plus[-1]))
    return s_minus, s_plus


def closed_form_sigma(d: int, class_sizes: Sequence[int], eps: float, lam: float) -> list[float]:
    """The singular value sigma_k = sqrt(s_+,k) shared by all nonzero singular values of class k at every local
    maximizer (Theorem 1 (i)). Requires 0 < lam < lambda_max. Returns a list of length K."""
    return [math.sqrt(s) for s in stationary_roots(d, class_sizes, eps, lam)[1]]


def saddle_sigma(d: int, class_sizes: Sequence[int], eps: float, lam: float) -> list[float]:
    """The smaller stationary singular value sqrt(s_-,k) per class: a singular value there is a strict-saddle
    direction."""
    return [math.sqrt(s) for s in stationary_roots(d, class_sizes, eps, lam)[0]]


def _g(s: float, nk: int, n: int, alpha: float, ak: float, lam: float) -> float:
    return 0.5 * math.log1p(alpha * s) - nk / (2.0 * n) * math.log1p(ak * s) - 0.5 * lam * s


def per_dimension_value(d: int, class_sizes: Sequence[int], eps: float, lam: float) -> list[float]:
    """g_k(s_+,k): what one dimension given to class k adds to F at a local maximizer (larger for smaller
    classes)."""
    sizes = _check_sizes(class_sizes, "per_dimension_value")
    _, s_plus = stationary_roots(d, sizes, eps, lam)
    alpha, alpha_k = _alphas(int(d), sizes, float(eps))
    n = sum(sizes)
    return [_g(s, nk, n, alpha, ak, float(lam)) for s, nk, ak in zip(s_plus, sizes, alpha_k)]


def _check_ranks(d: int, sizes: list[int], ranks: Any, fn: str) -> list[int]:
    try:
        ranks = list(ranks)
    except TypeError:
        raise ValueError(f"{fn}: ranks must be a sequence of K non-negative integers, got {ranks!r}") from None
    if len(ranks) != len(sizes):
        raise ValueError(f"{fn}: ranks has {len(ranks)} entries but there are {len(sizes)} classes")
    for k, (r, nk) in enumerate(zip(ranks, sizes)):
        if isinstance(r, bool) or not isinstance(r, Integral) or r < 0 or r > min(nk, d):
            raise ValueError(f"{fn}: ranks[{k}]={r!r} must be an integer in [0, min(N_k, d)] = [0, {min(nk, d)}]")
    if sum(ranks) > min(sum(sizes), d):
        raise ValueError(f"{fn}: sum(ranks)={sum(ranks)} exceeds min(N, d)={min(sum(sizes), d)} (class subspaces must "
                         "be mutually orthogonal)")
    return [int(r) for r in ranks]


def optimal_value(d: int, class_sizes: Sequence[int], eps: float, lam: float, ranks: Sequence[int]) -> float:
    """F at a local maximizer with rank split ``ranks``: sum_k r_k g_k(s_+,k)."""
    fn = "optimal_value"
    sizes = _check_sizes(class_sizes, fn)
    ranks = _check_ranks(_check_d(d, fn), sizes, ranks, fn)
    return float(sum(r * g for r, g in zip(ranks, per_dimension_value(d, sizes, eps, lam))))


def is_global_split(d: int, class_sizes: Sequence[int], ranks: Sequence[int]) -> bool:
    """Theorem 1 (ii) on a rank split: sum r_k = min(N, d) and, for N_k < N_l with r_l > 0, r_k = min(N_k, d)."""
    fn = "is_global_split"
    d = _check_d(d, fn)
    sizes = _check_sizes(class_sizes, fn)
    ranks = _check_ranks(d, sizes, ranks, fn)
    if sum(ranks) != min(sum(sizes), d):
        return False
    for k, nk in enumerate(sizes):
        for ell, nl in enumerate(sizes):
            if nk < nl and ranks[ell] > 0 and ranks[k] != min(nk, d):
                return False
    return True


def predicted_global_ranks(d: int, class_sizes: Sequence[int], eps: float, lam: float) -> list[int]:
    """A rank split of a global maximizer (Theorem 1 (ii)): fill classes from the smallest up to min(N_k, d) until
    min(N, d) dimensions are used. Classes of equal size are interchangeable (same g_k), so any split among them with
    the same total is equally global; this returns the most balanced one (extra dimensions to the lower index)."""
    fn = "predicted_global_ranks"
    d = _check_d(d, fn)
    sizes = _check_sizes(class_sizes, fn)
    _check_lam(d, sizes, _check_pos(eps, "eps", fn), lam, fn)
    left = min(sum(sizes), d)
    ranks = [0] * len(sizes)
    for size in sorted(set(sizes)):
        group = [k for k, nk in enumerate(sizes) if nk == size]
        cap = min(size, d)
        take = min(left, cap * len(group))
        base, extra = divmod(take, len(group))
        for i, k in enumerate(group):
            ranks[k] = base + (1 if i < extra else 0)
        left -= take
    return ranks


# --------------------------------------------------------------------------------------------------------------------
# objective and gradient


def _class_blocks(labels: torch.Tensor, K: int) -> list[torch.Tensor]:
    return [torch.nonzero(labels == k).squeeze(1) for k in range(K)]


def regularized_objective(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """F(Z) = R(Z) - Rc(Z) - lam/2 ||Z||_F^2 (module docstring), differentiable, computed in float64.

    Args:
        Z: (n, d) features, rows are samples, no normalization applied.
        labels: (n,) integer class ids 0..K-1, every class non-empty.
        eps: epsilon (> 0).
        lam: regularization lambda (>= 0; any value is accepted here, the closed forms need 0 < lam < lambda_max).

    Returns:
        0-dim float64 tensor.
    """
    fn = "regularized_objective"
    Z = _check_Z(Z, fn)
    labels, counts = _check_labels(labels, Z.shape[0], fn)
    eps = _check_pos(eps, "eps", fn)
    if isinstance(lam, bool) or not isinstance(lam, Real) or not (0.0 <= float(lam) < math.inf):
        raise ValueError(f"{fn}: lam must be a finite non-negative number, got {lam!r}")
    Z = Z.to(torch.float64)
    n, d = Z.shape
    R = 0.5 * logdet_i_plus(d / (n * eps * eps), Z, dtype=torch.float64)
    Rc = Z.new_zeros(())
    for idx, nk in zip(_class_blocks(labels, len(counts)), counts):
        Rc = Rc + nk / (2.0 * n) * logdet_i_plus(d / (nk * eps * eps), Z[idx], dtype=torch.float64)
    return R - Rc - 0.5 * float(lam) * (Z * Z).sum()


def _objective_and_grad(Z: torch.Tensor, idx: list[torch.Tensor], counts: list[int], eps: float, lam: float):
    """F and its closed-form gradient for a batch Z (S, n, d) in float64 (the fast twin of autograd on
    :func:`regularized_objective`).

    dF/dZ = alpha Z (I + alpha Z^T Z)^{-1} - sum_k (N_k/N) alpha_k Z_k (I + alpha_k Z_k^T Z_k)^{-1} - lam Z.
    """
    S, n, d = Z.shape
    eye = torch.eye(d, dtype=Z.dtype)
    alpha = d / (n * eps * eps)
    M = eye + alpha * Z.transpose(1, 2) @ Z
    L = torch.linalg.cholesky(M)
    F = torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)  # 1/2 logdet M
    G = alpha * torch.cholesky_solve(Z.transpose(1, 2), L).transpose(1, 2)
    for ik, nk in zip(idx, counts):
        ak = d / (nk * eps * eps)
        Zk = Z[:, ik]
        Lk = torch.linalg.cholesky(eye + ak * Zk.transpose(1, 2) @ Zk)
        F = F - (nk / n) * torch.log(torch.diagonal(Lk, dim1=1, dim2=2)).sum(-1)
        G[:, ik] -= (nk / n) * ak * torch.cholesky_solve(Zk.transpose(1, 2), Lk).transpose(1, 2)
    F = F - 0.5 * lam * (Z * Z).sum((1, 2))
    G = G - lam * Z
    return F, G


def objective_and_grad(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float):
    """Closed-form F and dF/dZ for Z of shape (n, d) or a batch (S, n, d); returns float64 (F, grad) with F of shape
    () or (S,). Tested against autograd of :func:`regularized_objective`."""
    fn = "objective_and_grad"
    if not isinstance(Z, torch.Tensor) or Z.ndim not in (2, 3):
        raise ValueError(f"{fn}: Z must be a tensor of shape (n, d) or (S, n, d)")
    labels, counts = _check_labels(labels, Z.shape[-2], fn)
    eps = _check_pos(eps, "eps", fn)
    single = Z.ndim == 2
    Zb = Z.detach().to(torch.float64)
    Zb = Zb[None] if single else Zb
    F, G = _objective_and_grad(Zb, _class_blocks(labels, len(counts)), counts, eps, float(lam))
    return (F[0], G[0]) if single else (F, G)


# --------------------------------------------------------------------------------------------------------------------
# solver


def ascend_many(
    labels: torch.Tensor,
    d: int,
    eps: float,
    lam: float,
    *,
    starts: int = 1,
    steps: int = 20000,
    lr: float = 0.05,
    init_scale: float = 0.1,
    seed: int = 0,
    Z0: torch.Tensor | None = None,
    tol: float = 1e-10,
    record_every: int = 10,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Batched gradient ascent on F from ``starts`` random initializations (or from Z0 of shape (S, n, d)).

    Each start stops (is frozen) once its gradient Frobenius norm is <= tol.

    Returns:
        Z: (S, n, d) float64 final points.
        history: ``iteration`` (recorded iterations), ``objective`` and ``grad_norm`` (lists of S-lists, one row per
        recorded iteration), ``steps_taken`` (per start), ``converged`` (per start, grad norm <= tol).
    """
    fn = "ascend"
    d = _check_d(d, fn)
    labels, counts = _check_labels(labels, None, fn)
    eps = _check_pos(eps, "eps", fn)
    lam = _check_pos(lam, "lam", fn)
    lr = _check_pos(lr, "lr", fn)
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(f"{fn}: steps must be a non-negative integer, got {steps!r}")
    if isinstance(record_every, bool) or not isinstance(record_every, Integral) or record_every < 1:
        raise ValueError(f"{fn}: record_every must be a positive integer, got {record_every!r}")
    n = labels.numel()
    if Z0 is not None:
        if not isinstance(Z0, torch.Tensor) or Z0.shape[-2:] != (n, d) or Z0.ndim not in (2, 3):
            raise ValueError(f"{fn}: Z0 must have shape ({n}, {d}) or (S, {n}, {d}), got "
                             f"{tuple(getattr(Z0, 'shape', ()))}")
        Z = Z0.detach().to(torch.float64).clone()
        Z = Z[None] if Z.ndim == 2 else Z
    else:
        init_scale = _check_pos(init_scale, "init_scale", fn)
        gen = torch.Generator().manual_seed(int(seed))
        Z = init_scale * torch.randn(int(starts), n, d, generator=gen, dtype=torch.float64)
    S = Z.shape[0]
    idx = _class_blocks(labels, len(counts))
    hist: dict[str, Any] = {"iteration": [], "objective": [], "grad_norm": []}
    active = torch.ones(S, dtype=torch.bool)
    steps_taken = torch.zeros(S, dtype=torch.int64)
    for it in range(int(steps) + 1):
        F, G = _objective_and_grad(Z, idx, counts, eps, lam)
        gn = G.flatten(1).norm(dim=1)
        if it % record_every == 0 or it == steps:
            hist["iteration"].append(it)
            hist["objective"].append(F.tolist())
            hist["grad_norm"].append(gn.tolist())
        active &= gn > tol
        if it == steps or not bool(active.any()):
            if hist["iteration"][-1] != it:
                hist["iteration"].append(it)
                hist["objective"].append(F.tolist())
                hist["grad_norm"].append(gn.tolist())
            break
        Z = Z + lr * G * active[:, None, None]
        steps_taken += active
    hist["steps_taken"] = steps_taken.tolist()
    hist["converged"] = (~active).tolist()
    return Z, hist


def ascend(
    labels: torch.Tensor,
    d: int,
    eps: float,
    lam: float,
    *,
    steps: int = 20000,
    lr: float = 0.05,
    init_scale: float = 0.1,
    seed: int = 0,
    Z0: torch.Tensor | None = None,
    tol: float = 1e-10,
    record_every: int = 10,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gradient ascent Z <- Z + lr dF/dZ in float64 from Z0 or init_scale * N(0, 1) (the study's defaults: lr 0.05,
    init 0.1), stopping when ||dF/dZ||_F <= tol or after ``steps`` steps.

    Args:
        labels: (n,) class ids 0..K-1.
        d: feature dimension.
        eps, lam: epsilon and lambda of F.
        Z0: optional (n, d) starting point (then init_scale and seed are unused).
        record_every: record objective and gradient norm every this many iterations (and at the last one).

    Returns:
        Z: (n, d) float64 final point.
        history: ``iteration``, ``objective``, ``grad_norm`` (lists of floats), ``steps_taken`` (int), ``converged``.
    """
    if Z0 is not None and (not isinstance(Z0, torch.Tensor) or Z0.ndim != 2):
        raise ValueError(f"ascend: Z0 must be an (n, d) tensor, got {tuple(getattr(Z0, 'shape', ()))}")
    Z, h = ascend_many(labels, d, eps, lam, starts=1, steps=steps, lr=lr, init_scale=init_scale, seed=seed, Z0=Z0,
                       tol=tol, record_every=record_every)
    hist = {
        "iteration": h["iteration"],
        "objective": [row[0] for row in h["objective"]],
        "grad_norm": [row[0] for row in h["grad_norm"]],
        "steps_taken": h["steps_taken"][0],
        "converged": h["converged"][0],
    }
    return Z[0], hist


# --------------------------------------------------------------------------------------------------------------------
# Hessian: HVP + Lanczos


def hessian_vector_product(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float):
    """A function v -> H v for the Hessian H of F at Z, v and Hv of shape (n*d,) (flattened like Z.reshape(-1)).

    Closed form (fast path; :func:`hessian_vector_product_ref` is the autograd twin). With (N_k/N) alpha_k = alpha,
    grad F = alpha (Z M^{-1} - [Z_k M_k^{-1}]_k) - lam Z, M = I + alpha Z^T Z, M_k = I + alpha_k Z_k^T Z_k, and
    the derivative of Z M^{-1} along V is V M^{-1} - alpha Z M^{-1} (V^T Z + Z^T V) M^{-1}.
    """
    fn = "hessian_vector_product"
    Z = _check_Z(Z, fn).detach().to(torch.float64)
    labels, counts = _check_labels(labels, Z.shape[0], fn)
    eps = _check_pos(eps, "eps", fn)
    n, d = Z.shape
    alpha = d / (n * eps * eps)
    eye = torch.eye(d, dtype=torch.float64)
    idx = _class_blocks(labels, len(counts))
    Minv = torch.linalg.inv(eye + alpha * Z.T @ Z)
    ZMinv = Z @ Minv
    per_class = []
    for ik, nk in zip(idx, counts):
        ak = d / (nk * eps * eps)
        Mk = torch.linalg.inv(eye + ak * Z[ik].T @ Z[ik])
        per_class.append((ik, ak, Mk, Z[ik] @ Mk, Z[ik]))
    lam = float(lam)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        V = v.to(torch.float64).reshape(n, d)
        S = V.T @ Z
        H = V @ Minv - alpha * ZMinv @ (S + S.T) @ Minv
        for ik, ak, Mk, ZMk, Zk in per_class:
            Sk = V[ik].T @ Zk
            H[ik] -= V[ik] @ Mk - ak * ZMk @ (Sk + Sk.T) @ Mk
        return (alpha * H - lam * V).reshape(-1)

    return hvp


def hessian_vector_product_ref(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float):
    """Reference twin of :func:`hessian_vector_product`: double backward through :func:`regularized_objective`."""
    Z = _check_Z(Z, "hessian_vector_product_ref").detach().to(torch.float64)
    z = Z.reshape(-1).clone().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(regularized_objective(z.reshape(Z.shape), labels, eps, lam), z, create_graph=True)[0]

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(g, z, v.to(torch.float64), retain_graph=True)[0].detach()

    return hvp


def dense_hessian(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """The (n*d, n*d) Hessian of F at Z, column by column from autograd double backward; the reference for small
    sizes."""
    hvp = hessian_vector_product_ref(Z, labels, eps, lam)
    m = Z.numel()
    H = torch.stack([hvp(e) for e in torch.eye(m, dtype=torch.float64)], 1)
    return 0.5 * (H + H.T)


def lanczos_extreme(matvec, dim: int, *, iters: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    On breakdown (an invariant subspace found) the iteration restarts with a fresh random vector orthogonal to the
    basis, so with iters = dim the whole spectrum is recovered exactly.

    Args:
        matvec: v (dim,) float64 -> A v.
        dim: operator size.
        iters: Krylov dimension (default min(dim, 200)).
        seed: seed of the random start vector.

    Returns:
        dict with ``max_eig``, ``min_eig`` (floats), ``max_vec``, ``min_vec`` ((dim,) unit Ritz vectors), ``ritz``
        (all Ritz values, ascending), ``iters``.
    """
    m = min(dim, 200) if iters is None else min(int(iters), dim)
    if m < 1:
        raise ValueError(f"lanczos_extreme: need iters >= 1 and dim >= 1, got iters={iters}, dim={dim}")
    gen = torch.Generator().manual_seed(int(seed))
    V = torch.zeros(m, dim, dtype=torch.float64)
    a = torch.zeros(m, dtype=torch.float64)
    b = torch.zeros(m, dtype=torch.float64)  # b[j] couples v_j and v_{j+1}
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    V[0] = v / v.norm()
    scale = 0.0
    for j in range(m):
        w = matvec(V[j])
        a[j] = V[j] @ w
        # Two passes of classical Gram-Schmidt against the whole basis keep it orthogonal to machine precision.
        for _ in range(2):
            w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        beta = float(w.norm())
        scale = max(scale, abs(float(a[j])), beta)
        if j + 1 == m:
            break
        if beta <= 1e-12 * max(scale, 1e-300):
            w = torch.randn(dim, generator=gen, dtype=torch.float64)
            for _ in range(2):
                w = w - V[: j + 1].T @ (V[: j + 1] @ w)
            b[j] = 0.0
            V[j + 1] = w / w.norm()
        else:
            b[j] = beta
            V[j + 1] = w / beta
    T = torch.diag(a) + torch.diag(b[: m - 1], 1) + torch.diag(b[: m - 1], -1)
    evals, evecs = torch.linalg.eigh(T)
    vecs = V.T @ evecs
    return {
        "max_eig": float(evals[-1]),
        "min_eig": float(evals[0]),
        "max_vec": vecs[:, -1] / vecs[:, -1].norm(),
        "min_vec": vecs[:, 0] / vecs[:, 0].norm(),
        "ritz": evals,
        "iters": m,
    }


def hessian_extremes(Z: torch.Tensor, labels: torch.Tensor, eps: float, lam: float, *, iters: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Extreme eigenpairs of the Hessian of F at Z (HVPs + :func:`lanczos_extreme`); vectors reshaped to (n, d)."""
    hvp = hessian_vector_product(Z, labels, eps, lam)
    n, d = Z.shape
    out = lanczos_extreme(hvp, n * d, iters=iters, seed=seed)
    out["max_vec"] = out["max_vec"].reshape(n, d)
    out["min_vec"] = out["min_vec"].reshape(n, d)
    return out


# --------------------------------------------------------------------------------------------------------------------
# certificate


def _row_basis(Zk: torch.Tensor, thresh: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values above ``thresh`` and the matching orthonormal basis (d, r) of the row space of Zk."""
    if Zk.shape[0] == 0:
        return Zk.new_zeros(0), Zk.new_zeros(Zk.shape[1], 0)
    _, s, Vh = torch.linalg.svd(Zk, full_matrices=False)
    keep = s > thresh
    return s[keep], Vh[keep].T


def certify(
    Z: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    lam: float,
    *,
    grad_tol: float = 1e-6,
    curv_tol: float = 1e-6,
    rank_rtol: float = 1e-6,
    value_rtol: float = 1e-8,
    lanczos_iters: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Certificate of a point Z (n, d) of F: first- and second-order conditions and the Theorem 1 structure.

    Tolerances (documented choices):
      * ``ranks``: class k's numerical rank counts singular values > rank_rtol * sigma_k (sigma_k = closed-form
        local-max value). At a critical point every singular value is 0, sqrt(s_-) or sqrt(s_+), and
        sqrt(s_-)/sqrt(s_+) is far above 1e-6 for admissible lambda, so this separates zero from nonzero cleanly.
      * ``kind``: "not_critical" if ||grad F||_F > grad_tol; otherwise "strict_saddle" if the largest Hessian
        eigenvalue exceeds curv_tol * max(1, |min eigenvalue|); otherwise "local_max". The O(d) x O(N_k) symmetries
        give exact zero eigenvalues at every critical point, so a local maximizer shows a maximal eigenvalue ~0, not
        a negative one. (A degenerate critical point with a positive fourth-order direction would be misread as a
        local max; Theorem 2 rules these out for admissible lambda.)
      * ``is_global`` (Theorem 1 (ii)): kind == "local_max" AND every nonzero singular value matches the closed form
        (sigma_rel_error <= 1e-6) AND the class subspaces are orthogonal (max_cross_cos <= 1e-6) AND the rank split
        satisfies (ii) (:func:`is_global_split`). ``value_gap`` = F* - F(Z) is reported as the consistency check
        (~0 when is_global).

    Returns:
        dict with ``objective``, ``grad_norm``, ``max_cross_cos``, ``sigma`` (per class list of nonzero singular
        values), ``sigma_closed_form``, ``sigma_rel_error`` (max over all nonzero singular values; 0 if none),
        ``sigma_rel_error_per_class``, ``ranks``, ``rank_sum``, ``predicted_global_ranks``, ``F_star``, ``value_gap``,
        ``value_at_split`` (closed-form value of the found rank split), ``is_global``, ``hessian_max_eig``,
        ``hessian_min_eig``, ``kind``.
    """
    fn = "certify"
    Z = _check_Z(Z, fn).detach().to(torch.float64)
    labels, counts = _check_labels(labels, Z.shape[0], fn)
    n, d = Z.shape
    eps = _check_pos(eps, "eps", fn)
    lam = _check_lam(d, counts, eps, lam, fn)
    sig_cf = closed_form_sigma(d, counts, eps, lam)
    idx = _class_blocks(labels, len(counts))
    F, G = objective_and_grad(Z, labels, eps, lam)
    sig, bases, errs = [], [], []
    for k, ik in enumerate(idx):
        s, B = _row_basis(Z[ik], rank_rtol * sig_cf[k])
        sig.append(s.tolist())
        bases.append(B)
        errs.append(float(((s - sig_cf[k]).abs() / sig_cf[k]).max()) if s.numel() else 0.0)
    cross = 0.0
    for k in range(len(idx)):
        for ell in range(k + 1, len(idx)):
            if bases[k].shape[1] and bases[ell].shape[1]:
                # cosine of the smallest principal angle = spectral norm of B_k^T B_l
                cross = max(cross, float(torch.linalg.matrix_norm(bases[k].T @ bases[ell], ord=2)))
    ranks = [len(s) for s in sig]
    he = hessian_extremes(Z, labels, eps, lam, iters=lanczos_iters, seed=seed)
    gnorm = float(G.norm())
    if gnorm > grad_tol:
        kind = "not_critical"
    elif he["max_eig"] > curv_tol * max(1.0, abs(he["min_eig"])):
        kind = "strict_saddle"
    else:
        kind = "local_max"
    g_ranks = predicted_global_ranks(d, counts, eps, lam)
    f_star = optimal_value(d, counts, eps, lam, g_ranks)
    split_ok = sum(ranks) <= min(n, d) and all(r <= min(nk, d) for r, nk in zip(ranks, counts))
    is_global = (kind == "local_max" and max(errs) <= 1e-6 and cross <= 1e-6 and split_ok
                 and is_global_split(d, counts, ranks))
    return {
        "objective": float(F),
        "grad_norm": gnorm,
        "max_cross_cos": cross,
        "sigma": sig,
        "sigma_closed_form": sig_cf,
        "sigma_rel_error": max(errs),
        "sigma_rel_error_per_class": errs,
        "ranks": ranks,
        "rank_sum": sum(ranks),
        "predicted_global_ranks": g_ranks,
        "F_star": f_star,
        "value_gap": f_star - float(F),
        "value_at_split": optimal_value(d, counts, eps, lam, ranks) if split_ok else float("nan"),
        "is_global": bool(is_global),
        "hessian_max_eig": he["max_eig"],
        "hessian_min_eig": he["min_eig"],
        "kind": kind,
    }


# --------------------------------------------------------------------------------------------------------------------
# constructed critical points


def construct_critical_point(
    d: int,
    class_sizes: Sequence[int],
    eps: float,
    lam: float,
    ranks: Sequence[int],
    *,
    saddle_classes: Sequence[int] = (),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A critical point of F with mutually orthogonal class subspaces: Z_k = A_k diag(sigma) B_k^T with A_k
    (N_k, r_k) and B_k (d, r_k) random orthonormal, the B_k orthogonal across classes.

    Every singular value of class k sits at the local-max root sqrt(s_+,k), except that for each class in
    ``saddle_classes`` the first singular value sits at the saddle root sqrt(s_-,k) instead (F is separable over
    singular directions here, so this is still a critical point, now with one positive-curvature direction).

    Returns:
        Z: (N, d) float64 with rows grouped by class (class 0 first), labels: (N,) int64.
    """
    fn = "construct_critical_point"
    d = _check_d(d, fn)
    sizes = _check_sizes(class_sizes, fn)
    eps = _check_pos(eps, "eps", fn)
    lam = _check_lam(d, sizes, eps, lam, fn)
    ranks = _check_ranks(d, sizes, ranks, fn)
    saddle = list(saddle_classes)
    for k in saddle:
        if isinstance(k, bool) or not isinstance(k, Integral) or not 0 <= k < len(sizes):
            raise ValueError(f"{fn}: saddle_classes entries must be class indices in [0, {len(sizes)}), got {saddle}")
        if ranks[k] == 0:
            raise ValueError(f"{fn}: saddle class {k} has rank 0, so no singular value can sit at the saddle root")
    s_minus, s_plus = stationary_roots(d, sizes, eps, lam)
    gen = torch.Generator().manual_seed(int(seed))
    total = sum(ranks)
    B_all = torch.linalg.qr(torch.randn(d, max(total, 1), generator=gen, dtype=torch.float64))[0][:, :total]
    blocks, off = [], 0
    for k, (nk, r) in enumerate(zip(sizes, ranks)):
        A = torch.linalg.qr(torch.randn(nk, max(r, 1), generator=gen, dtype=torch.float64))[0][:, :r]
        s = torch.full((r,), math.sqrt(s_plus[k]), dtype=torch.float64)
        if k in saddle:
            s[0] = math.sqrt(s_minus[k])
        blocks.append(A @ torch.diag(s) @ B_all[:, off: off + r].T)
        off += r
    Z = torch.cat(blocks, 0)
    labels = torch.cat([torch.full((nk,), k, dtype=torch.int64) for k, nk in enumerate(sizes)])
    return Z, labels


__all__ = [
    "ascend",
    "ascend_many",
    "certify",
    "closed_form_sigma",
    "construct_critical_point",
    "dense_hessian",
    "hessian_extremes",
    "hessian_vector_product",
    "hessian_vector_product_ref",
    "is_global_split",
    "lambda_max",
    "lanczos_extreme",
    "objective_and_grad",
    "optimal_value",
    "per_dimension_value",
    "predicted_global_ranks",
    "regularized_objective",
    "saddle_sigma",
    "stationary_roots",
]
