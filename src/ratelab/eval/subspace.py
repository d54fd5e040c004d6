"""Feature-space classifiers and subspace geometry: nearest subspace, linear probe, principal angles.

Pure functions of feature tensors (rows are samples, ``(n, d)``); nothing here imports the trainer or a model.

Nearest subspace follows the official MCR² evaluation (ryanchankh/mcr2 ``evaluate.py --nearsub``): for each class j
take the top ``n_components`` principal directions U_j of that class's training features and predict
``argmin_j ||(I - U_j U_j^T)(z - mu_j)||``. The official script computes both a mean-centered variant (PCA, the
number it returns and reports, default 30 components) and an uncentered one (truncated SVD, mu_j = 0); ``centered``
selects between them, default centered as in the official result.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SubspaceFit",
    "class_subspace_cosines",
    "linear_probe",
    "nearest_subspace_fit",
    "nearest_subspace_predict",
    "nearest_subspace_residuals",
    "principal_angles",
]


def _check_features(features: torch.Tensor, labels: torch.Tensor | None, fn: str) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{fn}: features must be a 2-D tensor (n, d) with rows as samples, got {shape}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{fn}: labels must be a 1-D tensor of length n={features.shape[0]}, got {shape}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{fn}: labels must be integer class indices, got {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{fn}: labels must be >= 0, got min {int(labels.min())}")


@dataclass(frozen=True)
class SubspaceFit:
    """Per-class affine (or linear) subspaces fitted by :func:`nearest_subspace_fit`.

    Attributes:
        bases: (K, d, r) float64; the first ``ranks[j]`` columns of ``bases[j]`` are orthonormal principal
            directions of class j, the remaining columns are zero (so they change no projection).
        means: (K, d) float64 class means (zeros when ``centered`` is False).
        ranks: (K,) int64 number of directions kept per class (0 for a class absent from the fitting data).
        present: (K,) bool, whether class j had any fitting sample (absent classes are never predicted).
        centered: whether the subspaces are affine (PCA) or pass through the origin (truncated SVD).
    """

    bases: torch.Tensor
    means: torch.Tensor
    ranks: torch.Tensor
    present: torch.Tensor
    centered: bool

    @property
    def num_classes(self) -> int:
        return self.bases.shape[0]


def nearest_subspace_fit(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_components: int,
    *,
    num_classes: int | None = None,
    centered: bool = True,
) -> SubspaceFit:
    """Fit the top principal subspace of every class.

    Args:
        features: (n, d) training features.
        labels: (n,) integer labels in [0, num_classes).
        n_components: directions per class; capped at the class size (and at ``d``), so a class of 5 samples
            keeps at most 5 (4 when centered, as centering removes one dimension).
        num_classes: number of classes K; default ``labels.max() + 1``.
        centered: subtract each class mean first (PCA, the official reported variant) or not (truncated SVD).

    Returns:
        A :class:`SubspaceFit` (float64, on the features' device).

    Raises:
        ValueError: wrong shapes, non-integer or negative labels, a label >= num_classes, n_components < 1.
    """
    _check_features(features, labels, "nearest_subspace_fit")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"nearest_subspace_fit: n_components must be a positive int, got {n_components!r}")
    K = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.numel() and int(labels.max()) >= K:
        raise ValueError(f"nearest_subspace_fit: label {int(labels.max())} >= num_classes={K}")
    X = features.detach().to(torch.float64)
    d = X.shape[1]
    r_max = min(n_components, d)
    bases = torch.zeros(K, d, r_max, dtype=torch.float64, device=X.device)
    means = torch.zeros(K, d, dtype=torch.float64, device=X.device)
    ranks = torch.zeros(K, dtype=torch.int64)
    present = torch.zeros(K, dtype=torch.bool)
    for j in range(K):  # K SVDs of (n_j, d): a loop over classes is fine at evaluation time
        Xj = X[labels == j]
        if Xj.shape[0] == 0:
            continue
        present[j] = True
        if centered:
            means[j] = Xj.mean(0)
            Xj = Xj - means[j]
        # Right singular vectors of the (n_j, d) class matrix = principal directions in feature space.
        _, S, Vh = torch.linalg.svd(Xj, full_matrices=False)
        # Drop directions with (numerically) zero energy: they are arbitrary and would make the fit seed-dependent.
        tol = S.max().clamp_min(1e-300) * max(Xj.shape) * torch.finfo(torch.float64).eps if S.numel() else 0.0
        r = int(min(r_max, int((S > tol).sum())))
        bases[j, :, :r] = Vh[:r].T
        ranks[j] = r
    return SubspaceFit(bases=bases, means=means, ranks=ranks, present=present.to(X.device), centered=centered)


def nearest_subspace_residuals(fit: SubspaceFit, features: torch.Tensor) -> torch.Tensor:
    """Distance of every sample to every class subspace, ``||(I - U_j U_j^T)(z - mu_j)||``.

    Args:
        fit: from :func:`nearest_subspace_fit`.
        features: (m, d) features to score.

    Returns:
        (m, K) float64 residual norms; ``inf`` for classes absent from the fit.
    """
    _check_features(features, None, "nearest_subspace_residuals")
    if features.shape[1] != fit.bases.shape[1]:
        raise ValueError(
            f"nearest_subspace_residuals: features have d={features.shape[1]}, the fit has d={fit.bases.shape[1]}"
        )
    Z = features.detach().to(torch.float64).to(fit.bases.device)
    D = Z[:, None, :] - fit.means[None]  # (m, K, d)
    coef = torch.einsum("mkd,kdr->mkr", D, fit.bases)  # coordinates in each class basis
    # ||D - U U^T D||^2 = ||D||^2 - ||U^T D||^2 for orthonormal U; clamp the rounding below zero.
    res2 = (D.pow(2).sum(-1) - coef.pow(2).sum(-1)).clamp_min(0.0)
    res = res2.sqrt()
    return res.masked_fill(~fit.present[None, :].to(res.device), math.inf)


def nearest_subspace_predict(fit: SubspaceFit, features: torch.Tensor) -> torch.Tensor:
    """Class of the nearest subspace for each row of ``features`` (m, d) -> (m,) int64."""
    if not isinstance(fit, SubspaceFit):
        raise TypeError(f"nearest_subspace_predict: fit must be a SubspaceFit, got {type(fit).__name__}")
    return nearest_subspace_residuals(fit, features).argmin(dim=1)


def principal_angles(U_a: torch.Tensor, U_b: torch.Tensor) -> torch.Tensor:
    """Principal angles between the column spans of ``U_a`` (d, p) and ``U_b`` (d, q), in radians, ascending.

    The inputs need not be orthonormal (they are orthonormalized by a reduced QR; they must have full column rank).
    Angles are arccos of the singular values of Q_a^T Q_b, clipped to [0, 1]; arccos loses accuracy for angles below
    about 1e-8 rad, which is irrelevant for the comparisons made here.

    Returns:
        (min(p, q),) float64 tensor.
    """
    for name, U in (("U_a", U_a), ("U_b", U_b)):
        if not isinstance(U, torch.Tensor) or U.ndim != 2 or U.shape[1] == 0:
            raise ValueError(f"principal_angles: {name} must be a (d, k) tensor with k >= 1, got "
                             f"{tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__}")
    if U_a.shape[0] != U_b.shape[0]:
        raise ValueError(f"principal_angles: ambient dims differ, U_a has d={U_a.shape[0]}, U_b has d={U_b.shape[0]}")
    Qa, _ = torch.linalg.qr(U_a.detach().to(torch.float64))
    Qb, _ = torch.linalg.qr(U_b.detach().to(torch.float64).to(Qa.device))
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0.0, 1.0)  # descending
    return torch.arccos(cos)


def class_subspace_cosines(fit: SubspaceFit) -> torch.Tensor:
    """Mean cosine of the principal angles between every pair of class subspaces of ``fit``.

    1 on the diagonal (a subspace with itself); 0 for mutually orthogonal subspaces (the MCR² optimum, §1.3 of the
    design note); NaN for a pair involving a class with rank 0.

    Returns:
        (K, K) float64 symmetric matrix.
    """
    K = fit.num_classes
    out = torch.full((K, K), float("nan"), dtype=torch.float64)
    for a in range(K):
        for b in range(a, K):
            ra, rb = int(fit.ranks[a]), int(fit.ranks[b])
            if ra == 0 or rb == 0:
                continue
            ang = principal_angles(fit.bases[a, :, :ra], fit.bases[b, :, :rb])
            out[a, b] = out[b, a] = torch.cos(ang).mean()
    return out


def _probe_torch(X: torch.Tensor, y: torch.Tensor, K: int, lam: float, max_iter: int
                 ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Multinomial logistic regression, mean cross-entropy + lam/2 ||W||^2 (bias unpenalized), full-batch L-BFGS."""
    W = torch.zeros(X.shape[1], K, dtype=X.dtype, requires_grad=True)
    b = torch.zeros(K, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X @ W + b, y) + 0.5 * lam * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    n_iter = opt.state[opt._params[0]]["n_iter"]
    return W.detach(), b.detach(), bool(n_iter < max_iter)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    C: float = 1.0,
    max_iter: int = 500,
    standardize: bool = True,
    backend: str = "torch",
) -> dict[str, float]:
    """Multinomial logistic regression on frozen features: train and test accuracy.

    The objective is scikit-learn's ``LogisticRegression(C=C)``: C * sum_i CE_i + 1/2 ||W||^2 (bias unpenalized),
    i.e. mean CE + ||W||^2 / (2 C n). ``backend="torch"`` minimizes it with full-batch L-BFGS in float64 (fast);
    ``backend="sklearn"`` calls scikit-learn (the slow reference the tests compare against). Features are
    standardized with the training mean and standard deviation first (``standardize``), so that ``C`` means the
    same for unit-norm MCR² features and unnormalized cross-entropy features. The official MCR² code probes with a
    linear SVM (``LinearSVC``); a logistic probe is the common choice elsewhere; both are linear classifiers.

    Args:
        train_feats, train_labels: (n, d) and (n,) fitting data.
        test_feats, test_labels: (m, d) and (m,) evaluation data.
        C: inverse L2 regularization strength (scikit-learn convention).
        max_iter: L-BFGS iterations.
        standardize: z-score each feature with the training statistics.
        backend: ``"torch"`` or ``"sklearn"``.

    Returns:
        ``{"train_acc", "test_acc", "converged"}`` (``converged``: L-BFGS stopped before ``max_iter``).
    """
    _check_features(train_feats, train_labels, "linear_probe(train)")
    _check_features(test_feats, test_labels, "linear_probe(test)")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"linear_probe: train d={train_feats.shape[1]} but test d={test_feats.shape[1]}")
    if not C > 0:
        raise ValueError(f"linear_probe: C must be > 0, got {C}")
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"linear_probe: backend must be 'torch' or 'sklearn', got {backend!r}")
    Xtr = train_feats.detach().to(torch.float64).cpu()
    Xte = test_feats.detach().to(torch.float64).cpu()
    ytr, yte = train_labels.detach().cpu().long(), test_labels.detach().cpu().long()
    classes = torch.unique(ytr)
    if len(classes) < 2:
        raise ValueError("linear_probe: the training labels hold a single class; a probe needs at least two")
    if standardize:
        mu, sd = Xtr.mean(0), Xtr.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant features stay constant, no 0-division
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    if backend == "sklearn":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=C, max_iter=max_iter)
        with warnings.catch_warnings():
            # Non-convergence is reported in the result ("converged") instead of as a warning per call.
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(Xtr.numpy(), ytr.numpy())
        pred_tr = torch.as_tensor(clf.predict(Xtr.numpy()))
        pred_te = torch.as_tensor(clf.predict(Xte.numpy()))
        converged = bool(np.max(clf.n_iter_) < max_iter)
    else:
        # Train on the classes present only (as scikit-learn does), then map back to the original label values.
        y_idx = torch.searchsorted(classes, ytr)
        W, b, converged = _probe_torch(Xtr, y_idx, len(classes), 1.0 / (C * Xtr.shape[0]), max_iter)
        pred_tr = classes[(Xtr @ W + b).argmax(1)]
        pred_te = classes[(Xte @ W + b).argmax(1)]
    return {
        "train_acc": float((pred_tr == ytr).double().mean()),
        "test_acc": float((pred_te == yte).double().mean()),
        "converged": converged,
    }
