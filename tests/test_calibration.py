"""Tests of ratelab.analysis.calibration: hand-computed metrics, binning conventions, fast vs reference binning,
statistical behaviour on synthetic data, recalibrators and error messages."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from ratelab.analysis import calibration as cal

torch.set_num_threads(1)


def _calibrated_sample(n: int, k: int, seed: int, temp: float = 1.0, scale: float = 3.0):
    """Logits z ~ scale * N(0, I); labels drawn from softmax(z / temp): softmax(z / temp) is calibrated."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / temp, 1), 1, generator=g).squeeze(1)
    return z, y


# ---------------------------------------------------------------- hand-computed cases


def test_ece_hand_computed_five_bins():
    # conf = .9, .55, .7, .75 ; preds 0, 0, 1, 0 ; labels 0, 1, 1, 1 -> correct 1, 0, 1, 0.
    # 5 equal-width (l, u] bins: .9 -> (.8, 1], .55 -> (.4, .6], .7 and .75 -> (.6, .8].
    # bin (.4,.6]: conf .55 acc 0 gap .55 w 1/4 ; bin (.6,.8]: conf .725 acc .5 gap .225 w 1/2 ;
    # bin (.8,1]: conf .9 acc 1 gap .1 w 1/4.
    # ECE = .1375 + .1125 + .025 = .275 ; MCE = .55 ;
    # RMS = sqrt(.25*.3025 + .5*.050625 + .25*.01) = sqrt(.075625 + .0253125 + .0025) = sqrt(.1034375)
    p = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.75, 0.25]])
    y = np.array([0, 1, 1, 1])
    assert cal.ece(p, y, n_bins=5) == pytest.approx(0.275, abs=1e-12)
    assert cal.mce(p, y, n_bins=5) == pytest.approx(0.55, abs=1e-12)
    assert cal.rms_ce(p, y, n_bins=5) == pytest.approx(math.sqrt(0.1034375), abs=1e-12)
    # torch input, same answer
    assert cal.ece(torch.tensor(p, dtype=torch.float32), torch.tensor(y), n_bins=5) == pytest.approx(0.275, abs=1e-6)


def test_ece_edge_conventions_at_exact_edges():
    # 4 bins, edges 0, .25, .5, .75, 1 (exact in binary floating point).
    # conf .5 (correct: argmax tie goes to class 0 = label), .7 (correct), .75 (wrong).
    # right (l, u]: {.5} in (.25,.5] gap .5 w 1/3 ; {.7,.75} in (.5,.75]: conf .725 acc .5 gap .225 w 2/3
    #   ECE = 1/6 + .15 = .316666...
    # left [l, u): {.5,.7} in [.5,.75): conf .6 acc 1 gap .4 w 2/3 ; {.75} in [.75,1]: gap .75 w 1/3
    #   ECE = .266666... + .25 = .516666...
    p = np.array([[0.5, 0.5], [0.7, 0.3], [0.75, 0.25]])
    y = np.array([0, 0, 1])
    assert cal.ece(p, y, n_bins=4, edges="right") == pytest.approx(1 / 6 + 0.15, abs=1e-12)
    assert cal.ece(p, y, n_bins=4, edges="left") == pytest.approx(0.4 * 2 / 3 + 0.25, abs=1e-12)


@pytest.mark.parametrize("fn", [cal.bin_stats, cal.bin_stats_ref])
def test_bin_edges_zero_one_and_interior(fn):
    conf = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.1, 0.6])
    ones = torch.ones_like(conf)
    # (l, u]: 0 -> bin 0 (first bin closed), .25 -> 0, .5 -> 1, .75 -> 2, 1 -> 3, .1 -> 0, .6 -> 2
    assert fn(conf, ones, 4, edges="right").counts.tolist() == [3, 1, 2, 1]
    # [l, u): 0 -> 0, .25 -> 1, .5 -> 2, .75 -> 3, 1 -> 3 (last bin closed), .1 -> 0, .6 -> 2
    assert fn(conf, ones, 4, edges="left").counts.tolist() == [2, 1, 2, 2]


def test_equal_mass_bin_sizes_and_ties():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(10, generator=g, dtype=torch.float64)
    st = cal.bin_stats(conf, torch.zeros(10), n_bins=3, binning="mass")
    assert st.counts.tolist() == [4, 3, 3]
    srt = conf.sort().values
    assert st.conf_sum.tolist() == pytest.approx([float(srt[:4].sum()), float(srt[4:7].sum()), float(srt[7:].sum())])
    # all tied: still equal mass, split in input order (stable sort)
    tied = torch.full((7,), 0.8, dtype=torch.float64)
    correct = torch.tensor([1.0, 1, 1, 0, 0, 0, 0])
    st = cal.bin_stats(tied, correct, n_bins=2, binning="mass")
    assert st.counts.tolist() == [4, 3] and st.acc_sum.tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="n_bins"):
        cal.bin_stats(conf[:2], torch.zeros(2), n_bins=3, binning="mass")


@pytest.mark.parametrize("binning,edges", [("width", "right"), ("width", "left"), ("mass", "right")])
@pytest.mark.parametrize("n_bins", [1, 7, 10, 15])
def test_fast_binning_matches_reference(binning, edges, n_bins):
    g = torch.Generator().manual_seed(n_bins)
    # mix of continuous values, exact multiples of 1/8 (edges for some n_bins), ties, 0 and 1
    conf = torch.cat([torch.rand(300, generator=g, dtype=torch.float64),
                      torch.randint(0, 9, (100,), generator=g).to(torch.float64) / 8,
                      torch.tensor([0.0, 1.0, 0.5, 0.5], dtype=torch.float64)])
    conf = conf[torch.randperm(conf.numel(), generator=g)]
    correct = (torch.rand(conf.numel(), generator=g) < conf).to(torch.float64)
    fast = cal.bin_stats(conf, correct, n_bins, binning, edges)
    ref = cal.bin_stats_ref(conf, correct, n_bins, binning, edges)
    assert torch.equal(fast.counts, ref.counts)
    assert int(fast.counts.sum()) == conf.numel()
    torch.testing.assert_close(fast.conf_sum, ref.conf_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.acc_sum, ref.acc_sum, rtol=0, atol=0)
    torch.testing.assert_close(fast.edges, ref.edges)
    gf, wf = fast.gaps()
    gr, wr = ref.gaps()
    assert float((gf * wf).sum()) == pytest.approx(float((gr * wr).sum()), abs=1e-12)


def test_brier_and_nll_direct_formulas():
    z, y = _calibrated_sample(50, 4, seed=1)
    p = torch.softmax(z, 1).numpy()
    yn = y.numpy()
    brier_direct = np.mean([sum((p[i, k] - (k == yn[i])) ** 2 for k in range(4)) for i in range(50)])
    nll_direct = np.mean([-math.log(p[i, yn[i]]) for i in range(50)])
    assert cal.brier(p, yn) == pytest.approx(brier_direct, rel=1e-12)
    assert cal.brier(z, y, from_logits=True) == pytest.approx(brier_direct, rel=1e-12)
    assert cal.nll(p, yn) == pytest.approx(nll_direct, rel=1e-10)
    assert cal.nll(z, y, from_logits=True) == pytest.approx(nll_direct, rel=1e-10)
    # a confident zero on the true class stays finite
    assert cal.nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_classwise_ece_hand_computed():
    # K=2, 1 bin: classwise ECE per class = |mean p_k - freq(y=k)|.
    # mean p_0 = (.9 + .2 + .6) / 3 = .566..., freq(y=0) = 1/3 -> .2333...; class 1 is the mirror image -> same.
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 1, 1])
    assert cal.classwise_ece(p, y, n_bins=1) == pytest.approx(1.7 / 3 - 1 / 3, abs=1e-12)


# ---------------------------------------------------------------- statistical behaviour


def test_calibrated_data_has_small_ece_and_sharpened_data_does_not():
    n, n_bins = 20000, 10
    z, y = _calibrated_sample(n, 5, seed=2)
    # per bin |acc - conf| <= 4 sigma with sigma <= 1/(2 sqrt(n_b)); sum_b (n_b/n) 2/sqrt(n_b) <= 2 sqrt(B/n)
    tol = 2 * math.sqrt(n_bins / n)
    e = cal.ece(z, y, n_bins=n_bins, from_logits=True)
    assert e < tol
    assert cal.ece(z, y, n_bins=n_bins, binning="mass", from_logits=True) < tol
    # the same labels with 2x sharpened logits: clearly above the tolerance, so the check above can fail
    assert cal.ece(2 * z, y, n_bins=n_bins, from_logits=True) > 2 * tol


def test_temperature_recovers_known_temperature():
    z, y = _calibrated_sample(20000, 5, seed=3, temp=2.5)
    ts = cal.TemperatureScaling().fit(z, y)
    assert ts.temperature == pytest.approx(2.5, rel=0.06)
    # numpy and probability inputs give the same T (log-probs differ from logits by a per-row constant)
    ts_p = cal.TemperatureScaling(inputs="probs").fit(torch.softmax(z, 1).numpy(), y.numpy())
    assert ts_p.temperature == pytest.approx(ts.temperature, rel=1e-4)


def test_temperature_fixes_overconfidence_on_held_out_split():
    z, y = _calibrated_sample(8000, 10, seed=4, temp=2.0)  # logits are 2x too sharp
    fit_z, fit_y, test_z, test_y = z[:4000], y[:4000], z[4000:], y[4000:]
    ts = cal.TemperatureScaling().fit(fit_z, fit_y)
    assert ts.temperature > 1.5
    p = ts.transform(test_z)
    assert torch.equal(p.argmax(1), test_z.argmax(1))  # accuracy untouched
    before, after = cal.ece(test_z, test_y, from_logits=True), cal.ece(p, test_y)
    assert after < 0.5 * before
    assert cal.nll(p, test_y) < cal.nll(test_z, test_y, from_logits=True)


def test_vector_and_platt_fix_class_dependent_miscalibration():
    z, y = _calibrated_sample(8000, 3, seed=5)
    distorted = z * torch.tensor([3.0, 1.0, 0.5]) + torch.tensor([1.0, 0.0, -1.0])
    tr, te = slice(0, 4000), slice(4000, 8000)
    raw = cal.nll(distorted[te], y[te], from_logits=True)
    vs = cal.VectorScaling().fit(distorted[tr], y[tr])
    nll_vs = cal.nll(vs.transform(distorted[te]), y[te])
    nll_ts = cal.nll(cal.TemperatureScaling().fit(distorted[tr], y[tr]).transform(distorted[te]), y[te])
    assert nll_vs < nll_ts < raw
    # w ~ (1/3, 1, 2) undoes the per-class scaling (the biases are only defined up to a common shift)
    torch.testing.assert_close(vs.weight, torch.tensor([1 / 3, 1.0, 2.0], dtype=torch.float64), rtol=0.1, atol=0.0)
    pl = cal.PlattScaling().fit(distorted[tr], y[tr])
    q = pl.transform(distorted[te])
    torch.testing.assert_close(q.sum(1), torch.ones(4000, dtype=torch.float64))
    assert cal.nll(q, y[te]) < raw


@pytest.mark.parametrize("cls", [cal.HistogramBinning, cal.IsotonicCalibration, cal.ScalingBinning])
def test_binning_recalibrators_reduce_ece(cls):
    z, y = _calibrated_sample(8000, 4, seed=6, temp=2.5)
    tr, te = slice(0, 4000), slice(4000, 8000)
    calib = cls(inputs="logits").fit(z[tr], y[tr])
    q = calib.transform(z[te])
    assert q.shape == (4000, 4)
    torch.testing.assert_close(q.sum(1), torch.ones(4000, dtype=torch.float64))
    assert cal.ece(q, y[te]) < 0.5 * cal.ece(z[te], y[te], from_logits=True)


def test_scaling_binning_outputs_bin_means_of_scaled_values():
    z, y = _calibrated_sample(3000, 3, seed=7, temp=2.0)
    sb = cal.ScalingBinning(n_bins=10, normalize=False).fit(z, y)
    q = sb.transform(z)
    g = sb.platt._marginals(torch.softmax(z, 1))
    for c in range(3):
        assert torch.unique(q[:, c]).numel() <= 10
        # equal-mass: on the fit set each bin holds n/10 samples, and its value is the mean scaled value there
        order = g[:, c].argsort()
        for b in range(10):
            members = order[b * 300:(b + 1) * 300]
            assert torch.allclose(q[members, c], g[members, c].mean().expand(300))
    sb3 = cal.ScalingBinning(n_bins=5, splits=3).fit(z, y)
    assert sb3.transform(z[:10]).shape == (10, 3)


def test_histogram_binning_values_are_label_frequencies():
    # 2 bins (l, u]; p_0 in {.3, .8}: bin 0 holds rows 0-1 (labels 0, 1 -> freq(y=0)=.5), bin 1 rows 2-4 (labels
    # 0, 0, 1 -> 2/3). Class 1 mirrors it: p_1 .7 -> bin 1 (freq(y=1)=.5), .2 -> bin 0 (1/3).
    p = np.array([[0.3, 0.7], [0.3, 0.7], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])
    y = np.array([0, 1, 0, 0, 1])
    hb = cal.HistogramBinning(n_bins=2).fit(p, y)
    torch.testing.assert_close(hb.bin_values, torch.tensor([[0.5, 2 / 3], [1 / 3, 0.5]], dtype=torch.float64))
    # row of class-0 prob .8: (2/3, 1/3) already sums to 1
    torch.testing.assert_close(hb.transform(p[2:3]), torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))


# ---------------------------------------------------------------- bootstrap and figure


def test_bootstrap_ci_contains_point_estimate():
    z, y = _calibrated_sample(2000, 4, seed=8, temp=2.0)
    point, lo, hi = cal.bootstrap_ci(partial(cal.brier, from_logits=True), z, y, n_boot=200, seed=0)
    assert lo <= point <= hi and hi - lo > 0
    assert point == cal.brier(z, y, from_logits=True)
    point, lo, hi = cal.bootstrap_ci(partial(cal.ece, from_logits=True), z, y, n_boot=200, seed=0)
    assert lo <= point <= hi
    # deterministic under the seed, narrower with fewer samples' worth of coverage
    assert cal.bootstrap_ci(partial(cal.ece, from_logits=True), z, y, n_boot=200, seed=0) == (point, lo, hi)
    _, lo2, hi2 = cal.bootstrap_ci(partial(cal.ece, from_logits=True), z, y, n_boot=200, alpha=0.5, seed=0)
    assert lo <= lo2 <= hi2 <= hi


def test_reliability_diagram_builds():
    from matplotlib.figure import Figure

    z, y = _calibrated_sample(500, 3, seed=9, temp=2.0)
    fig = cal.reliability_diagram(z, y, n_bins=10, from_logits=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    hist_heights = [p.get_height() for p in fig.axes[1].patches]
    assert sum(hist_heights) == 500
    fig2 = Figure()
    ax = fig2.add_subplot()
    assert cal.reliability_diagram(z, y, 5, ax=ax, binning="mass", from_logits=True) is fig2
    assert len(fig2.axes) == 2  # the twin axis for the histogram


# ---------------------------------------------------------------- errors


def test_clear_errors():
    p = np.array([[0.6, 0.4], [0.3, 0.7]])
    with pytest.raises(ValueError, match=r"probs: expected a 2-D"):
        cal.ece(p[0], [0])
    with pytest.raises(ValueError, match=r"labels: expected shape \(2,\)"):
        cal.ece(p, [0, 1, 1])
    with pytest.raises(ValueError, match=r"labels: class indices must lie in \[0, 2\)"):
        cal.ece(p, [0, 2])
    with pytest.raises(ValueError, match=r"labels: class indices"):
        cal.brier(p, [-1, 0])
    with pytest.raises(ValueError, match="labels: expected integer"):
        cal.ece(p, [0.5, 1.0])
    with pytest.raises(ValueError, match="rows must sum to 1"):
        cal.ece(np.array([[0.6, 0.6], [0.3, 0.7]]), [0, 1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*from_logits"):
        cal.nll(np.array([[2.0, -1.0], [0.3, 0.7]]), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        cal.ece(np.array([[np.nan, 0.5], [0.3, 0.7]]), [0, 1])
    with pytest.raises(ValueError, match="binning"):
        cal.ece(p, [0, 1], binning="quantile")
    with pytest.raises(ValueError, match="edges"):
        cal.ece(p, [0, 1], edges="both")
    with pytest.raises(ValueError, match="n_bins"):
        cal.ece(p, [0, 1], n_bins=0)
    with pytest.raises(RuntimeError, match="fit"):
        cal.TemperatureScaling().transform(p)
    ts = cal.TemperatureScaling().fit(np.log(p), [0, 1])
    with pytest.raises(ValueError, match="K=2"):
        ts.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="inputs"):
        cal.VectorScaling(inputs="scores")


def test_ece_mce_rms_match_torchmetrics():
    # torchmetrics' top-label calibration error with equal-width bins; continuous confidences avoid the bin-edge
    # conventions where the two libraries differ (torchmetrics opens an extra bin for confidence exactly 1.0).
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2000, 7, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1)
    labels = torch.randint(0, 7, (2000,), generator=g)
    for n_bins in (10, 15):
        for norm, ours in (("l1", cal.ece), ("max", cal.mce), ("l2", cal.rms_ce)):
            ref = tmf.multiclass_calibration_error(probs.float(), labels, num_classes=7, n_bins=n_bins, norm=norm)
            assert ours(probs, labels, n_bins=n_bins) == pytest.approx(float(ref), abs=1e-5), (norm, n_bins)
