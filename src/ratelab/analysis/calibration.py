"""Calibration metrics, reliability diagrams and post-hoc recalibrators (pure functions, torch or numpy in).

Inputs at every boundary: ``probs`` (n, K) class probabilities (rows in [0, 1] summing to 1), or logits of the same
shape with ``from_logits=True``; ``labels`` (n,) integers in [0, K). Everything is computed in float64 on CPU and
returned as Python floats (metrics) or float64 torch tensors (``transform``).

Binning conventions (the source of most disagreements between calibration libraries):

* ``binning="width"``: ``n_bins`` equal-width bins on [0, 1] with edges ``linspace(0, 1, n_bins + 1)``.

  - ``edges="right"`` (default, the ICL-calibration / Guo et al. code): bins are (l, u]. The first bin is closed,
    [0, u_1], so a confidence of exactly 0 lands in bin 0; a confidence of exactly 1 lands in the last bin.
  - ``edges="left"``: bins are [l, u). The last bin is closed, [l, 1], so a confidence of exactly 1 lands in the
    last bin (torchmetrics instead opens an extra bin for 1.0 there; we do not); 0 lands in bin 0.

* ``binning="mass"``: equal-mass (quantile) bins. Samples are sorted by confidence (stable sort, so ties keep input
  order) and cut into ``n_bins`` consecutive groups whose sizes differ by at most one, the larger groups first
  (as ``numpy.array_split``). Tied confidences can therefore straddle two bins; ``edges`` does not apply. Requires
  ``n >= n_bins``.

ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|; MCE = max over non-empty bins of |acc - conf|; RMS-CE =
sqrt(sum_b (|B_b| / n) (acc - conf)^2) (torchmetrics ``norm="l2"``). Empty bins contribute nothing.

Every binning has a readable reference twin (``bin_stats_ref``, a Python loop over bins) next to the vectorized path
(``bin_stats``: ``torch.bucketize`` + ``torch.bincount``); the tests check equal counts and matching sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BinStats",
    "HistogramBinning",
    "IsotonicCalibration",
    "PlattScaling",
    "ScalingBinning",
    "TemperatureScaling",
    "VectorScaling",
    "bin_stats",
    "bin_stats_ref",
    "bootstrap_ci",
    "brier",
    "classwise_ece",
    "ece",
    "mce",
    "nll",
    "reliability_diagram",
    "rms_ce",
    "to_probs",
]

_SUM_TOL = 1e-4  # float32 softmax rows sum to 1 within ~1e-6; leave room for half-precision exports
_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: cannot convert {type(x).__name__} to an array ({e})") from e
    return t


def _check_scores(x: Any, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, K) array, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: no samples (shape {tuple(t.shape)})")
    if t.shape[1] < 2:
        raise ValueError(f"{name}: need K >= 2 classes, got shape {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected a real-valued array, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _check_probs(p: torch.Tensor, name: str) -> torch.Tensor:
    if (p < 0).any() or (p > 1).any():
        raise ValueError(f"{name}: probabilities must lie in [0, 1] (min {p.min():.4g}, max {p.max():.4g}); "
                         "pass from_logits=True for logits")
    dev = (p.sum(1) - 1).abs().max().item()
    if dev > _SUM_TOL:
        raise ValueError(f"{name}: rows must sum to 1 (max deviation {dev:.3g}); pass from_logits=True for logits")
    return p


def _check_labels(y: Any, n: int, k: int, name: str = "labels") -> torch.Tensor:
    t = _as_tensor(y, name)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match the predictions, got {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name}: expected integer class indices, got non-integer floats")
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected integer class indices, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if n and (t.min() < 0 or t.max() >= k):
        raise ValueError(f"{name}: class indices must lie in [0, {k}), got range [{t.min()}, {t.max()}]")
    return t


def to_probs(x: Any, from_logits: bool = False, name: str = "probs") -> torch.Tensor:
    """Validate (n, K) probabilities, or turn (n, K) logits into them with a softmax.

    Args:
        x: (n, K) array or tensor.
        from_logits: treat ``x`` as logits.
        name: argument name used in error messages.

    Returns:
        (n, K) float64 tensor of probabilities.
    """
    t = _check_scores(x, name)
    if from_logits:
        return torch.softmax(t, dim=1)
    return _check_probs(t, name)


def _prep(probs: Any, labels: Any, from_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    p = to_probs(probs, from_logits)
    return p, _check_labels(labels, p.shape[0], p.shape[1])


def _check_bins(n_bins: int, binning: str, edges: str, n: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    if binning not in ("width", "mass"):
        raise ValueError(f"binning: expected 'width' or 'mass', got {binning!r}")
    if edges not in ("right", "left"):
        raise ValueError(f"edges: expected 'right' ((l, u] bins) or 'left' ([l, u) bins), got {edges!r}")
    if binning == "mass" and n < n_bins:
        raise ValueError(f"n_bins: equal-mass binning needs at least n_bins={n_bins} samples, got {n}")


# ----------------------------------------------------------------------------------------------------------------
# binning: fast path and reference twin
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinStats:
    """Per-bin sums of a binned (confidence, correctness) sample.

    Attributes:
        counts: (B,) int64 number of samples per bin.
        conf_sum: (B,) float64 sum of confidences per bin.
        acc_sum: (B,) float64 sum of the 0/1 (or fractional) targets per bin.
        edges: (B + 1,) float64 bin edges for equal-width bins; for equal-mass bins the min confidence, the
            midpoints between consecutive groups, and the max confidence.
        n: total number of samples.
    """

    counts: torch.Tensor
    conf_sum: torch.Tensor
    acc_sum: torch.Tensor
    edges: torch.Tensor
    n: int

    @property
    def conf(self) -> torch.Tensor:
        """(B,) mean confidence per bin (NaN for empty bins)."""
        return self.conf_sum / self.counts.to(torch.float64)

    @property
    def acc(self) -> torch.Tensor:
        """(B,) mean target per bin (NaN for empty bins)."""
        return self.acc_sum / self.counts.to(torch.float64)

    def gaps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """|acc - conf| and weight |B_b| / n of the non-empty bins."""
        keep = self.counts > 0
        gap = (self.acc_sum[keep] - self.conf_sum[keep]).abs() / self.counts[keep].to(torch.float64)
        return gap, self.counts[keep].to(torch.float64) / self.n


def _width_edges(n_bins: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)


def _mass_edges(sorted_conf: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    ends = np.cumsum(sizes)
    inner = [(sorted_conf[e - 1] + sorted_conf[e]) / 2 for e in ends[:-1]]
    return torch.stack([sorted_conf[0], *inner, sorted_conf[-1]]).to(torch.float64)


def _mass_sizes(n: int, n_bins: int) -> list[int]:
    q, r = divmod(n, n_bins)
    return [q + 1] * r + [q] * (n_bins - r)


def _bin_index(conf: torch.Tensor, n_bins: int, binning: str, edges: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorized bin index (n,) in [0, n_bins) and the edges."""
    n = conf.shape[0]
    if binning == "width":
        e = _width_edges(n_bins)
        # bucketize(right=False) puts x with e[i-1] < x <= e[i] at i: exactly the (l, u] convention on the inner
        # edges, with x <= e[1] (0 included) in bin 0 and x > e[-2] (1 included) in the last bin.
        idx = torch.bucketize(conf, e[1:-1].contiguous(), right=(edges == "left"))
        return idx, e
    order = torch.argsort(conf, stable=True)
    q, r = divmod(n, n_bins)
    # rank -> bin for groups of sizes (q + 1) * r then q * (n_bins - r), without a loop.
    rank = torch.arange(n)
    big = r * (q + 1)
    bin_of_rank = torch.where(rank < big, rank // (q + 1), r + (rank - big) // max(q, 1))
    idx = torch.empty(n, dtype=torch.int64)
    idx[order] = bin_of_rank
    return idx, _mass_edges(conf[order], _mass_sizes(n, n_bins))


def bin_stats(conf: Any, correct: Any, n_bins: int = 10, binning: str = "width", edges: str = "right") -> BinStats:
    """Bin (confidence, correctness) pairs; vectorized path.

    Args:
        conf: (n,) confidences in [0, 1].
        correct: (n,) targets in [0, 1] (1 = correct prediction / positive class).
        n_bins: number of bins.
        binning: "width" (equal-width) or "mass" (equal-mass); see the module docstring.
        edges: "right" for (l, u] bins or "left" for [l, u) bins (equal-width only).

    Returns:
        BinStats.
    """
    c = _as_tensor(conf, "conf").to(torch.float64).reshape(-1).contiguous()
    a = _as_tensor(correct, "correct").to(torch.float64).reshape(-1)
    if c.shape != a.shape:
        raise ValueError(f"conf and correct must have the same length, got {c.shape[0]} and {a.shape[0]}")
    if c.numel() == 0:
        raise ValueError("conf: no samples")
    if (c < 0).any() or (c > 1).any() or not torch.isfinite(c).all():
        raise ValueError("conf: confidences must lie in [0, 1]")
    _check_bins(n_bins, binning, edges, c.shape[0])
    idx, e = _bin_index(c, n_bins, binning, edges)
    return BinStats(
        counts=torch.bincount(idx, minlength=n_bins),
        conf_sum=torch.bincount(idx, weights=c, minlength=n_bins),
        acc_sum=torch.bincount(idx, weights=a, minlength=n_bins),
        edges=e,
        n=c.shape[0],
    )


def bin_stats_ref(conf: Any, correct: Any, n_bins: int = 10, binning: str = "width", edges: str = "right") -> BinStats:
    """Reference twin of :func:`bin_stats`: an explicit Python loop over bins with comparison masks."""
    c = _as_tensor(conf, "conf").to(torch.float64).reshape(-1)
    a = _as_tensor(correct, "correct").to(torch.float64).reshape(-1)
    n = c.shape[0]
    _check_bins(n_bins, binning, edges, n)
    counts, cs, as_ = [], [], []
    if binning == "width":
        e = _width_edges(n_bins)
        for b in range(n_bins):
            lo, hi = e[b], e[b + 1]
            if edges == "right":
                mask = ((c > lo) | (b == 0)) & (c <= hi)  # (l, u], first bin closed at 0
            else:
                mask = (c >= lo) & ((c < hi) | (b == n_bins - 1))  # [l, u), last bin closed at 1
            counts.append(int(mask.sum()))
            cs.append(float(c[mask].sum()))
            as_.append(float(a[mask].sum()))
    else:
        order = sorted(range(n), key=lambda i: float(c[i]))  # Python's sort is stable, like argsort(stable=True)
        sizes = _mass_sizes(n, n_bins)
        start = 0
        for size in sizes:
            members = order[start:start + size]
            counts.append(len(members))
            cs.append(sum(float(c[i]) for i in members))
            as_.append(sum(float(a[i]) for i in members))
            start += size
        e = _mass_edges(c[torch.tensor(order)], sizes)
    return BinStats(torch.tensor(counts, dtype=torch.int64), torch.tensor(cs, dtype=torch.float64),
                    torch.tensor(as_, dtype=torch.float64), e, n)


def _top_label(p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conf, pred = p.max(dim=1)
    return conf, (pred == y).to(torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------


def _top_stats(probs, labels, n_bins, binning, edges, from_logits) -> BinStats:
    p, y = _prep(probs, labels, from_logits)
    conf, correct = _top_label(p, y)
    return bin_stats(conf, correct, n_bins, binning, edges)


def ece(probs: Any, labels: Any, n_bins: int = 10, binning: str = "width", edges: str = "right",
        from_logits: bool = False) -> float:
    """Top-label expected calibration error.

    Confidence = max_k p_k, correctness = 1[argmax p = y] (ties in argmax go to the lowest index).

    Args:
        probs: (n, K) probabilities, or logits with ``from_logits=True``.
        labels: (n,) integer labels in [0, K).
        n_bins: number of bins.
        binning: "width" or "mass" (module docstring).
        edges: "right" ((l, u], the ICL-calibration code's convention) or "left" ([l, u)).
        from_logits: apply a softmax first.

    Returns:
        ECE in [0, 1].
    """
    gap, w = _top_stats(probs, labels, n_bins, binning, edges, from_logits).gaps()
    return float((gap * w).sum())


def mce(probs: Any, labels: Any, n_bins: int = 10, binning: str = "width", edges: str = "right",
        from_logits: bool = False) -> float:
    """Top-label maximum calibration error: max over non-empty bins of |acc - conf| (arguments as :func:`ece`)."""
    gap, _ = _top_stats(probs, labels, n_bins, binning, edges, from_logits).gaps()
    return float(gap.max())


def rms_ce(probs: Any, labels: Any, n_bins: int = 10, binning: str = "width", edges: str = "right",
           from_logits: bool = False) -> float:
    """Top-label RMS calibration error sqrt(sum_b w_b (acc_b - conf_b)^2) (arguments as :func:`ece`)."""
    gap, w = _top_stats(probs, labels, n_bins, binning, edges, from_logits).gaps()
    return float((w * gap**2).sum().sqrt())


def classwise_ece(probs: Any, labels: Any, n_bins: int = 10, binning: str = "width", edges: str = "right",
                  from_logits: bool = False) -> float:
    """Class-wise ECE (Kull et al. 2019): mean over classes k of the ECE of p_k against 1[y = k].

    Every class uses all n samples (not only those predicted as k). Arguments as :func:`ece`.
    """
    p, y = _prep(probs, labels, from_logits)
    total = 0.0
    for k in range(p.shape[1]):
        gap, w = bin_stats(p[:, k], (y == k).to(torch.float64), n_bins, binning, edges).gaps()
        total += float((gap * w).sum())
    return total / p.shape[1]


def brier(probs: Any, labels: Any, from_logits: bool = False) -> float:
    """Multiclass Brier score: mean over samples of sum_k (p_k - 1[y = k])^2, in [0, 2].

    Args:
        probs: (n, K) probabilities, or logits with ``from_logits=True``.
        labels: (n,) integer labels.
        from_logits: apply a softmax first.
    """
    p, y = _prep(probs, labels, from_logits)
    onehot = F.one_hot(y, p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(1).mean())


def nll(probs: Any, labels: Any, from_logits: bool = False) -> float:
    """Mean negative log-likelihood -log p_y (natural log).

    With logits the log-softmax is used directly (no underflow); with probabilities p_y is clamped at 1e-12 so a
    confidently wrong zero gives a large finite value (27.6) instead of inf.
    """
    if from_logits:
        z = _check_scores(probs, "probs")
        y = _check_labels(labels, z.shape[0], z.shape[1])
        return float(-torch.log_softmax(z, 1).gather(1, y[:, None]).mean())
    p, y = _prep(probs, labels, False)
    return float(-p.gather(1, y[:, None]).clamp_min(_EPS).log().mean())


def bootstrap_ci(metric_fn: Callable[[Any, Any], float], probs: Any, labels: Any, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling samples with replacement.

    Args:
        metric_fn: ``metric_fn(probs, labels) -> float`` (e.g. ``ece`` or a ``functools.partial`` of it).
        probs: (n, K) array passed through to ``metric_fn`` after row resampling (probabilities or logits).
        labels: (n,) labels.
        n_boot: number of bootstrap resamples.
        alpha: 1 - coverage (0.05 gives a 95 % interval).
        seed: seed of the resampling generator.

    Returns:
        (estimate on the full sample, lower, upper). Note: binned ECE is biased upward on small samples, and the
        resampled ECEs inherit that bias, so the percentile interval can sit slightly above the point estimate for
        nearly calibrated models.
    """
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha!r}")
    p = _as_tensor(probs, "probs")
    y = _as_tensor(labels, "labels")
    if p.ndim < 1 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs and labels must have the same first dimension, got {tuple(p.shape)} and "
                         f"{tuple(y.shape)}")
    point = float(metric_fn(p, y))
    rng = np.random.default_rng(seed)
    n = p.shape[0]
    vals = np.empty(n_boot)
    for i in range(n_boot):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        vals[i] = metric_fn(p[idx], y[idx])
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return point, float(lo), float(hi)


def reliability_diagram(probs: Any, labels: Any, n_bins: int = 10, ax: Any = None, binning: str = "width",
                        edges: str = "right", from_logits: bool = False, title: str | None = None) -> Any:
    """Reliability diagram of top-label confidence with the confidence histogram.

    Without ``ax``: a new ``matplotlib.figure.Figure`` (no pyplot state) with two stacked axes, accuracy per bin
    (bars, gap to the diagonal shaded) over the count of samples per bin. With ``ax``: the accuracy bars are drawn
    on ``ax`` and the histogram as translucent bars on a twin y-axis.

    Args:
        probs: (n, K) probabilities, or logits with ``from_logits=True``.
        labels: (n,) labels.
        n_bins: number of bins.
        ax: optional matplotlib Axes to draw into.
        binning: "width" or "mass".
        edges: "right" or "left".
        from_logits: apply a softmax first.
        title: axes title; defaults to the binning scheme, sample count and ECE.

    Returns:
        The matplotlib Figure.
    """
    st = _top_stats(probs, labels, n_bins, binning, edges, from_logits)
    gap, w = st.gaps()
    e_val = float((gap * w).sum())
    if binning == "width":
        left = st.edges[:-1].numpy()
        width = np.diff(st.edges.numpy())
    else:
        left = st.edges[:-1].numpy()
        width = np.maximum(np.diff(st.edges.numpy()), 1e-3)
    keep = (st.counts > 0).numpy()
    acc = np.where(keep, st.acc.nan_to_num(0.0).numpy(), 0.0)
    conf = np.where(keep, st.conf.nan_to_num(0.0).numpy(), 0.0)
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.5, 5.5))
        ax_rel, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig = ax.figure
        ax_rel, ax_hist = ax, ax.twinx()
    ax_rel.bar(left, acc, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    ax_rel.bar(left[keep], (conf - acc)[keep], bottom=acc[keep], width=width[keep], align="edge",
               color="tab:red", alpha=0.3, hatch="//", label="gap")
    ax_rel.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_ylabel("accuracy")
    ax_rel.legend(loc="upper left", fontsize=8)
    ax_rel.set_title(title if title is not None else
                     f"{binning} bins={n_bins} n={st.n} ECE={e_val:.3f}", fontsize=9)
    hist_kw = {"alpha": 0.25, "color": "gray"} if ax is not None else {"color": "gray", "edgecolor": "black"}
    ax_hist.bar(left, st.counts.numpy(), width=width, align="edge", **hist_kw)
    ax_hist.set_ylabel("count")
    (ax_hist if ax is None else ax_rel).set_xlabel("confidence")
    return fig


# ----------------------------------------------------------------------------------------------------------------
# recalibrators
# ----------------------------------------------------------------------------------------------------------------


def _lbfgs(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], max_iter: int) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


class _Calibrator:
    """Shared input handling. ``inputs`` says what ``fit``/``transform`` receive: "logits" or "probs"."""

    _default_inputs = "logits"

    def __init__(self, inputs: str | None = None) -> None:
        inputs = self._default_inputs if inputs is None else inputs
        if inputs not in ("logits", "probs"):
            raise ValueError(f"inputs: expected 'logits' or 'probs', got {inputs!r}")
        self.inputs = inputs
        self.num_classes: int | None = None

    def _logits(self, x: Any, name: str) -> torch.Tensor:
        """(n, K) log-scores: the logits, or log(probs) (a valid logit vector up to a per-row constant)."""
        t = _check_scores(x, name)
        if self.inputs == "probs":
            return _check_probs(t, name).clamp_min(_EPS).log()
        return t

    def _probs(self, x: Any, name: str) -> torch.Tensor:
        return to_probs(x, from_logits=self.inputs == "logits", name=name)

    def _check_fit_labels(self, n: int, k: int, labels: Any) -> torch.Tensor:
        self.num_classes = k
        return _check_labels(labels, n, k)

    def _check_fitted(self, k: int) -> None:
        if self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before transform()")
        if k != self.num_classes:
            raise ValueError(f"{type(self).__name__}: fitted on K={self.num_classes} classes, got K={k}")

    def fit(self, x: Any, labels: Any) -> _Calibrator:  # pragma: no cover - interface
        raise NotImplementedError

    def transform(self, x: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def fit_transform(self, x: Any, labels: Any) -> torch.Tensor:
        """``fit(x, labels).transform(x)`` (in-sample; evaluate on a separate split)."""
        return self.fit(x, labels).transform(x)


class TemperatureScaling(_Calibrator):
    """Temperature scaling (Guo et al. 2017): p = softmax(z / T), one scalar T > 0 fitted by NLL with LBFGS.

    When it helps: a network whose ranking is fine but whose confidences are uniformly too sharp (T > 1) or too
    flat (T < 1), the typical case for modern deep nets. It never changes the argmax (accuracy is untouched) and has
    one parameter, so a few hundred held-out samples suffice. It cannot fix class-dependent or non-monotone
    miscalibration.

    Args:
        inputs: "logits" (default) or "probs" (log-probabilities are used as logits).
        max_iter: LBFGS iterations.
    """

    def __init__(self, inputs: str = "logits", max_iter: int = 200) -> None:
        super().__init__(inputs)
        self.max_iter = max_iter
        self.temperature: float = 1.0

    def fit(self, x: Any, labels: Any) -> TemperatureScaling:
        """Fit T on held-out (n, K) logits and (n,) labels; returns self."""
        z = self._logits(x, "logits")
        y = self._check_fit_labels(*z.shape, labels)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # log-parametrized: T stays positive
        _lbfgs([log_t], lambda: F.cross_entropy(z * torch.exp(-log_t), y), self.max_iter)
        self.temperature = float(log_t.detach().exp())
        return self

    def transform(self, x: Any) -> torch.Tensor:
        """(n, K) calibrated probabilities softmax(z / T)."""
        z = self._logits(x, "logits")
        self._check_fitted(z.shape[1])
        return torch.softmax(z / self.temperature, 1)


class VectorScaling(_Calibrator):
    """Vector scaling (Guo et al. 2017): p = softmax(w * z + b), w, b in R^K fitted by NLL with LBFGS.

    When it helps: class-dependent over/under-confidence or label-prior shift, with enough held-out data (2K
    parameters; thousands of samples for many classes). Can change the argmax. ``weight_decay`` pulls (w, b) to
    (1, 0) and avoids divergence on separable data.

    Args:
        inputs: "logits" (default) or "probs".
        weight_decay: L2 penalty on (w - 1, b).
        max_iter: LBFGS iterations.
    """

    def __init__(self, inputs: str = "logits", weight_decay: float = 0.0, max_iter: int = 200) -> None:
        super().__init__(inputs)
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, x: Any, labels: Any) -> VectorScaling:
        """Fit (w, b) on held-out (n, K) logits and labels; returns self."""
        z = self._logits(x, "logits")
        y = self._check_fit_labels(*z.shape, labels)
        k = z.shape[1]
        w = torch.ones(k, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(k, dtype=torch.float64, requires_grad=True)

        def loss() -> torch.Tensor:
            reg = self.weight_decay * (((w - 1) ** 2).sum() + (b**2).sum())
            return F.cross_entropy(z * w + b, y) + reg

        _lbfgs([w, b], loss, self.max_iter)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def transform(self, x: Any) -> torch.Tensor:
        """(n, K) calibrated probabilities."""
        z = self._logits(x, "logits")
        self._check_fitted(z.shape[1])
        return torch.softmax(z * self.weight + self.bias, 1)


def _fit_platt(s: torch.Tensor, t: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column 1-D logistic regressions sigmoid(a_k s_k + b_k) on (n, K) scores and (n, K) 0/1 targets.

    The K problems are independent, so one LBFGS on the summed loss solves them all at once.
    """
    k = s.shape[1]
    a = torch.ones(k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    _lbfgs([a, b], lambda: F.binary_cross_entropy_with_logits(s * a + b, t, reduction="sum") / s.shape[0], max_iter)
    return a.detach(), b.detach()


def _renormalize(q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    s = q.sum(1, keepdim=True)
    # a row where every one-vs-rest map gave 0 carries no information: keep the uncalibrated row instead of 0/0.
    return torch.where(s > 0, q / s.clamp_min(_EPS), fallback)


def _ovr_scores(p: torch.Tensor) -> torch.Tensor:
    """logit(p_k) per class, clipped so that p = 0 or 1 stays finite."""
    pc = p.clamp(1e-7, 1 - 1e-7)
    return pc.log() - (1 - pc).log()


class PlattScaling(_Calibrator):
    """Platt scaling per class (one-vs-rest): q_k = sigmoid(a_k logit(p_k) + b_k), then rows renormalized.

    When it helps: per-class monotone distortions of confidence (including binary classifiers, where it is the
    classic choice), with a few hundred samples per class. Less constrained than temperature scaling, less
    data-hungry than binning. With ``normalize=False`` returns the K marginal probabilities unnormalized.
    """

    _default_inputs = "logits"

    def __init__(self, inputs: str = "logits", normalize: bool = True, max_iter: int = 200) -> None:
        super().__init__(inputs)
        self.normalize = normalize
        self.max_iter = max_iter
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None

    def fit(self, x: Any, labels: Any) -> PlattScaling:
        p = self._probs(x, "x")
        y = self._check_fit_labels(*p.shape, labels)
        self.a, self.b = _fit_platt(_ovr_scores(p), F.one_hot(y, p.shape[1]).to(torch.float64), self.max_iter)
        return self

    def _marginals(self, p: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_ovr_scores(p) * self.a + self.b)

    def transform(self, x: Any) -> torch.Tensor:
        p = self._probs(x, "x")
        self._check_fitted(p.shape[1])
        q = self._marginals(p)
        return _renormalize(q, p) if self.normalize else q


class HistogramBinning(_Calibrator):
    """Histogram binning (Zadrozny & Elkan 2001), one-vs-rest: per class k, equal-width bins of p_k and the
    calibrated value is the fraction of label-k samples in the bin; rows are then renormalized.

    When it helps: non-parametric, so it fixes non-monotone miscalibration that scaling cannot, and its output is
    verifiable (finitely many values). Needs many samples per bin and class; with little data prefer temperature
    scaling. Bins left empty at fit time keep their bin centre (no correction). Bin convention: ``edges``.

    Args:
        n_bins: bins per class.
        inputs: "probs" (default) or "logits".
        edges: "right" ((l, u]) or "left" ([l, u)).
    """

    _default_inputs = "probs"

    def __init__(self, n_bins: int = 10, inputs: str = "probs", edges: str = "right") -> None:
        super().__init__(inputs)
        _check_bins(n_bins, "width", edges, n_bins)
        self.n_bins, self.edges = n_bins, edges
        self.bin_values: torch.Tensor | None = None  # (K, n_bins)

    def _idx(self, p: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(p, _width_edges(self.n_bins)[1:-1].contiguous(), right=self.edges == "left")

    def fit(self, x: Any, labels: Any) -> HistogramBinning:
        p = self._probs(x, "x")
        y = self._check_fit_labels(*p.shape, labels)
        k = p.shape[1]
        idx = self._idx(p)  # (n, K)
        t = F.one_hot(y, k).to(torch.float64)
        flat = (idx + torch.arange(k) * self.n_bins).reshape(-1)
        cnt = torch.bincount(flat, minlength=k * self.n_bins).reshape(k, self.n_bins).to(torch.float64)
        pos = torch.bincount(flat, weights=t.reshape(-1), minlength=k * self.n_bins).reshape(k, self.n_bins)
        e = _width_edges(self.n_bins)
        centres = ((e[:-1] + e[1:]) / 2).expand(k, -1)
        self.bin_values = torch.where(cnt > 0, pos / cnt.clamp_min(1), centres)
        return self

    def transform(self, x: Any) -> torch.Tensor:
        p = self._probs(x, "x")
        self._check_fitted(p.shape[1])
        q = self.bin_values.gather(1, self._idx(p).T).T
        return _renormalize(q, p)


class IsotonicCalibration(_Calibrator):
    """Isotonic regression (Zadrozny & Elkan 2002), one-vs-rest: per class k a non-decreasing map p_k -> P(y = k)
    fitted with ``sklearn.isotonic.IsotonicRegression`` (clipped outside the fitted range), then rows renormalized.

    When it helps: monotone but otherwise arbitrary distortions with plenty of data (it overfits small calibration
    sets, producing flat steps). Keeps the ranking within each class; renormalization can change the argmax.

    Args:
        inputs: "probs" (default) or "logits".
    """

    _default_inputs = "probs"

    def __init__(self, inputs: str = "probs") -> None:
        super().__init__(inputs)
        self.models: list[Any] = []

    def fit(self, x: Any, labels: Any) -> IsotonicCalibration:
        from sklearn.isotonic import IsotonicRegression

        p = self._probs(x, "x")
        y = self._check_fit_labels(*p.shape, labels)
        self.models = []
        for k in range(p.shape[1]):
            m = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
            m.fit(p[:, k].numpy(), (y == k).numpy().astype(np.float64))
            self.models.append(m)
        return self

    def transform(self, x: Any) -> torch.Tensor:
        p = self._probs(x, "x")
        self._check_fitted(p.shape[1])
        q = torch.stack([torch.from_numpy(np.asarray(m.predict(p[:, k].numpy()), dtype=np.float64))
                         for k, m in enumerate(self.models)], 1)
        return _renormalize(q, p)


class ScalingBinning(_Calibrator):
    """Scaling-binning calibrator (Kumar, Liang & Ma, NeurIPS 2019), marginal version.

    Per class k: (1) Platt scaling g_k(p) = sigmoid(a_k logit(p_k) + b_k); (2) ``n_bins`` equal-mass bins of the
    scaled values g_k on the calibration set; (3) output the mean of g_k over the calibration samples in the bin
    (the mean of the *scaled* values, not of the labels: this is what makes its calibration error measurable with
    few samples). Rows are renormalized unless ``normalize=False``.

    The paper fits g, the bin edges and the bin means on three disjoint splits; ``splits=3`` does that (the
    calibration set is cut in order into thirds, so shuffle it first), while the default ``splits=1`` reuses one set
    for all three, as the ICL-calibration code does.

    When it helps: when you need the calibration error itself to be verifiable or a small calibration set for
    binning: it keeps scaling's sample efficiency and binning's measurability, and was the most consistent
    recalibrator in the ICL-calibration study (trust.md §3.5). Output takes at most ``n_bins`` values per class, so
    it can merge confidence levels (slight sharpness loss).

    Args:
        n_bins: equal-mass bins per class.
        inputs: "logits" (default) or "probs".
        splits: 1 or 3 (see above).
        normalize: renormalize the K marginal outputs to sum to 1.
    """

    def __init__(self, n_bins: int = 10, inputs: str = "logits", splits: int = 1, normalize: bool = True,
                 max_iter: int = 200) -> None:
        super().__init__(inputs)
        _check_bins(n_bins, "mass", "right", n_bins)
        if splits not in (1, 3):
            raise ValueError(f"splits: expected 1 or 3, got {splits!r}")
        self.n_bins, self.splits, self.normalize, self.max_iter = n_bins, splits, normalize, max_iter
        self.platt = PlattScaling(inputs=inputs, normalize=False, max_iter=max_iter)
        self.inner_edges: torch.Tensor | None = None  # (K, n_bins - 1)
        self.bin_values: torch.Tensor | None = None  # (K, n_bins)

    def fit(self, x: Any, labels: Any) -> ScalingBinning:
        p = self._probs(x, "x")
        y = self._check_fit_labels(*p.shape, labels)
        n, k = p.shape
        if self.splits == 3:
            cut = [0, n // 3, 2 * n // 3, n]
            parts = [slice(cut[i], cut[i + 1]) for i in range(3)]
        else:
            parts = [slice(0, n)] * 3
        if min(s.stop - s.start for s in parts[1:]) < self.n_bins:
            raise ValueError(f"x: ScalingBinning needs at least n_bins={self.n_bins} samples per split, got n={n}")
        self.platt.a, self.platt.b = _fit_platt(_ovr_scores(p[parts[0]]),
                                                F.one_hot(y[parts[0]], k).to(torch.float64), self.max_iter)
        self.platt.num_classes = k
        g_edges = self.platt._marginals(p[parts[1]])
        g_means = self.platt._marginals(p[parts[2]])
        inner, values = [], []
        for c in range(k):
            e = bin_stats(g_edges[:, c], torch.zeros(g_edges.shape[0]), self.n_bins, "mass").edges[1:-1]
            inner.append(e)
            idx = torch.bucketize(g_means[:, c].contiguous(), e)
            cnt = torch.bincount(idx, minlength=self.n_bins).to(torch.float64)
            s = torch.bincount(idx, weights=g_means[:, c], minlength=self.n_bins)
            # with splits=3 a bin can be empty on the third split: fall back to the midpoint of its edges.
            full = torch.cat([g_edges[:, c].min()[None], e, g_edges[:, c].max()[None]])
            values.append(torch.where(cnt > 0, s / cnt.clamp_min(1), (full[:-1] + full[1:]) / 2))
        self.inner_edges, self.bin_values = torch.stack(inner), torch.stack(values)
        return self

    def transform(self, x: Any) -> torch.Tensor:
        p = self._probs(x, "x")
        self._check_fitted(p.shape[1])
        g = self.platt._marginals(p)
        q = torch.stack([self.bin_values[c][torch.bucketize(g[:, c].contiguous(), self.inner_edges[c])]
                         for c in range(p.shape[1])], 1)
        return _renormalize(q, p) if self.normalize else q
