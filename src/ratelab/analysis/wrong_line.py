"""Accuracy on the *wrong* line: a linear data model where label noise plus nuisance features make ID and OOD
accuracy negatively correlated across training-set sizes.

Paper: Sanyal, Hu, Yu, Ma, Wang, Schölkopf, "Accuracy on the wrong line: On the pitfalls of noisy data for
out-of-distribution generalisation" (AISTATS 2025). The paper's own data model and theorem could not be recovered
(design note ``wrong_line.md`` §1.3); this module implements the reconstruction of that note, §2-§3:

* **Core features** x_c ~ N(0, I_{d_s}) with the halfspace teacher y = sign(x_c[0]).
* **Nuisance features** z ~ N(0, (a / d_n) I_{d_n}) independent of y: a huge block of nearly constant coordinates
  (per-example energy a). The learner only sees z through the Gram matrix Z Zᵀ, which is drawn exactly from its
  Wishart law (Bartlett decomposition), so d_n = 800 000 costs O(n³), not O(n d_n).
* **Label noise**: each training label flipped with probability η; test labels are clean.
* **OOD shift**: the nuisance standard deviation is multiplied by s at test time (optionally the non-label core
  coordinates by τ); P(y | x_c) is unchanged, so only models that use nuisance directions lose accuracy.
* **Learner**: bias-free hard-margin linear SVM on (x_c, z) (it interpolates: d_n ≫ n), solved exactly in the dual.
* **Knob**: training-set size n on nested prefixes of one data stream (a learning curve per seed).
* **Accuracy** is exact for Gaussian test inputs: acc = 1 - arccos(w_c[0] / sqrt(w_c[0]² + τ²‖w_c[1:]‖² +
  s²‖w_n‖² a/d_n)) / π.

Three fitting modes: ``"exact"`` (Wishart Gram, finite d_n), ``"explicit"`` (explicit nuisance matrix: the slow
reference for small d_n) and ``"reduced"`` (d_n -> ∞: nearly orthogonal nuisance vectors make the hard-margin SVM a
squared-hinge SVM on the core features with ridge a, whose slacks ξ are stored in w_n, ‖w_n‖² a = Σξ²; the note
reports agreement with the exact model to ±0.001 at its settings).

Also: the *literal* reading of the paper's synthetic task (note §1.2/§1.4: 300-d, 1-D mixture signal, isotropic
nuisance, variance-inflation shift), which provably stays on the line, and the interpolation lower bound on OOD
error of note §3 (our derivation, not the paper's statement).

Pure numpy/scipy; no torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import linalg, optimize, stats

from ratelab.analysis.accuracy_line import fit_line

__all__ = [
    "LiteralConfig",
    "WrongLineConfig",
    "curve_statistics",
    "fit_model",
    "gaussian_accuracy",
    "hard_margin_svm_dual",
    "hard_margin_svm_dual_ref",
    "literal_accuracy",
    "literal_curve",
    "literal_sweep",
    "noisy_labels",
    "ood_error_lower_bound",
    "ood_error_lower_bound_approx",
    "rescore",
    "sample_stream",
    "squared_hinge_svm",
    "summarize_sweep",
    "wishart_gram",
    "with_overrides",
    "wrong_line_curve",
    "wrong_line_sweep",
]

_MODES = ("exact", "reduced", "explicit")


def _default_sizes() -> tuple[int, ...]:
    return tuple(int(v) for v in np.geomspace(400, 4000, 12).round())


@dataclass(frozen=True)
class WrongLineConfig:
    """Settings of the wrong-line data model (defaults: design note §4).

    Attributes:
        d_core: d_s, core dimensions (the label uses coordinate 0).
        d_nuis: d_n, nuisance dimensions.
        nuis_energy: a, expected squared norm of one nuisance vector (per-coordinate variance a / d_n).
        ood_scale: s, OOD multiplier of the nuisance standard deviation.
        core_shift: τ, OOD multiplier of the non-label core coordinates' standard deviation (1 = no core shift).
        noise_rates: label-flip probabilities η swept (one learning curve per η and seed).
        sizes: training-set sizes n (increasing).
        n_seeds: learning curves per η.
        mode: ``"exact"``, ``"reduced"`` or ``"explicit"`` (module docstring).
        nested: True = nested prefixes of one stream per seed (a learning curve); False = an independent training
            set for every n.
    """

    d_core: int = 16
    d_nuis: int = 800_000
    nuis_energy: float = 0.1
    ood_scale: float = 10.0
    core_shift: float = 1.0
    noise_rates: tuple[float, ...] = (0.0, 0.05, 0.2)
    sizes: tuple[int, ...] = field(default_factory=_default_sizes)
    n_seeds: int = 20
    mode: str = "exact"
    nested: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"WrongLineConfig.mode: expected one of {_MODES}, got {self.mode!r}")
        if self.d_core < 1 or self.d_nuis < 1:
            raise ValueError(f"WrongLineConfig: d_core and d_nuis must be >= 1, got {self.d_core}, {self.d_nuis}")
        if self.nuis_energy <= 0 or self.ood_scale <= 0 or self.core_shift <= 0:
            raise ValueError("WrongLineConfig: nuis_energy, ood_scale and core_shift must be positive")
        if any(not 0 <= e < 0.5 for e in self.noise_rates):
            raise ValueError(f"WrongLineConfig.noise_rates: each must be in [0, 0.5), got {self.noise_rates}")
        if len(self.sizes) < 1 or any(int(n) < 2 for n in self.sizes) or list(self.sizes) != sorted(self.sizes):
            raise ValueError(f"WrongLineConfig.sizes: expected increasing sizes >= 2, got {self.sizes}")
        if self.mode == "exact" and self.d_nuis < max(self.sizes):
            raise ValueError(f"WrongLineConfig: mode 'exact' samples a Wishart Gram and needs d_nuis >= max(sizes) "
                             f"({self.d_nuis} < {max(self.sizes)}); use mode 'explicit'")
        if self.n_seeds < 1:
            raise ValueError(f"WrongLineConfig.n_seeds must be >= 1, got {self.n_seeds}")


# --------------------------------------------------------------------------------------------------------------
# Sampling


def wishart_gram(n: int, dof: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Gram matrix Z Zᵀ of ``n`` vectors with ``dof`` i.i.d. N(0, scale) coordinates, drawn from its Wishart law.

    Bartlett decomposition: Z Zᵀ / scale ~ W_n(dof, I) = L Lᵀ with L lower triangular, L_ii² ~ χ²(dof - i) (i from
    0), L_ij ~ N(0, 1) below the diagonal. Leading k x k blocks are again Wishart, so prefixes of the stream are
    consistent (nested learning curves).

    Returns:
        (n, n) float64 symmetric positive-definite matrix.
    """
    if dof < n:
        raise ValueError(f"wishart_gram: Bartlett sampling needs dof >= n, got dof={dof}, n={n}")
    L = np.tril(rng.standard_normal((n, n)), -1)
    L[np.diag_indices(n)] = np.sqrt(rng.chisquare(dof - np.arange(n)))
    G = L @ L.T
    G *= scale
    return G


def sample_stream(cfg: WrongLineConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    """One training stream of ``n`` points.

    Returns:
        ``x`` (n, d_s) core features, ``y_clean`` (n,) ±1, ``u`` (n,) uniforms (label i is flipped at rate η iff
        u_i < η, so noise levels are nested), and ``gram`` (n, n) nuisance Gram (mode exact), ``z`` (n, d_n)
        explicit nuisance features (mode explicit), or nothing more (mode reduced).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg.d_core))
    y = np.where(x[:, 0] >= 0, 1.0, -1.0)
    u = rng.random(n)
    out = {"x": x, "y_clean": y, "u": u}
    var = cfg.nuis_energy / cfg.d_nuis
    if cfg.mode == "exact":
        out["gram"] = wishart_gram(n, cfg.d_nuis, var, rng)
    elif cfg.mode == "explicit":
        out["z"] = rng.standard_normal((n, cfg.d_nuis)) * math.sqrt(var)
    return out


def noisy_labels(y_clean: np.ndarray, u: np.ndarray, eta: float) -> np.ndarray:
    """Training labels: y_clean with the entries where u < η flipped.

    Not :mod:`ratelab.data.noise`: here the flips are part of the data model -- the stream's own uniforms ``u``
    decide them, so every η of a sweep flips a nested set of the same ±1 labels -- and ``analysis`` stays below
    ``data`` in the layering.
    """
    return np.where(u < eta, -y_clean, y_clean)


# --------------------------------------------------------------------------------------------------------------
# Learners


def hard_margin_svm_dual(Q: np.ndarray, *, alpha0: np.ndarray | None = None, tol: float = 1e-9,
                         max_iter: int = 200) -> np.ndarray:
    """Dual of the bias-free hard-margin SVM: min_α ½ αᵀQα - 1ᵀα s.t. α >= 0, with Q = diag(y) K diag(y) positive
    definite. Primal-dual active-set method (semismooth Newton on α = max(0, α - (Qα - 1))): solve the equality
    system on the free set, move indices with negative α to the active set and active indices with violated
    margins back, until the sets stop changing. Falls back to :func:`hard_margin_svm_dual_ref` if it cycles.

    Args:
        Q: (n, n) SPD matrix.
        alpha0: optional (n,) warm start (its positive entries give the first free set; e.g. the previous,
            shorter prefix's solution padded with ones).
        tol: KKT tolerance relative to 1.
        max_iter: active-set iterations before the fallback.

    Returns:
        (n,) dual variables α >= 0 (margins y_i f(x_i) = (Qα)_i >= 1, equality where α_i > 0).
    """
    n = Q.shape[0]
    free = np.ones(n, bool) if alpha0 is None else np.asarray(alpha0) > 0
    ones = np.ones(n)
    for _ in range(max_iter):
        alpha = np.zeros(n)
        if free.any():
            idx = np.flatnonzero(free)
            try:
                c = linalg.cho_factor(Q[np.ix_(idx, idx)], lower=True, check_finite=False)
            except linalg.LinAlgError as e:
                raise ValueError("hard_margin_svm_dual: Q is not positive definite") from e
            alpha[idx] = linalg.cho_solve(c, ones[idx], check_finite=False)
        mu = Q @ alpha - 1.0
        new_free = np.where(free, alpha > 0, mu < 0)
        if np.array_equal(new_free, free):
            # Unchanged sets mean α_free > 0 and μ_active >= 0; μ_free = 0 only up to the rounding of Qα.
            scale = 1.0 + float(np.abs(Q).max() * alpha.sum())
            if np.abs(mu[free]).max(initial=0.0) <= tol * scale:
                return alpha
            break
        free = new_free
    return hard_margin_svm_dual_ref(Q)


def hard_margin_svm_dual_ref(Q: np.ndarray) -> np.ndarray:
    """Reference solver of the same dual: with Q = L Lᵀ, ½αᵀQα - 1ᵀα = ½‖Lᵀα - L⁻¹1‖² + const, a non-negative
    least-squares problem solved by Lawson-Hanson (``scipy.optimize.nnls``). Slow but independent of the
    active-set code above."""
    L = np.linalg.cholesky(Q)
    b = linalg.solve_triangular(L, np.ones(Q.shape[0]), lower=True)
    alpha, _ = optimize.nnls(L.T, b, maxiter=50 * Q.shape[0])
    return alpha


def squared_hinge_svm(x: np.ndarray, y: np.ndarray, ridge: float, *, w0: np.ndarray | None = None,
                      tol: float = 1e-10, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """min_w ½‖w‖² + (1 / (2 ridge)) Σ max(0, 1 - y_i w·x_i)² by the finite Newton method (generalized Hessian,
    Armijo backtracking). This is the d_n -> ∞ limit of the hard-margin SVM on (x, z) with ‖z_i‖² = ridge and
    orthogonal z_i: the nuisance weight supplies the slacks ξ_i and costs Σξ² / ridge.

    Args:
        x: (n, d) features. y: (n,) ±1 labels. ridge: a > 0.
        w0: optional (d,) warm start.

    Returns:
        (w (d,), ξ (n,) = max(0, 1 - y x·w)).
    """
    xy = x * y[:, None]
    d = x.shape[1]
    w = np.zeros(d) if w0 is None else np.array(w0, dtype=np.float64)

    def objective(v: np.ndarray) -> float:
        xi = np.maximum(0.0, 1.0 - xy @ v)
        return 0.5 * float(v @ v) + 0.5 * float(xi @ xi) / ridge

    for _ in range(max_iter):
        m = xy @ w
        act = m < 1.0
        xa = xy[act]
        grad = w - xa.T @ (1.0 - m[act]) / ridge
        if np.linalg.norm(grad) <= tol * (1.0 + np.linalg.norm(w)):
            break
        H = np.eye(d) + xa.T @ xa / ridge
        step = -linalg.solve(H, grad, assume_a="pos")
        f0, slope, t = objective(w), float(grad @ step), 1.0
        while objective(w + t * step) > f0 + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        w = w + t * step
    return w, np.maximum(0.0, 1.0 - xy @ w)


# --------------------------------------------------------------------------------------------------------------
# Exact accuracy and the lower bound


def gaussian_accuracy(w_label: Any, w_rest_sq: Any, nuis_var: Any, *, scale: float = 1.0,
                      core_shift: float = 1.0) -> np.ndarray:
    """Exact accuracy of sign(w·x) on the halfspace teacher y = sign(x_c[0]) for Gaussian test inputs.

    Args:
        w_label: w_c[0] (scalar or array).
        w_rest_sq: ‖w_c[1:]‖².
        nuis_var: ID variance of the nuisance part of the score, ‖w_n‖² a / d_n.
        scale: s, the nuisance standard-deviation multiplier (1 = ID).
        core_shift: τ for the non-label core coordinates.

    Returns:
        1 - arccos(w0 / sqrt(w0² + τ² ‖w_rest‖² + s² nuis_var)) / π.
    """
    w0 = np.asarray(w_label, dtype=np.float64)
    den = np.sqrt(w0**2 + core_shift**2 * np.asarray(w_rest_sq) + scale**2 * np.asarray(nuis_var))
    return 1.0 - np.arccos(np.clip(w0 / den, -1.0, 1.0)) / np.pi


def ood_error_lower_bound(w_core: np.ndarray, x_flip: np.ndarray, y_clean_flip: np.ndarray, lam_max: float,
                          nuis_coord_var: float, ood_scale: float) -> dict[str, float]:
    """Lower bound on the OOD error of any linear classifier (w_c, w_n) that interpolates the noisy sample (note §3).

    Let F be the flipped training points that w_c classifies correctly w.r.t. their clean label. Interpolation needs
    |w_n·z_j| >= |w_c·x_j| on F, so ‖w_n‖² >= Σ_F (w_c·x_j)² / λ_max(Z_F Z_Fᵀ). With R = σ²‖w_n‖² / ‖w_c‖² (σ² the
    per-coordinate nuisance variance) the OOD error is arccos(w0 / (‖w_c‖ sqrt(1 + s²R))) / π >= arctan(s √R) / π
    for the halfspace teacher (also for any core shift τ >= 1).

    Args:
        w_core: (d_s,) core weights of the classifier.
        x_flip: (m, d_s) core features of the flipped training points. y_clean_flip: (m,) their clean labels.
        lam_max: λ_max of the flipped points' nuisance Gram Z_F Z_Fᵀ (exact mode), or an estimate such as the
            Marchenko-Pastur edge σ² (√d_n + √|F|)² (then the result is approximate, not a bound).
        nuis_coord_var: σ² = a / d_n. ood_scale: s.

    Returns:
        ``{"ratio_lb": R lower bound, "ood_error_lb": arctan(s √R) / π, "n_forced": |F|}``.
    """
    f = x_flip @ w_core
    forced = y_clean_flip * f > 0
    num = float(np.sum(f[forced] ** 2))
    r = nuis_coord_var * num / (lam_max * float(w_core @ w_core)) if num > 0 else 0.0
    return {"ratio_lb": r, "ood_error_lb": math.atan(ood_scale * math.sqrt(r)) / math.pi, "n_forced": int(forced.sum())}


def ood_error_lower_bound_approx(n: Any, eta: float, d_nuis: int, ood_scale: float, eps: float = 0.0) -> np.ndarray:
    """Closed-form approximation of :func:`ood_error_lower_bound` (note §3): with m = η n (1 - ε) forced points
    and unit mean squared core margins, R ≈ m / (√d_n + √m)² (≈ η n (1 - ε) / d_n), error >= arctan(s √R) / π.
    ε is the fraction of flipped points the core part itself gets wrong. (n,) -> (n,)."""
    m = eta * np.asarray(n, dtype=np.float64) * (1.0 - eps)
    r = m / (math.sqrt(d_nuis) + np.sqrt(m)) ** 2
    return np.arctan(ood_scale * np.sqrt(r)) / np.pi


# --------------------------------------------------------------------------------------------------------------
# Learning curves and sweeps


def fit_model(cfg: WrongLineConfig, data: dict[str, np.ndarray], n: int, eta: float,
              warm: np.ndarray | None = None, *, return_weights: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Fit the interpolating classifier on the first ``n`` points of a stream (:func:`sample_stream`) at noise η.

    Args:
        cfg: settings (``cfg.mode`` picks the solver). data: the stream. n: prefix length. eta: flip rate.
        warm: core weights of a previous fit (warm start of the squared-hinge Newton iterations).
        return_weights: add ``w_core`` (d_s,) and, in explicit mode, ``w_nuis`` (d_n,) to the record.

    Returns:
        (record with the keys listed in :func:`wrong_line_sweep`, core weights for warm-starting the next prefix).
        ``min_train_margin`` is None in reduced mode; ``bound_is_exact`` is False there (λ_max is estimated).
    """
    x, yc, u = data["x"][:n], data["y_clean"][:n], data["u"][:n]
    y = noisy_labels(yc, u, eta)
    sig2 = cfg.nuis_energy / cfg.d_nuis
    flip = u < eta
    if cfg.mode == "reduced":
        w, xi = squared_hinge_svm(x, y, cfg.nuis_energy, w0=warm)
        nuis_var = float(xi @ xi) / cfg.d_nuis  # ‖w_n‖² a / d_n with ‖w_n‖² a = Σξ²
        m = int(np.sum(yc[flip] * (x[flip] @ w) > 0))  # |F|: flipped points the core part gets right
        lam = sig2 * (math.sqrt(cfg.d_nuis) + math.sqrt(m)) ** 2  # Marchenko-Pastur edge: approximate bound
        # Margins hold by construction here (the implicit nuisance weight supplies ξ): nothing to measure.
        n_sv, min_margin, nxt = int((xi > 0).sum()), None, w
        bound_exact = False
    else:
        gram = data["gram"][:n, :n] if cfg.mode == "exact" else data["z"][:n] @ data["z"][:n].T
        K = x @ x.T + gram
        Q = K * np.outer(y, y)
        # The d_n -> ∞ solution predicts the support vectors (its points with positive slack) almost exactly, so the
        # active-set method usually needs one or two factorizations instead of ~7 from a cold start.
        _, xi0 = squared_hinge_svm(x, y, cfg.nuis_energy, w0=warm)
        alpha = hard_margin_svm_dual(Q, alpha0=(xi0 > 0).astype(np.float64))
        ay = alpha * y
        w = x.T @ ay
        nuis_var = float(ay @ gram @ ay) * sig2
        min_margin = float((Q @ alpha).min())
        n_sv, nxt = int((alpha > 0).sum()), w
        idx = np.flatnonzero(flip)
        lam = float(np.linalg.eigvalsh(gram[np.ix_(idx, idx)])[-1]) if len(idx) else 1.0
        bound_exact = True
    rest_sq = float(w[1:] @ w[1:])
    ood = gaussian_accuracy(w[0], rest_sq, nuis_var, scale=cfg.ood_scale, core_shift=cfg.core_shift)
    bound = ood_error_lower_bound(w, x[flip], yc[flip], lam, sig2, cfg.ood_scale)
    rec = {
        "n": n, "eta": eta, "id_acc": float(gaussian_accuracy(w[0], rest_sq, nuis_var)), "ood_acc": float(ood),
        "w_label": float(w[0]), "w_rest_sq": rest_sq, "nuis_var": nuis_var,
        "nuisance_ratio": nuis_var / float(w @ w), "n_flipped": int(flip.sum()), "n_sv": n_sv,
        "min_train_margin": min_margin, "ood_error_lb": bound["ood_error_lb"], "ratio_lb": bound["ratio_lb"],
        "bound_is_exact": bound_exact,
    }
    if return_weights:
        rec["w_core"] = w
        if cfg.mode == "explicit":
            rec["w_nuis"] = data["z"][:n].T @ ay
    return rec, nxt


def wrong_line_curve(cfg: WrongLineConfig, eta: float, seed: int) -> list[dict[str, Any]]:
    """One learning curve: a model per training-set size in ``cfg.sizes`` (records as in :func:`wrong_line_sweep`).

    With ``cfg.nested`` the sizes are prefixes of one stream (seeded by ``seed``, shared by every η); otherwise each
    size gets its own stream (seed ``seed * 100003 + n``).
    """
    sizes = [int(n) for n in cfg.sizes]
    out = []
    if cfg.nested:
        data = sample_stream(cfg, sizes[-1], seed)
        warm = None
        for n in sizes:
            rec, warm = fit_model(cfg, data, n, eta, warm)
            out.append({**rec, "seed": seed})
    else:
        for n in sizes:
            rec, _ = fit_model(cfg, sample_stream(cfg, n, seed * 100003 + n), n, eta, None)
            out.append({**rec, "seed": seed})
    return out


def curve_statistics(id_acc: Any, ood_acc: Any) -> dict[str, float]:
    """Probit Pearson r, OLS slope and Spearman ρ of one curve (no bootstrap)."""
    f = fit_line(id_acc, ood_acc, n_boot=0)
    return {"pearson": f.pearson, "slope": f.slope, "spearman": f.spearman}


def wrong_line_sweep(cfg: WrongLineConfig, *, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """All learning curves of ``cfg``: ``cfg.n_seeds`` seeds (``seed``, ``seed + 1``, ...) x ``cfg.noise_rates``.

    Returns:
        ``{"config": dict, "models": list of per-model records (n, eta, seed, id_acc, ood_acc, w_label, w_rest_sq,
        nuis_var, nuisance_ratio, n_flipped, n_sv, min_train_margin, ood_error_lb, ratio_lb, bound_is_exact),
        "curves": list of {eta, seed, pearson, slope, spearman}, "time_s": float}``.
    """
    t0 = time.time()
    models, curves = [], []
    for k in range(cfg.n_seeds):
        for eta in cfg.noise_rates:
            recs = wrong_line_curve(cfg, eta, seed + k)
            models.extend(recs)
            st = curve_statistics([r["id_acc"] for r in recs], [r["ood_acc"] for r in recs]) if len(recs) >= 3 \
                else {"pearson": math.nan, "slope": math.nan, "spearman": math.nan}
            curves.append({"eta": eta, "seed": seed + k, **st})
        if progress:
            print(f"[wrong-line] {cfg.mode}: seed {k + 1}/{cfg.n_seeds} done ({time.time() - t0:.1f}s)", flush=True)
    return {"config": asdict(cfg), "models": models, "curves": curves, "time_s": time.time() - t0}


def rescore(models: list[dict[str, Any]], *, ood_scale: float, core_shift: float = 1.0) -> np.ndarray:
    """OOD accuracies of already fitted models under another shift (s, τ); (m,) array."""
    return gaussian_accuracy([r["w_label"] for r in models], [r["w_rest_sq"] for r in models],
                             [r["nuis_var"] for r in models], scale=ood_scale, core_shift=core_shift)


def summarize_sweep(sweep: dict[str, Any], *, n_boot: int = 1000, ci: float = 0.95,
                    seed: int = 0) -> dict[float, dict[str, Any]]:
    """Per noise rate: mean/sd/min/max of the per-curve probit Pearson r with a bootstrap interval of the mean over
    curves, mean slope and Spearman ρ, the number of negative curves, and the pooled fit over all models
    (:func:`~ratelab.analysis.accuracy_line.fit_line`, bootstrap over models)."""
    out: dict[float, dict[str, Any]] = {}
    rng = np.random.default_rng(seed)
    for eta in sorted({c["eta"] for c in sweep["curves"]}):
        cs = [c for c in sweep["curves"] if c["eta"] == eta]
        r = np.array([c["pearson"] for c in cs], dtype=np.float64)
        rv = r[np.isfinite(r)]
        if len(rv):
            boots = rv[rng.integers(0, len(rv), size=(n_boot, len(rv)))].mean(axis=1)
            lo, hi = (float(v) for v in np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2]))
        else:
            lo = hi = math.nan
        ms = [m for m in sweep["models"] if m["eta"] == eta]
        pooled = fit_line([m["id_acc"] for m in ms], [m["ood_acc"] for m in ms], n_boot=n_boot, ci=ci, seed=seed) \
            if len(ms) >= 3 else None
        nmin, nmax = min(m["n"] for m in ms), max(m["n"] for m in ms)

        def mean_at(key: str, n: int, ms: list = ms) -> float:
            return float(np.mean([m[key] for m in ms if m["n"] == n]))

        out[eta] = {
            "r_mean": float(np.mean(rv)) if len(rv) else math.nan,
            "r_sd": float(np.std(rv)) if len(rv) else math.nan,
            "r_min": float(rv.min()) if len(rv) else math.nan,
            "r_max": float(rv.max()) if len(rv) else math.nan,
            "r_mean_ci": (lo, hi),
            "n_curves": len(cs), "n_negative": int((rv < 0).sum()),
            "slope_mean": float(np.nanmean([c["slope"] for c in cs])),
            "spearman_mean": float(np.nanmean([c["spearman"] for c in cs])),
            "pooled": pooled.to_dict() if pooled is not None else None,
            "id_first": mean_at("id_acc", nmin), "id_last": mean_at("id_acc", nmax),
            "ood_first": mean_at("ood_acc", nmin), "ood_last": mean_at("ood_acc", nmax),
            "ratio_first": mean_at("nuisance_ratio", nmin), "ratio_last": mean_at("nuisance_ratio", nmax),
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# The literal reading of the paper's synthetic task (note §1.2, §1.4)


def _literal_sizes() -> tuple[int, ...]:
    return tuple(int(v) for v in np.geomspace(10, 250, 12).round())


@dataclass(frozen=True)
class LiteralConfig:
    """The paper's synthetic task as described by a secondary source (note §1.2), read literally.

    x ∈ R^dim, y uniform ±1; x[0] ~ majority_weight N(y, signal_var) + (1 - majority_weight) N(c, signal_var) with
    c = -y (``minority_center="neg_y"``) or 1 - y (``"one_minus_y"``, the record's printed form); x[1:] ~ N(0,
    nuis_var I). Test data follow the same law (the minority component is part of x, so it is present at test time);
    OOD multiplies the nuisance standard deviation by ``ood_scale`` (the source gives no value; 3 is our choice, and
    the sign of the correlation cannot depend on it, note §1.4). ``majority_weight = 1`` is the clean version.
    Learner: bias-free minimum-norm interpolator (``"min_norm"``) or hard-margin SVM (``"svm"``); needs n < dim.
    """

    dim: int = 300
    signal_var: float = 0.15
    majority_weight: float = 0.9
    minority_center: str = "neg_y"
    nuis_var: float = 0.1
    ood_scale: float = 3.0
    sizes: tuple[int, ...] = field(default_factory=_literal_sizes)
    n_seeds: int = 20
    learner: str = "min_norm"

    def __post_init__(self) -> None:
        if self.minority_center not in ("neg_y", "one_minus_y"):
            raise ValueError(f"LiteralConfig.minority_center: 'neg_y' or 'one_minus_y', got {self.minority_center!r}")
        if self.learner not in ("min_norm", "svm"):
            raise ValueError(f"LiteralConfig.learner: 'min_norm' or 'svm', got {self.learner!r}")
        if not 0 <= self.majority_weight <= 1:
            raise ValueError(f"LiteralConfig.majority_weight must be in [0, 1], got {self.majority_weight}")
        if max(self.sizes) >= self.dim:
            raise ValueError(f"LiteralConfig: interpolation needs max(sizes) < dim, got {max(self.sizes)} >= "
                             f"{self.dim}")


def _minority(y: np.ndarray, kind: str) -> np.ndarray:
    return -y if kind == "neg_y" else 1.0 - y


def literal_accuracy(w: np.ndarray, cfg: LiteralConfig, scale: float = 1.0) -> float:
    """Exact accuracy of sign(w·x) under the literal model (nuisance std multiplied by ``scale``)."""
    w1, wn_sq = float(w[0]), float(w[1:] @ w[1:])
    sd = math.sqrt(w1**2 * cfg.signal_var + scale**2 * cfg.nuis_var * wn_sq)
    acc = 0.0
    for y in (-1.0, 1.0):
        centers = ((y, cfg.majority_weight), (float(_minority(np.array(y), cfg.minority_center)),
                                              1 - cfg.majority_weight))
        for c, p in centers:
            acc += 0.5 * p * float(stats.norm.cdf(y * w1 * c / sd)) if sd > 0 else 0.5 * p * float(y * w1 * c > 0)
    return acc


def literal_curve(cfg: LiteralConfig, seed: int) -> list[dict[str, Any]]:
    """One learning curve of the literal model (nested prefixes); records n, id_acc, ood_acc, seed."""
    rng = np.random.default_rng(seed)
    n_max = max(cfg.sizes)
    y = rng.choice([-1.0, 1.0], size=n_max)
    major = rng.random(n_max) < cfg.majority_weight
    center = np.where(major, y, _minority(y, cfg.minority_center))
    x = np.empty((n_max, cfg.dim))
    x[:, 0] = center + math.sqrt(cfg.signal_var) * rng.standard_normal(n_max)
    x[:, 1:] = math.sqrt(cfg.nuis_var) * rng.standard_normal((n_max, cfg.dim - 1))
    out = []
    for n in cfg.sizes:
        xs, ys = x[:n], y[:n]
        K = xs @ xs.T
        if cfg.learner == "min_norm":
            w = xs.T @ linalg.solve(K, ys, assume_a="pos")
        else:
            alpha = hard_margin_svm_dual(K * np.outer(ys, ys))
            w = xs.T @ (alpha * ys)
        out.append({"n": int(n), "seed": seed, "id_acc": literal_accuracy(w, cfg),
                    "ood_acc": literal_accuracy(w, cfg, cfg.ood_scale)})
    return out


def literal_sweep(cfg: LiteralConfig, *, seed: int = 0) -> dict[str, Any]:
    """``cfg.n_seeds`` learning curves of the literal model with per-curve probit statistics."""
    models, curves = [], []
    for k in range(cfg.n_seeds):
        recs = literal_curve(cfg, seed + k)
        models.extend(recs)
        curves.append({"seed": seed + k, **curve_statistics([r["id_acc"] for r in recs],
                                                            [r["ood_acc"] for r in recs])})
    r = np.array([c["pearson"] for c in curves])
    return {"config": asdict(cfg), "models": models, "curves": curves, "r_mean": float(np.nanmean(r)),
            "r_min": float(np.nanmin(r)), "r_max": float(np.nanmax(r))}


def with_overrides(cfg: WrongLineConfig, **kw: Any) -> WrongLineConfig:
    """``dataclasses.replace`` re-exported for callers that build variants of a config."""
    return replace(cfg, **kw)
