"""Measurements of the ``var`` recipe that need no trained model: sampling time, the noise of a Fréchet-distance
difference, image grids.

Kept out of :mod:`ratelab.recipes.var.recipe` so that tests can use them without registering the recipe.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["fd_difference", "grid_figure", "loss_difference", "quartiles", "ratio_summary", "time_interleaved"]


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (inclusive method; one value gives it three times)."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        raise ValueError("quartiles: no values")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def time_interleaved(contenders: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                     sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every contender, ``repeats`` times each.

    Every repeat calls each contender once, in an order rotated by one per repeat, so a slow spell of a shared
    machine falls on all of them alike (the protocol of ``benchmarks/_machine.py``). ``warmup`` untimed calls of each
    come first. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before every clock reading.

    Returns:
        ``{name: [seconds of repeat 0, 1, ...]}``.
    """
    if repeats < 1:
        raise ValueError(f"time_interleaved: repeats must be >= 1, got {repeats}")
    names = list(contenders)
    for _ in range(warmup):
        for n in names:
            contenders[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            contenders[n]()
            if sync is not None:
                sync()
            out[n].append(time.perf_counter() - t0)
    return out


def ratio_summary(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    """Per-repeat ratios ``num[i] / den[i]`` (e.g. baseline seconds / ours: > 1 means ours is faster) summarised as
    median and quartiles; ``beyond_spread`` says the whole interquartile range lies above 1."""
    if len(num) != len(den) or not num:
        raise ValueError("ratio_summary: two equally long, non-empty lists of timings expected")
    q1, med, q3 = quartiles([a / b for a, b in zip(num, den)])
    return {"median": med, "q1": q1, "q3": q3, "beyond_spread": q1 > 1.0}


def loss_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Whether arm ``a``'s per-seed losses are lower than arm ``b``'s beyond their spread over seeds.

    Returns:
        ``diff`` (mean of ``a`` minus mean of ``b``), ``two_se`` (twice sqrt(var_a / n_a + var_b / n_b) with the
        sample variances over seeds; NaN when an arm has one seed: no interval), ``separated`` and ``better``
        (``diff < -two_se``; both False without an interval).
    """
    if not a or not b:
        raise ValueError("loss_difference: both arms need at least one value")
    ma, mb = float(np.mean(a)), float(np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return {"diff": ma - mb, "two_se": float("nan"), "separated": False, "better": False}
    two_se = 2 * float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    d = ma - mb
    return {"diff": d, "two_se": two_se, "separated": abs(d) > two_se, "better": d < -two_se}


def _fd(mu_r: np.ndarray, s_r: np.ndarray, feats: np.ndarray) -> float:
    from ratelab.eval.generation import feature_statistics, frechet_distance

    return frechet_distance(mu_r, s_r, *feature_statistics(feats))


def fd_difference(real: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *, n_boot: int = 50,
                  seed: int = 0) -> dict[str, Any]:
    """Whether arm ``a``'s generated images lie closer to the real ones than arm ``b``'s, beyond noise, in a
    Fréchet distance on features.

    Args:
        real: (N, d) features of the real images.
        a, b: per training seed, (n, d) features of the images each arm generated.
        n_boot: bootstrap draws of the generated sets (with replacement) per seed, for the sampling noise of each
            seed's difference.
        seed: the bootstrap's generator.

    Returns:
        ``fd_a``, ``fd_b`` (per seed), ``diff`` (mean FD of ``a`` minus mean FD of ``b``; negative = ``a`` closer),
        ``two_se`` (twice the standard error of ``diff``: the bootstrap variance of the per-seed differences averaged
        over seeds, plus the spread of the differences over seeds when there are two or more), ``separated``
        (``|diff| > two_se``) and ``better`` (``diff < -two_se``: ``a`` closer beyond noise).
    """
    if len(a) != len(b) or not a:
        raise ValueError("fd_difference: both arms need the same number (>= 1) of seeds")
    from ratelab.eval.generation import feature_statistics

    r = real.detach().double().cpu().numpy()
    mu_r, s_r = feature_statistics(r)
    g = np.random.default_rng(seed)
    fa, fb, diffs, boot_var = [], [], [], []
    for xa, xb in zip(a, b):
        xa, xb = xa.detach().double().cpu().numpy(), xb.detach().double().cpu().numpy()
        da, db = _fd(mu_r, s_r, xa), _fd(mu_r, s_r, xb)
        fa.append(da)
        fb.append(db)
        diffs.append(da - db)
        boots = [_fd(mu_r, s_r, xa[g.integers(0, len(xa), len(xa))]) - _fd(mu_r, s_r, xb[g.integers(0, len(xb),
                                                                                                      len(xb))])
                 for _ in range(n_boot)]
        boot_var.append(float(np.var(boots, ddof=1)) if n_boot > 1 else 0.0)
    n = len(diffs)
    var = sum(boot_var) / n / n
    if n > 1:
        var += float(np.var(diffs, ddof=1)) / n
    d = float(np.mean(diffs))
    two_se = 2 * float(np.sqrt(var))
    return {"fd_a": fa, "fd_b": fb, "diff": d, "two_se": two_se, "separated": abs(d) > two_se,
            "better": d < -two_se}


def grid_figure(panels: Mapping[str, torch.Tensor], *, row_names: Sequence[str], title: str = ""):
    """A matplotlib Figure with one panel per entry of ``panels``: (rows, cols, C, H, W) images in [0, 1] tiled
    with one row per ``row_names`` entry (e.g. one class per row) and a 1-pixel white gap."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(panels), 0.36 * len(row_names) + 0.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, imgs) in zip(axes, panels.items()):
        rows, cols, ch, h, w = imgs.shape
        canvas = torch.ones(ch, rows * (h + 1) - 1, cols * (w + 1) - 1)
        for i in range(rows):
            for j in range(cols):
                canvas[:, i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = imgs[i, j].float().clamp(0, 1)
        arr = canvas.permute(1, 2, 0).numpy()
        ax.imshow(arr[..., 0] if ch == 1 else arr, cmap="gray" if ch == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(h + 1) * i + h / 2 for i in range(rows)])
        ax.set_yticklabels(list(row_names)[:rows], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
