"""Cross-check of ratelab.analysis.calibration's ECE / MCE against netcal (EFS-OpenSource calibration-framework).

netcal 1.3.6 conventions (trust.md §3.7), read from netcal/metrics/Miscalibration.py:

* Inputs are probabilities. With (n, K) scores and labels taking >= 3 distinct values it measures the *top-label*
  calibration (confidence = max prob, accuracy = argmax == label), like ours.
* Binary mode: whenever the labels take <= 2 distinct values, netcal measures calibration of P(y = 1): it keeps
  column 1 of an (n, 2) input (or the (n,) input itself) and uses y as the "accuracy". Top-label ECE on a binary task
  is therefore netcal on (max prob, correct) pairs, and netcal on (n, 2) probabilities equals our binning of p[:, 1]
  against 1[y = 1].
* Equal-width bins (``equal_intervals=True``): edges linspace(0, 1, bins + 1) through ``np.histogramdd``, i.e.
  [l, u) bins with the last one closed, our ``edges="left"``; confidences are clipped to [eps, 1 - eps] first.
  The ICL-calibration code (and our default) uses (l, u]; the two only differ for confidences exactly on an edge.
* Equal-mass bins (``equal_intervals=False``): edges at ``np.quantile`` (linear interpolation) of the confidences,
  outer edges forced to 0 and 1. When n is a multiple of the bin count and confidences are distinct, each inner
  quantile falls strictly between the last sample of one of our ``numpy.array_split``-style groups and the first of
  the next, so the partitions coincide; for other n the group sizes can differ by one sample.
* ``sample_threshold=1`` (default): bins with fewer than one sample (empty bins) are ignored, as in ours.
"""

import numpy as np
import pytest
import torch

from ratelab.analysis.calibration import bin_stats, ece, mce

netcal_metrics = pytest.importorskip("netcal.metrics", reason="netcal is an optional cross-check dependency")


def _random(n, k, seed, temp=1.0):
    g = np.random.default_rng(seed)
    z = g.normal(size=(n, k)) * 2.0
    p = np.exp(z / temp)
    p /= p.sum(1, keepdims=True)
    # labels mostly follow the prediction, so accuracy spans the bins instead of sitting near 1/K
    y = np.where(g.random(n) < 0.6, p.argmax(1), g.integers(0, k, n))
    return p, y


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_mce_equal_width_match_netcal(k, seed):
    p, y = _random(1000, k, seed)
    assert len(np.unique(y)) >= 3  # netcal's multiclass (top-label) mode
    for binning_kw, ours_kw in [({"equal_intervals": True}, {"binning": "width", "edges": "left"}),
                                ({"equal_intervals": False}, {"binning": "mass"})]:
        want_ece = netcal_metrics.ECE(bins=10, sample_threshold=1, **binning_kw).measure(p, y)
        want_mce = netcal_metrics.MCE(bins=10, sample_threshold=1, **binning_kw).measure(p, y)
        assert ece(p, y, n_bins=10, **ours_kw) == pytest.approx(want_ece, abs=1e-9), binning_kw
        assert mce(p, y, n_bins=10, **ours_kw) == pytest.approx(want_mce, abs=1e-9), binning_kw
    # random continuous confidences never sit on an edge: both edge conventions agree with netcal here
    assert ece(p, y, edges="right") == pytest.approx(ece(p, y, edges="left"), abs=1e-12)


def test_many_bins_with_empty_bins_match_netcal():
    # 40 bins over a sharp distribution: many empty bins, which both libraries skip (sample_threshold=1)
    p, y = _random(400, 4, seed=3, temp=0.3)
    counts = bin_stats(p.max(1), (p.argmax(1) == y), n_bins=40, binning="width", edges="left").counts
    assert (counts == 0).any()
    assert ece(p, y, n_bins=40, edges="left") == pytest.approx(netcal_metrics.ECE(bins=40).measure(p, y), abs=1e-9)
    assert mce(p, y, n_bins=40, edges="left") == pytest.approx(netcal_metrics.MCE(bins=40).measure(p, y), abs=1e-9)


def test_edge_convention_left_matches_netcal_right_does_not():
    # confidences exactly 0.5 (an exact float edge of linspace(0, 1, 11)): netcal puts them in [0.5, 0.6) with the
    # 0.55 samples (our "left"), the (l, u] convention puts them in (0.4, 0.5] with the 0.45 samples.
    conf = np.array([0.5] * 10 + [0.55] * 10 + [0.45] * 10)
    correct = np.array([1] * 10 + [0] * 10 + [1] * 10)
    want = netcal_metrics.ECE(bins=10).measure(conf, correct)  # binary mode: X = confidence, y = correctness
    left = bin_stats(conf, correct, 10, "width", "left").gaps()
    right = bin_stats(conf, correct, 10, "width", "right").gaps()
    ece_left, ece_right = float((left[0] * left[1]).sum()), float((right[0] * right[1]).sum())
    assert ece_left == pytest.approx(want, abs=1e-9)
    assert abs(ece_right - want) > 0.1


def test_binary_conventions():
    p, y = _random(600, 2, seed=4)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(np.int64)
    for eq, ours_kw in [(True, {"binning": "width", "edges": "left"}), (False, {"binning": "mass"})]:
        # top-label ECE (ours, the paper's) == netcal fed (confidence, correctness) pairs
        want_top = netcal_metrics.ECE(bins=10, equal_intervals=eq).measure(conf, correct)
        assert ece(p, y, **ours_kw) == pytest.approx(want_top, abs=1e-9)
        # netcal on the (n, 2) probabilities measures P(y = 1): our binning of p[:, 1] against 1[y = 1]
        want_pos = netcal_metrics.ECE(bins=10, equal_intervals=eq).measure(p, y)
        gap, w = bin_stats(torch.from_numpy(p[:, 1]), torch.from_numpy((y == 1).astype(np.float64)), 10,
                           **ours_kw).gaps()
        assert float((gap * w).sum()) == pytest.approx(want_pos, abs=1e-9)
        if not eq:
            # With equal-width bins the two readings coincide by symmetry (p1 in [l, u) <-> conf in (1-u, 1-l])
            # except that top-label merges the two bins next to 0.5; equal-mass bins differ outright.
            assert abs(want_pos - want_top) > 1e-3
