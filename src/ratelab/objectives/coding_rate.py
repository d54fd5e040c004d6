"""Gaussian coding rate R(Z, eps) of a set of feature vectors, the building block of MCR² and CRATE.

Convention (rows are samples, the PyTorch layout): Z has shape (..., n, d), n samples of dimension d, and

    R(Z, eps) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z) = 1/2 logdet(I_n + d / (n eps^2) Z Z^T)   (natural log)

The two forms are equal by Sylvester's determinant identity; the smaller Gram matrix is factorized. ``eps`` is the
precision epsilon of the papers, not its square (the official MCR² and CRATE visualisation code pass eps^2 under
the name ``eps``: their 0.01 is our 0.1).
"""

from __future__ import annotations

from numbers import Real

import torch

_SIDES = ("auto", "feature", "sample")


def _compute_dtype(in_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    # Half-precision Gram matrices lose most digits of logdet; never factorize below float32.
    return torch.float64 if in_dtype == torch.float64 else torch.float32


def _check_Z(Z: torch.Tensor, fn: str) -> None:
    if not isinstance(Z, torch.Tensor):
        raise TypeError(f"{fn}: Z must be a torch.Tensor, got {type(Z).__name__}")
    if Z.ndim < 2:
        raise ValueError(f"{fn}: Z must have shape (..., n, d) with rows as samples, got shape {tuple(Z.shape)}")
    if Z.shape[-2] == 0 or Z.shape[-1] == 0:
        raise ValueError(f"{fn}: Z needs at least one sample and one feature, got shape {tuple(Z.shape)}")
    if Z.is_complex():
        raise TypeError(f"{fn}: Z must be real, got {Z.dtype}")


def _check_eps(eps: float, fn: str) -> float:
    if isinstance(eps, torch.Tensor):
        if eps.numel() != 1:
            raise ValueError(f"{fn}: eps must be a scalar, got a tensor of shape {tuple(eps.shape)}")
        eps = eps.item()
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"{fn}: eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps > 0.0 and eps < float("inf")):
        raise ValueError(f"{fn}: eps must be a finite positive number (epsilon, not epsilon^2), got {eps}")
    return eps


def _gram(Z: torch.Tensor, side: str) -> torch.Tensor:
    n, d = Z.shape[-2:]
    if side == "auto":
        side = "feature" if d <= n else "sample"
    if side == "feature":
        return Z.transpose(-1, -2) @ Z  # (..., d, d)
    return Z @ Z.transpose(-1, -2)  # (..., n, n)


def _logdet_eigvalsh(alpha: torch.Tensor | float, G: torch.Tensor) -> torch.Tensor:
    """logdet(I + alpha G) from the eigenvalues of the PSD matrix G (..., m, m), clamped at 0 (rounding can make
    them < 0). ``alpha`` is a float or a tensor of the batch shape (...)."""
    lam = torch.linalg.eigvalsh(G).clamp_min(0.0)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha[..., None]
    return torch.log1p(alpha * lam).sum(-1)


def logdet_i_plus(
    alpha: float | torch.Tensor,
    Z: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    side: str = "auto",
) -> torch.Tensor:
    """logdet(I + alpha Z^T Z) for a batch of matrices Z, differentiable.

    This is the shared kernel of every rate term: R(Z) uses alpha = d / (n eps^2); a class term of MCR² uses
    alpha = d / (n_j eps^2) on the rows of class j.

    Args:
        alpha: non-negative scale, a float or a tensor broadcastable to the batch shape ``Z.shape[:-2]``.
        Z: (..., n, d) real tensor.
        dtype: compute dtype, ``torch.float32`` or ``torch.float64``; default float64 for float64 input and
            float32 otherwise (fp16/bf16 inputs are upcast before the Gram product).
        side: ``"auto"`` factorizes the smaller Gram matrix (d x d when d <= n, else n x n); ``"feature"`` forces
            Z^T Z (d x d) and ``"sample"`` forces Z Z^T (n x n). The value is the same (Sylvester).

    Returns:
        (...) tensor in the compute dtype.
    """
    _check_Z(Z, "logdet_i_plus")
    if side not in _SIDES:
        raise ValueError(f"logdet_i_plus: side must be one of {_SIDES}, got {side!r}")
    cdtype = _compute_dtype(Z.dtype, dtype)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=Z.device, dtype=cdtype)
        a_mat = alpha[..., None, None]
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not alpha >= 0:
            raise ValueError(f"logdet_i_plus: alpha must be a non-negative number, got {alpha!r}")
        a_mat = alpha = float(alpha)
    G = _gram(Z.to(cdtype), side)
    m = G.shape[-1]
    eye = torch.eye(m, dtype=cdtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(eye + a_mat * G)
    if bool((info > 0).any()):
        # I + alpha G is SPD in exact arithmetic, so Cholesky only fails through rounding (alpha ||G|| near 1/ulp)
        # or non-finite input. Recompute the whole batch from eigenvalues clamped at 0 rather than patching the
        # failed entries: the garbage factor of a failed entry would still send NaN into the backward pass.
        if not bool(torch.isfinite(G).all()):
            raise ValueError("logdet_i_plus: Z contains NaN or Inf (the Gram matrix is not finite)")
        return _logdet_eigvalsh(alpha, G)
    return 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def coding_rate(
    Z: torch.Tensor,
    eps: float,
    *,
    dtype: torch.dtype | None = None,
    side: str = "auto",
) -> torch.Tensor:
    """Coding rate R(Z, eps) = 1/2 logdet(I + d / (n eps^2) Z^T Z) in nats, batched over leading dims.

    Args:
        Z: (..., n, d) features, rows are samples.
        eps: precision epsilon (> 0), not squared.
        dtype: compute and result dtype (``torch.float32`` default, ``torch.float64`` on request or for float64
            input); half-precision inputs are upcast.
        side: which Gram matrix to factorize, see :func:`logdet_i_plus`.

    Returns:
        (...) tensor of rates. Differentiable with respect to Z.

    Raises:
        ValueError: eps not a finite positive number, Z of fewer than 2 dims or empty, or non-finite Z.
    """
    _check_Z(Z, "coding_rate")
    eps = _check_eps(eps, "coding_rate")
    n, d = Z.shape[-2:]
    return 0.5 * logdet_i_plus(d / (n * eps * eps), Z, dtype=dtype, side=side)


def coding_rate_ref(Z: torch.Tensor, eps: float) -> torch.Tensor:
    """Slow, literal reference for :func:`coding_rate`: float64, LU ``torch.logdet`` of the d x d matrix.

    Args:
        Z: (..., n, d) features, rows are samples.
        eps: precision epsilon (> 0), not squared.

    Returns:
        (...) float64 tensor.
    """
    _check_Z(Z, "coding_rate_ref")
    eps = _check_eps(eps, "coding_rate_ref")
    Z = Z.to(torch.float64)
    n, d = Z.shape[-2:]
    eye = torch.eye(d, dtype=torch.float64, device=Z.device)
    return 0.5 * torch.logdet(eye + d / (n * eps**2) * (Z.transpose(-1, -2) @ Z))


__all__ = ["coding_rate", "coding_rate_ref", "logdet_i_plus"]
