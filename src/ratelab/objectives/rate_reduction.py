"""Coding rate reduction DeltaR = R - Rc (MCR², Yu et al. 2020) and the MCR² training loss.

Conventions (as in :mod:`ratelab.objectives.coding_rate`): Z is (n, d) with rows as samples, ``eps`` is the
precision epsilon (not its square), natural log. With memberships Pi_j = diag(pi_1j..pi_nj),

    R(Z)       = 1/2 logdet(I + d/(n eps^2) Z^T Z)
    Rc(Z | Pi) = sum_j tr(Pi_j)/(2n) logdet(I + d/(tr(Pi_j) eps^2) Z^T Pi_j Z)

and DeltaR = R - Rc >= 0. A class with tr(Pi_j) = 0 contributes zero.

Memberships are given either as hard integer labels (n,) or as a soft float matrix Pi (n, K) whose rows sum to 1;
:func:`rate_reduction` dispatches on the dtype (integer -> hard, floating -> soft).

Eps conventions elsewhere: the PyPI package ``mcr2`` passes eps itself (same as here); the official
ryanchankh/mcr2 code passes eps^2 under the name ``eps`` (its ``--eps 0.5`` is our ``eps = sqrt(0.5)``).

Speed: no dense (K, n, n) membership. Hard labels: rows are sorted by class and scattered into a zero-padded
(K', n_max, d) tensor (K' = non-empty classes; zero rows change neither Z_j^T Z_j nor the logdet), one batched
matmul gives every class Gram, and one batched Cholesky factorizes R's matrix together with all class matrices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ratelab.core.dist import all_gather_tensor, all_gather_with_grad
from ratelab.objectives.coding_rate import (
    _check_eps,
    _check_Z,
    _compute_dtype,
    _logdet_eigvalsh,
    logdet_i_plus,
)

__all__ = ["mcr2_loss", "rate_reduction", "rate_reduction_ref"]

_SIDES = ("auto", "feature", "sample")
# Padding every class to the largest one wastes memory when classes are very unbalanced; above this ratio of padded
# to real rows the class Grams are computed per class slice instead (still one batched factorization).
_MAX_PAD_RATIO = 2.0


def _logdet_i_plus_gram(alpha: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """logdet(I + alpha G) for a batch of PSD Grams G (B, m, m) and scales alpha (B,): Cholesky, eigvalsh fallback."""
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(eye + alpha[:, None, None] * G)
    if bool((info > 0).any()):
        # Only rounding (or non-finite input) breaks Cholesky of I + PSD; recompute the whole batch from clamped
        # eigenvalues so no garbage factor reaches the backward pass.
        if not bool(torch.isfinite(G).all()):
            raise ValueError("rate_reduction: Z contains NaN or Inf (the Gram matrix is not finite)")
        return _logdet_eigvalsh(alpha, G)
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None, fn: str) -> int:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{fn}: labels must have shape (n,) = ({n},) to match Z, got {tuple(labels.shape)}")
    lo, hi = (int(labels.min()), int(labels.max())) if n else (0, -1)
    if lo < 0:
        raise ValueError(f"{fn}: labels must be non-negative class indices, got min {lo}")
    if num_classes is None:
        return hi + 1
    if hi >= num_classes:
        raise ValueError(f"{fn}: label {hi} is out of range for num_classes={num_classes}")
    return int(num_classes)


def _check_pi(Pi: torch.Tensor, n: int, num_classes: int | None, fn: str) -> None:
    if Pi.ndim != 2 or Pi.shape[0] != n:
        raise ValueError(f"{fn}: soft memberships Pi must have shape (n, K) with n={n}, got {tuple(Pi.shape)}")
    if num_classes is not None and Pi.shape[1] != num_classes:
        raise ValueError(f"{fn}: Pi has {Pi.shape[1]} columns but num_classes={num_classes}")
    P = Pi.detach().double()
    if not bool(torch.isfinite(P).all()) or float(P.min()) < -1e-6:
        raise ValueError(f"{fn}: Pi must hold finite memberships >= 0")
    if float((P.sum(1) - 1.0).abs().max()) > 1e-3:
        raise ValueError(f"{fn}: every row of Pi must sum to 1 (memberships of one sample over the classes)")


def _hard_class_terms(Zc: torch.Tensor, labels: torch.Tensor, side: str, n_classes: int):
    """Class Grams for hard labels. Returns (G (K', m, m), counts (K',), class side) over the non-empty classes."""
    n, d = Zc.shape
    counts_all = torch.bincount(labels, minlength=n_classes)
    present = torch.nonzero(counts_all).squeeze(1)
    counts = counts_all[present]
    # Compact class index so that K > n costs nothing for the empty classes.
    remap = torch.full((n_classes,), -1, dtype=torch.long, device=labels.device)
    remap[present] = torch.arange(present.numel(), device=labels.device)
    lab = remap[labels]
    order = torch.argsort(lab, stable=True)
    lab_sorted = lab[order]
    Zs = Zc[order]
    k, n_max = present.numel(), int(counts.max())
    if side == "auto":
        side = "feature" if d <= n_max else "sample"
    if k * n_max <= _MAX_PAD_RATIO * n:
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(n, device=Zc.device) - starts[lab_sorted]
        Zp = Zc.new_zeros(k, n_max, d).index_put((lab_sorted, pos), Zs)  # (K', n_max, d)
        G = Zp.transpose(1, 2) @ Zp if side == "feature" else Zp @ Zp.transpose(1, 2)
    else:
        parts = torch.split(Zs, counts.tolist())
        if side == "feature":
            G = torch.stack([p.T @ p for p in parts])
        else:  # zero-padded Grams: the padded block of I + alpha G is I, logdet unchanged
            G = torch.stack([F.pad(p @ p.T, (0, n_max - p.shape[0], 0, n_max - p.shape[0])) for p in parts])
    return G, counts.to(Zc.dtype), side


def _soft_class_terms(Zc: torch.Tensor, Pi: torch.Tensor, side: str):
    """Class Grams Z^T Pi_j Z for soft memberships over the classes with tr(Pi_j) > 0."""
    n, d = Zc.shape
    tr = Pi.sum(0)
    keep = torch.nonzero(tr.detach() > 0).squeeze(1)
    Pk = Pi[:, keep].T  # (K', n)
    if side == "auto":
        side = "feature" if d <= n else "sample"
    if side == "feature":
        G = (Pk[:, :, None] * Zc[None]).transpose(1, 2) @ Zc  # sum_i pi_ij z_i z_i^T, (K', d, d)
    else:
        # diag(sqrt pi_j) Z Z^T diag(sqrt pi_j) has the same nonzero spectrum as Z^T Pi_j Z.
        s = Pk.clamp_min(0).sqrt()
        G = s[:, :, None] * (Zc @ Zc.T)[None] * s[:, None, :]  # (K', n, n)
    return G, tr[keep], side


def _rates(Z, memberships, eps, num_classes, side, dtype, gamma1, fn):
    _check_Z(Z, fn)
    if Z.ndim != 2:
        raise ValueError(f"{fn}: Z must have shape (n, d) with rows as samples, got {tuple(Z.shape)}")
    eps = _check_eps(eps, fn)
    if side not in _SIDES:
        raise ValueError(f"{fn}: side must be one of {_SIDES}, got {side!r}")
    if not isinstance(memberships, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor (int (n,) labels or float (n, K) Pi)")
    n, d = Z.shape
    cdtype = _compute_dtype(Z.dtype, dtype)
    Zc = Z.to(cdtype)
    memberships = memberships.to(Z.device)
    if memberships.is_floating_point():
        _check_pi(memberships, n, num_classes, fn)
        G, tr, cside = _soft_class_terms(Zc, memberships.to(cdtype), side)
        # Rows of Pi only sum to 1 up to rounding: R comes from Z itself, not from the sum of the class Grams.
        R = (Zc.T @ Zc)[None] if cside == "feature" else None
    elif memberships.dtype == torch.bool or memberships.is_complex():
        raise TypeError(f"{fn}: labels must be integer class indices or a float membership matrix")
    else:
        k = _check_labels(memberships, n, num_classes, fn)
        G, tr, cside = _hard_class_terms(Zc, memberships.long(), side, k)
        # Z^T Z = sum_j Z_j^T Z_j: no second pass over Z, and R joins the classes' batched factorization.
        R = G.sum(0, keepdim=True) if cside == "feature" else None
    scale = d / (eps * eps)
    alpha_c = scale / tr
    gammas = [1.0] if gamma1 == 1.0 else [1.0, float(gamma1)]
    if R is not None:
        a_r = torch.tensor([scale / n * g for g in gammas], dtype=cdtype, device=Z.device)
        ld = _logdet_i_plus_gram(torch.cat([a_r, alpha_c]), torch.cat([R.expand(len(gammas), -1, -1), G]))
        ld_r, ld_c = ld[: len(gammas)], ld[len(gammas) :]
    else:
        ld_c = _logdet_i_plus_gram(alpha_c, G)
        ld_r = torch.stack([logdet_i_plus(scale / n * g, Zc, side=side) for g in gammas])
    Rv = 0.5 * ld_r[0]
    Rc = (tr / (2.0 * n) * ld_c).sum()
    R_g1 = 0.5 * ld_r[-1]
    return Rv, Rc, R_g1


def rate_reduction(
    Z: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    num_classes: int | None = None,
    *,
    dtype: torch.dtype | None = None,
    side: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coding rate reduction DeltaR(Z, Pi, eps) = R(Z) - Rc(Z | Pi), differentiable.

    Args:
        Z: (n, d) features, rows are samples.
        labels: hard labels, an integer tensor (n,) of class indices; or soft memberships Pi, a float tensor
            (n, K) with entries >= 0 and rows summing to 1 (one-hot Pi equals the hard labels).
        eps: precision epsilon (> 0), not squared.
        num_classes: K; optional, only checked against the labels / Pi (empty classes contribute zero anyway).
        dtype: compute dtype (float32 default; float64 for float64 input or on request). fp16/bf16 inputs are
            upcast before any product.
        side: ``"auto"`` factorizes per class the d x d matrices when d <= n_max (the largest class; n for soft
            Pi) and zero-padded Gram matrices otherwise; ``"feature"`` / ``"sample"`` force a side. Same value.
            (Soft Pi on the sample side uses sqrt(pi): its gradient w.r.t. Pi is not finite at exact zeros.)

    Returns:
        (delta_R, R, Rc): scalar tensors in the compute dtype, in nats.

    Raises:
        ValueError / TypeError: bad shapes, eps, labels out of range, Pi rows not summing to 1, non-finite Z.
    """
    R, Rc, _ = _rates(Z, labels, eps, num_classes, side, dtype, 1.0, "rate_reduction")
    return R - Rc, R, Rc


def rate_reduction_ref(
    Z: torch.Tensor, labels: torch.Tensor, eps: float, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slow literal reference twin of :func:`rate_reduction`: float64, dense diagonal Pi_j, per-class loop, LU logdet.

    Args and returns as in :func:`rate_reduction` (always float64).
    """
    _check_Z(Z, "rate_reduction_ref")
    eps = _check_eps(eps, "rate_reduction_ref")
    Z = Z.to(torch.float64)
    n, d = Z.shape
    if labels.is_floating_point():
        _check_pi(labels, n, num_classes, "rate_reduction_ref")
        Pi = labels.to(torch.float64)
    else:
        k = _check_labels(labels, n, num_classes, "rate_reduction_ref")
        Pi = torch.nn.functional.one_hot(labels.long(), k).to(torch.float64)
    Pi = Pi.to(Z.device)
    W = Z.T  # d x n, the paper's column layout
    eye = torch.eye(d, dtype=torch.float64, device=Z.device)
    R = 0.5 * torch.logdet(eye + d / (n * eps**2) * W @ W.T)
    Rc = torch.zeros((), dtype=torch.float64, device=Z.device)
    for j in range(Pi.shape[1]):
        Pj = torch.diag(Pi[:, j])
        tr = torch.trace(Pj)
        if tr > 0:
            Rc = Rc + tr / (2 * n) * torch.logdet(eye + d / (tr * eps**2) * W @ Pj @ W.T)
    return R - Rc, R, Rc


def mcr2_loss(
    Z: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 0.5,
    *,
    num_classes: int | None = None,
    gamma1: float = 1.0,
    gamma2: float = 1.0,
    distributed: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MCR² training loss, minimized: -gamma2 * R_gamma1(Z) + Rc(Z | labels).

    R_gamma1 = 1/2 logdet(I + gamma1 d/(n eps^2) Z^T Z) carries the official ryanchankh/mcr2 weights (gam1 inside
    the discriminative logdet, gam2 in front of it); with gamma1 = gamma2 = 1 the loss is exactly -DeltaR. Features
    should be L2-normalized per row (DeltaR grows with the scale of Z). Note ``eps`` is epsilon: the official
    default ``--eps 0.5`` (eps^2) is ``eps=0.7071`` here.

    Distributed (explicit, ``distributed=True``; nothing is gathered by default so per-rank use stays local): every
    rank's (n_local, d) features are all-gathered with gradients for the local rows, labels without, and each rank
    computes the rates of the whole global batch. The loss is NOT rescaled: its value is the single-process value
    on every rank; the gather's backward sums the W identical per-rank losses' gradients onto the local rows
    (W x the single-process row gradient), and DDP's average over ranks divides by W again, so parameter gradients
    after DDP equal those of one process holding the whole batch. Every rank must pass the same n_local (use
    drop_last) and call backward. Without an initialized process group it is the single-process loss. Soft
    memberships are gathered without gradient.

    Args:
        Z: (n, d) features (local shard under DDP), rows are samples.
        labels: (n,) integer labels, or soft memberships (n, K) (see :func:`rate_reduction`).
        eps: precision epsilon (not squared).
        num_classes: K, checked against the labels.
        gamma1, gamma2: official weights; defaults give -DeltaR.
        distributed: gather features and labels over ranks first.

    Returns:
        (loss, stats): scalar loss; stats holds detached ``R``, ``Rc``, ``delta_R`` (gamma1 = 1, the theoretical
        values) of the (global) batch.
    """
    if distributed:
        Z = all_gather_with_grad(Z)
        labels = all_gather_tensor(labels.to(Z.device))
    R, Rc, R_g1 = _rates(Z, labels, eps, num_classes, "auto", None, gamma1, "mcr2_loss")
    loss = -float(gamma2) * R_g1 + Rc
    stats = {"R": R.detach(), "Rc": Rc.detach(), "delta_R": (R - Rc).detach()}
    return loss, stats
