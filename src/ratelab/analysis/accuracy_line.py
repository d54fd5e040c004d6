"""Accuracy on the line: the linear trend of out-of-distribution (OOD) on in-distribution (ID) accuracy across models.

Miller et al. ("Accuracy on the line", ICML 2021) observe that across many models trained on one task, OOD accuracy
is nearly a linear function of ID accuracy once both are probit-transformed, z = Φ⁻¹(acc). Sanyal et al. ("Accuracy
on the wrong line", AISTATS 2025) show that label noise plus nuisance features can make that trend negative. This
module measures the trend for any table of (model, ID accuracy, OOD accuracy):

* :func:`probit` / :func:`logit` transforms with clipping into (eps, 1 - eps);
* :func:`probit_pearson`: the Pearson r of transformed ID vs OOD accuracy alone (NaN when undefined);
* :func:`fit_line`: ordinary least squares of transformed OOD on transformed ID accuracy, Pearson and Spearman
  correlation, and percentile-bootstrap intervals over models (:class:`LineFit`);
* :func:`predict_ood`, :func:`plot_accuracy_line` and :func:`load_accuracy_table` (CSV or JSON).

Pure functions on numpy arrays; matplotlib is imported only when plotting.

Clipping convention: accuracies measured on a finite test set can be exactly 0 or 1, where both transforms are
infinite. They are clipped into ``[clip, 1 - clip]`` first; the default ``clip = 1e-4`` maps a perfect score to
probit 3.72 (logit 9.21), i.e. it treats 1.0 like "1 error in 10 000". Pass a smaller ``clip`` for larger test sets.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "DEFAULT_CLIP",
    "LineFit",
    "fit_line",
    "inverse_transform",
    "load_accuracy_table",
    "logit",
    "plot_accuracy_line",
    "predict_ood",
    "probit",
    "probit_pearson",
    "transform",
]

DEFAULT_CLIP = 1e-4
_TRANSFORMS = ("probit", "logit")


def _as_acc(values: Any, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 0:
        a = a[None]
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of accuracies, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: accuracies must be finite, got {a[~np.isfinite(a)][:3].tolist()}")
    bad = (a < 0) | (a > 1)
    if bad.any():
        hint = " (they look like percentages: divide by 100)" if np.all((a >= 0) & (a <= 100)) else ""
        raise ValueError(f"{name}: accuracies must lie in [0, 1], got {a[bad][:3].tolist()}{hint}")
    return a


def _check_clip(clip: float) -> float:
    if not 0 < clip < 0.5:
        raise ValueError(f"clip: expected a value in (0, 0.5), got {clip!r}")
    return float(clip)


def probit(acc: Any, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Inverse standard-normal CDF Φ⁻¹ of accuracies clipped into ``[clip, 1 - clip]``.

    Args:
        acc: (n,) accuracies in [0, 1].
        clip: clipping margin (see the module docstring).

    Returns:
        (n,) float64 probit values.
    """
    c = _check_clip(clip)
    return stats.norm.ppf(np.clip(_as_acc(acc, "acc"), c, 1 - c))


def logit(acc: Any, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """log(acc / (1 - acc)) of accuracies clipped into ``[clip, 1 - clip]``; (n,) -> (n,) float64."""
    c = _check_clip(clip)
    a = np.clip(_as_acc(acc, "acc"), c, 1 - c)
    return np.log(a) - np.log1p(-a)


def transform(acc: Any, kind: str = "probit", clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Apply the ``"probit"`` or ``"logit"`` transform."""
    return _apply(acc, kind, clip)


def _apply(acc: Any, kind: str, clip: float) -> np.ndarray:
    # Separate name: fit_line's ``transform`` argument shadows the public function.
    if kind == "probit":
        return probit(acc, clip)
    if kind == "logit":
        return logit(acc, clip)
    raise ValueError(f"transform: expected one of {_TRANSFORMS}, got {kind!r}")


def inverse_transform(z: Any, kind: str = "probit") -> np.ndarray:
    """Map transformed values back to accuracies (Φ for probit, the logistic function for logit)."""
    z = np.asarray(z, dtype=np.float64)
    if kind == "probit":
        return stats.norm.cdf(z)
    if kind == "logit":
        return 1.0 / (1.0 + np.exp(-z))
    raise ValueError(f"inverse_transform: expected one of {_TRANSFORMS}, got {kind!r}")


@dataclass(frozen=True)
class LineFit:
    """Least-squares line ``t(OOD) = slope * t(ID) + intercept`` in transformed space, with correlations.

    Intervals are percentile-bootstrap intervals over models at coverage ``ci``; ``n_boot_used`` counts the
    resamples in which every statistic was defined (a resample whose ID values are all equal has no slope).
    ``pearson`` is computed on the transformed values, ``spearman`` is transform-invariant.
    """

    slope: float
    intercept: float
    pearson: float
    spearman: float
    pearson_ci: tuple[float, float]
    spearman_ci: tuple[float, float]
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    n: int
    transform: str
    clip: float
    ci: float
    n_boot_used: int

    @property
    def r_squared(self) -> float:
        return self.pearson**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["r_squared"] = self.r_squared
        return d


def _stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(slope, intercept, pearson, spearman) of y on x; NaN where undefined (constant x or y)."""
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy = float(xc @ xc), float(yc @ yc)
    # Scale-aware zero test: floating-point noise on constant inputs is not variance.
    tiny = 1e-24 * max(1.0, float(np.abs(x).max()) ** 2, float(np.abs(y).max()) ** 2) * len(x)
    if sxx <= tiny:
        return math.nan, math.nan, math.nan, math.nan
    slope = float(xc @ yc) / sxx
    intercept = float(y.mean() - slope * x.mean())
    pearson = float(xc @ yc) / math.sqrt(sxx * syy) if syy > tiny else math.nan
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rxc, ryc = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(rxc @ rxc) * float(ryc @ ryc))
    spearman = float(rxc @ ryc) / den if den > 0 else math.nan
    return slope, intercept, pearson, spearman


def _stats_batched(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """:func:`_stats` of every resample ``(x[idx[b]], y[idx[b]])`` at once; idx (B, n) -> (B, 4) with NaN rows where
    a statistic is undefined. Vectorised twin of the per-resample loop (compared in the tests)."""
    if idx.shape[0] == 0:
        return np.empty((0, 4))
    xs, ys = x[idx], y[idx]
    xc, yc = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
    sxx, syy, sxy = (xc * xc).sum(1), (yc * yc).sum(1), (xc * yc).sum(1)
    tiny = 1e-24 * max(1.0, float(np.abs(x).max()) ** 2, float(np.abs(y).max()) ** 2) * x.shape[0]
    okx, oky = sxx > tiny, syy > tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(okx, sxy / sxx, np.nan)
        intercept = ys.mean(1) - slope * xs.mean(1)
        pearson = np.where(okx & oky, sxy / np.sqrt(sxx * syy), np.nan)
        rx, ry = stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)
        rxc, ryc = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
        den = np.sqrt((rxc * rxc).sum(1) * (ryc * ryc).sum(1))
        spearman = np.where(den > 0, (rxc * ryc).sum(1) / den, np.nan)
    out = np.stack([slope, intercept, pearson, spearman], axis=1)
    out[~okx] = np.nan  # match _stats: no slope means no statistic at all
    return out


def probit_pearson(id_acc: Any, ood_acc: Any, *, clip: float = DEFAULT_CLIP, transform: str = "probit") -> float:
    """Pearson r of transformed ID vs OOD accuracy across models, without the fit's bootstrap.

    The correlation of :func:`fit_line` (same transform, clipping and zero-variance rule), for callers that need
    only r and may hold too few models for a fit.

    Args:
        id_acc, ood_acc: (n,) accuracies in [0, 1] of the same models.
        clip: clipping margin before transforming (module docstring).
        transform: ``"probit"`` or ``"logit"``.

    Returns:
        r, or NaN with fewer than 3 models or when the transformed ID or OOD values are all equal.

    Raises:
        ValueError: length mismatch, values outside [0, 1], bad ``transform`` or ``clip``.
    """
    x_acc, y_acc = _as_acc(id_acc, "id_acc"), _as_acc(ood_acc, "ood_acc")
    if len(x_acc) != len(y_acc):
        raise ValueError(f"probit_pearson: id_acc has {len(x_acc)} values but ood_acc has {len(y_acc)}")
    x, y = _apply(x_acc, transform, clip), _apply(y_acc, transform, clip)
    if len(x) < 3:
        return math.nan
    return _stats(x, y)[2]


def fit_line(
    id_acc: Any,
    ood_acc: Any,
    *,
    transform: str = "probit",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    clip: float = DEFAULT_CLIP,
) -> LineFit:
    """Fit the accuracy line across models.

    Args:
        id_acc: (n,) ID accuracies in [0, 1], one per model.
        ood_acc: (n,) OOD accuracies of the same models.
        transform: ``"probit"`` (Miller et al.) or ``"logit"``.
        n_boot: bootstrap resamples of the models (0 disables the intervals: they are then NaN).
        ci: interval coverage in (0, 1).
        seed: seed of the resampling generator.
        clip: clipping margin before transforming (module docstring).

    Returns:
        :class:`LineFit`. Pearson/slope are NaN if all transformed ID (or OOD) values are equal.

    Raises:
        ValueError: on length mismatch, fewer than 3 models, values outside [0, 1], bad ``transform``/``ci``.
    """
    x_acc, y_acc = _as_acc(id_acc, "id_acc"), _as_acc(ood_acc, "ood_acc")
    if len(x_acc) != len(y_acc):
        raise ValueError(f"fit_line: id_acc has {len(x_acc)} values but ood_acc has {len(y_acc)}")
    if len(x_acc) < 3:
        raise ValueError(f"fit_line: need at least 3 models, got {len(x_acc)}")
    if transform not in _TRANSFORMS:
        raise ValueError(f"fit_line: transform must be one of {_TRANSFORMS}, got {transform!r}")
    if not 0 < ci < 1:
        raise ValueError(f"fit_line: ci must be in (0, 1), got {ci!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"fit_line: n_boot must be a non-negative integer, got {n_boot!r}")
    x = _apply(x_acc, transform, clip)
    y = _apply(y_acc, transform, clip)
    slope, intercept, pearson, spearman = _stats(x, y)
    n = len(x)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(n_boot), n))
    step = max(1, 2_000_000 // n)  # bounds the temporary (rows, n) arrays for large tables
    boot = np.concatenate([_stats_batched(x, y, idx[i:i + step]) for i in range(0, len(idx), step)]) \
        if len(idx) else np.empty((0, 4))
    ok = np.all(np.isfinite(boot), axis=1)
    lo_q, hi_q = (1 - ci) / 2, 1 - (1 - ci) / 2

    def interval(col: int) -> tuple[float, float]:
        if not ok.any():
            return (math.nan, math.nan)
        lo, hi = np.quantile(boot[ok, col], [lo_q, hi_q])
        return (float(lo), float(hi))

    return LineFit(
        slope=slope, intercept=intercept, pearson=pearson, spearman=spearman,
        pearson_ci=interval(2), spearman_ci=interval(3), slope_ci=interval(0), intercept_ci=interval(1),
        n=n, transform=transform, clip=float(clip), ci=float(ci), n_boot_used=int(ok.sum()),
    )


def predict_ood(fit: LineFit, id_acc: Any) -> np.ndarray:
    """OOD accuracy the fitted line predicts for ID accuracies ``id_acc``; (m,) -> (m,) in [0, 1]."""
    z = transform(id_acc, fit.transform, fit.clip)
    return inverse_transform(fit.slope * z + fit.intercept, fit.transform)


_TICKS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)


def plot_accuracy_line(
    id_acc: Any,
    ood_acc: Any,
    fit: LineFit | None = None,
    labels: Any = None,
    ax: Any = None,
    *,
    transform_kind: str | None = None,
    clip: float | None = None,
    color: Any = None,
    label: str | None = None,
    show_diagonal: bool = True,
) -> Any:
    """Scatter of OOD vs ID accuracy on transformed axes, with the fitted line and y = x.

    The axes are in transformed units (probit by default, or ``fit.transform``), so the fitted line is straight;
    the tick marks are placed at round accuracies and labelled in accuracy units (a "probit-scaled" axis).

    Args:
        id_acc, ood_acc: (n,) accuracies.
        fit: a :class:`LineFit` to draw (its transform and clip are used); ``None`` draws the points only.
        labels: optional (n,) model names written next to the points.
        ax: matplotlib Axes to draw into (a new figure is made if ``None``).
        transform_kind: ``"probit"``/``"logit"`` when ``fit`` is None (default probit).
        clip: clipping margin when ``fit`` is None (default :data:`DEFAULT_CLIP`).
        color, label: scatter colour and legend label (lets several series share one Axes).
        show_diagonal: draw y = x.

    Returns:
        The Axes.
    """
    kind = fit.transform if fit is not None else (transform_kind or "probit")
    c = fit.clip if fit is not None else (DEFAULT_CLIP if clip is None else clip)
    x = transform(id_acc, kind, c)
    y = transform(ood_acc, kind, c)
    if len(x) != len(y):
        raise ValueError(f"plot_accuracy_line: id_acc has {len(x)} values but ood_acc has {len(y)}")
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(5, 5)).subplots()
    # Several series may share one Axes (e.g. clean vs noisy): keep the union of their ranges.
    prev = ax.get_xlim() if ax.has_data() else None
    pts = ax.scatter(x, y, s=18, color=color, label=label, zorder=3)
    if labels is not None:
        for xi, yi, t in zip(x, y, labels):
            ax.annotate(str(t), (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
    lo = float(min(x.min(), y.min()))
    hi = float(max(x.max(), y.max()))
    pad = 0.1 * max(hi - lo, 0.2)
    lo, hi = lo - pad, hi + pad
    grid = np.linspace(lo, hi, 50)
    if fit is not None and math.isfinite(fit.slope):
        xs = np.linspace(float(x.min()), float(x.max()), 20)  # the line over the models' ID range only
        ax.plot(xs, fit.slope * xs + fit.intercept, "-", color=pts.get_facecolor()[0], lw=1.2,
                label=f"fit: slope {fit.slope:.2f}, r {fit.pearson:.2f}")
    if show_diagonal:
        ax.plot(grid, grid, "--", color="0.5", lw=0.8, label="y = x" if label is None else None)
    if prev is not None:
        lo, hi = min(lo, prev[0]), max(hi, prev[1])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ticks = [t for t in _TICKS if lo <= float(transform([t], kind, c)[0]) <= hi]
    pos = transform(ticks, kind, c) if ticks else []
    names = [f"{t:g}" for t in ticks]
    ax.set_xticks(pos, names)
    ax.set_yticks(pos, names)
    ax.set_xlabel(f"ID accuracy ({kind} scale)")
    ax.set_ylabel(f"OOD accuracy ({kind} scale)")
    ax.grid(alpha=0.3)
    return ax


def load_accuracy_table(
    path: str | Path,
    *,
    model_key: str = "model",
    id_key: str = "id_acc",
    ood_key: str = "ood_acc",
) -> dict[str, Any]:
    """Read a table of (model, ID accuracy, OOD accuracy) from a CSV (header row) or JSON file.

    JSON may be a list of row objects, ``{"rows": [...]}``, or a dict of column lists.

    Returns:
        ``{"model": list[str], "id_acc": (n,) ndarray, "ood_acc": (n,) ndarray}``.

    Raises:
        FileNotFoundError: missing file. ValueError: unknown format, missing column, non-numeric or out-of-range value
        (the message names the file, row and column).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"accuracy table not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from e
        if isinstance(data, dict) and "rows" in data:
            data = data["rows"]
        if isinstance(data, dict):
            cols = {k: v for k, v in data.items() if isinstance(v, list)}
            lengths = {len(v) for v in cols.values()}
            if len(lengths) != 1:
                sizes = {k: len(v) for k, v in cols.items()}
                raise ValueError(f"{path}: column lists must have equal lengths, got {sizes}")
            n = lengths.pop()
            rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
            columns = list(cols)
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            rows = data
            columns = sorted({k for r in rows for k in r})
        else:
            raise ValueError(f"{path}: expected a list of row objects, {{'rows': [...]}} or a dict of column lists")
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r} (use .csv or .json)")
    if not rows:
        raise ValueError(f"{path}: the table has no rows")
    for key, what in ((model_key, "model_key"), (id_key, "id_key"), (ood_key, "ood_key")):
        if key not in columns:
            raise ValueError(f"{path}: missing column {key!r} ({what}); columns are {list(columns)}")
    models, ids, oods = [], [], []
    for i, r in enumerate(rows):
        models.append(str(r.get(model_key)))
        for key, out in ((id_key, ids), (ood_key, oods)):
            v = r.get(key)
            try:
                fv = float(v)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i}, column {key!r}: not a number: {v!r}") from None
            if not (0.0 <= fv <= 1.0):
                raise ValueError(f"{path}: row {i}, column {key!r}: accuracy {fv} is outside [0, 1]")
            out.append(fv)
    return {"model": models, "id_acc": np.asarray(ids), "ood_acc": np.asarray(oods)}
