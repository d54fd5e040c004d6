"""Accuracy-on-the-line fits (ratelab.analysis.accuracy_line) against scipy.stats and hand-computed cases."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from ratelab.analysis.accuracy_line import (
    fit_line,
    inverse_transform,
    load_accuracy_table,
    logit,
    plot_accuracy_line,
    predict_ood,
    probit,
)


def _random_accs(n, seed=0, slope=0.8, noise=0.2):
    rng = np.random.default_rng(seed)
    zx = rng.uniform(-0.5, 2.0, n)
    zy = slope * zx - 0.3 + noise * rng.standard_normal(n)
    return stats.norm.cdf(zx), stats.norm.cdf(zy)


def test_transforms_hand_values_and_clipping():
    np.testing.assert_allclose(probit([0.5, 0.975]), [0.0, 1.959963984540054], atol=1e-12)
    np.testing.assert_allclose(logit([0.5, 0.75]), [0.0, math.log(3)], atol=1e-12)
    # 0 and 1 are clipped into [clip, 1 - clip] instead of becoming infinite.
    np.testing.assert_allclose(probit([0.0, 1.0], clip=1e-4), stats.norm.ppf([1e-4, 1 - 1e-4]))
    np.testing.assert_allclose(logit([1.0], clip=0.01), [math.log(99)])
    z = np.linspace(-3, 3, 7)
    for kind in ("probit", "logit"):
        np.testing.assert_allclose(probit(inverse_transform(z, "probit")) if kind == "probit"
                                   else logit(inverse_transform(z, "logit")), z, atol=1e-9)


def test_fit_line_matches_scipy():
    ida, ooda = _random_accs(25)
    for kind, tf in (("probit", stats.norm.ppf), ("logit", lambda a: np.log(a / (1 - a)))):
        f = fit_line(ida, ooda, transform=kind, n_boot=0)
        x, y = tf(ida), tf(ooda)
        lr = stats.linregress(x, y)
        assert f.slope == pytest.approx(lr.slope, rel=1e-10)
        assert f.intercept == pytest.approx(lr.intercept, rel=1e-10, abs=1e-12)
        assert f.pearson == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-10)
        assert f.spearman == pytest.approx(stats.spearmanr(ida, ooda)[0], rel=1e-10)
        assert f.r_squared == pytest.approx(lr.rvalue**2, rel=1e-10)
        assert f.n == 25 and f.transform == kind
        assert math.isnan(f.pearson_ci[0])  # no bootstrap requested


def test_hand_case_exact_line_and_negative_line():
    z = np.array([-1.0, 0.0, 0.5, 1.0, 2.0])
    f = fit_line(stats.norm.cdf(z), stats.norm.cdf(0.5 * z + 0.25), n_boot=0)
    assert (f.slope, f.intercept, f.pearson, f.spearman) == pytest.approx((0.5, 0.25, 1.0, 1.0), abs=1e-9)
    g = fit_line(stats.norm.cdf(z), stats.norm.cdf(-1.5 * z), n_boot=0)
    assert (g.slope, g.pearson, g.spearman) == pytest.approx((-1.5, -1.0, -1.0), abs=1e-9)
    # Beyond the clip (Φ(-4) < 1e-4) the value is clipped, so the hand line bends there.
    h = fit_line(stats.norm.cdf(z), stats.norm.cdf(-2 * z), n_boot=0)
    assert h.slope > -2.0 + 1e-3
    np.testing.assert_allclose(predict_ood(f, [stats.norm.cdf(3.0)]), stats.norm.cdf([1.75]), atol=1e-12)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    widths = []
    for n in (15, 240):
        ida, ooda = _random_accs(n, seed=1)
        f = fit_line(ida, ooda, n_boot=400, seed=3)
        for est, (lo, hi) in ((f.pearson, f.pearson_ci), (f.spearman, f.spearman_ci), (f.slope, f.slope_ci),
                              (f.intercept, f.intercept_ci)):
            assert lo <= est <= hi
        assert f.n_boot_used == 400
        widths.append(f.slope_ci[1] - f.slope_ci[0])
    assert widths[1] < 0.5 * widths[0]
    # Same seed, same interval.
    ida, ooda = _random_accs(15, seed=1)
    assert fit_line(ida, ooda, n_boot=50, seed=7) == fit_line(ida, ooda, n_boot=50, seed=7)


def test_batched_bootstrap_statistics_match_the_loop():
    from ratelab.analysis.accuracy_line import _stats, _stats_batched

    ida, ooda = _random_accs(9, seed=2)
    x, y = probit(ida), probit(ooda)
    x[3] = x[4]  # ties exercise the rank averaging
    idx = np.random.default_rng(0).integers(0, 9, size=(300, 9))
    idx[0] = 2  # a degenerate resample: every statistic undefined
    batched = _stats_batched(x, y, idx)
    loop = np.array([_stats(x[i], y[i]) for i in idx])
    np.testing.assert_allclose(batched, loop, rtol=1e-10, atol=1e-12)
    assert np.isnan(batched[0]).all()


def test_fit_line_errors():
    with pytest.raises(ValueError, match="id_acc has 3 values but ood_acc has 2"):
        fit_line([0.5, 0.6, 0.7], [0.5, 0.6])
    with pytest.raises(ValueError, match="at least 3 models"):
        fit_line([0.5, 0.6], [0.5, 0.6])
    with pytest.raises(ValueError, match="percentages"):
        fit_line([50, 60, 70], [0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match=r"ood_acc: accuracies must lie in \[0, 1\]"):
        fit_line([0.5, 0.6, 0.7], [0.5, -0.1, 0.7])
    with pytest.raises(ValueError, match="transform"):
        fit_line([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], transform="log")
    with pytest.raises(ValueError, match="clip"):
        probit([0.5], clip=0.0)
    # Constant ID accuracies: no slope, reported as NaN rather than a division error.
    f = fit_line([0.7, 0.7, 0.7], [0.5, 0.6, 0.7], n_boot=10)
    assert math.isnan(f.slope) and math.isnan(f.pearson) and f.n_boot_used == 0


def test_load_table_csv_json_and_errors(tmp_path):
    ida, ooda = _random_accs(5)
    p = tmp_path / "t.csv"
    p.write_text("model,id_acc,ood_acc\n" + "".join(f"m{i},{a},{b}\n" for i, (a, b) in enumerate(zip(ida, ooda))))
    t = load_accuracy_table(p)
    assert t["model"] == [f"m{i}" for i in range(5)]
    np.testing.assert_allclose(t["id_acc"], ida)
    np.testing.assert_allclose(t["ood_acc"], ooda)
    rows = [{"name": f"m{i}", "id": a, "ood": b} for i, (a, b) in enumerate(zip(ida, ooda))]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    t2 = load_accuracy_table(tmp_path / "r.json", model_key="name", id_key="id", ood_key="ood")
    np.testing.assert_allclose(t2["ood_acc"], ooda)
    (tmp_path / "c.json").write_text(json.dumps({"model": ["a", "b"], "id_acc": [0.5, 0.6], "ood_acc": [0.4, 0.5]}))
    assert load_accuracy_table(tmp_path / "c.json")["model"] == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_accuracy_table(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="missing column 'ood_acc'"):
        (tmp_path / "bad.csv").write_text("model,id_acc\na,0.5\n")
        load_accuracy_table(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"row 1, column 'id_acc': not a number"):
        (tmp_path / "nan.csv").write_text("model,id_acc,ood_acc\na,0.5,0.4\nb,x,0.3\n")
        load_accuracy_table(tmp_path / "nan.csv")
    with pytest.raises(ValueError, match="outside"):
        (tmp_path / "pct.csv").write_text("model,id_acc,ood_acc\na,95,0.4\n")
        load_accuracy_table(tmp_path / "pct.csv")
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "t.txt").write_text("x")
        load_accuracy_table(tmp_path / "t.txt")


def test_plot_overlays_two_series():
    ida, ooda = _random_accs(10)
    f = fit_line(ida, ooda, n_boot=0)
    ax = plot_accuracy_line(ida, ooda, fit=f, labels=[f"m{i}" for i in range(10)], label="a")
    ax = plot_accuracy_line(ooda, ida, fit=fit_line(ooda, ida, n_boot=0), ax=ax, label="b")
    assert len(ax.collections) == 2  # two scatters
    lo, hi = ax.get_xlim()
    allz = probit(np.concatenate([ida, ooda]))
    assert lo <= allz.min() and hi >= allz.max()
    # Tick labels are accuracies placed at their probit positions.
    ticks = ax.get_xticks()
    names = [float(t.get_text()) for t in ax.get_xticklabels()]
    np.testing.assert_allclose(ticks, probit(names), atol=1e-9)
