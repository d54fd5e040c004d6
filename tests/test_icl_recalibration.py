"""ICLRecords validation, accuracy/ECE vs shots, and the three recalibration regimes on synthetic records."""

import math

import matplotlib
import numpy as np
import pytest
import torch

from ratelab.analysis.calibration import TemperatureScaling, ece
from ratelab.icl import ICLRecords, evaluate_groups, evaluate_regimes, format_table, plot_vs_shots, summarize, write_csv
from ratelab.icl.recalibration import fit_rows

matplotlib.use("Agg")


def _group(n, k, scale, shots, pid, id0, gen):
    """n rows whose labels follow softmax(z) while the reported logits are scale * z (scale > 1: overconfident)."""
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * 1.5
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=gen).squeeze(1)
    logits = z * scale
    return ICLRecords(torch.softmax(logits, 1), y, torch.full((n,), shots), torch.full((n,), pid),
                      torch.arange(id0, id0 + n), logits)


def _synthetic(scales, n, k=3, seed=0, id0=0):
    """Records with one group per ((shots, prompt_id) -> miscalibration scale) entry of ``scales``."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for (s, p), c in scales.items():
        parts.append(_group(n, k, c, s, p, id0, gen))
        id0 += n
    return ICLRecords.concat(parts)


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------


def test_records_validation_names_the_field():
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]])
    ok = dict(probs=p, labels=[0, 1], shots=[0, 1], prompt_id=[0, 0], example_id=[3, 4])
    r = ICLRecords(**ok)
    assert r.probs.dtype == torch.float64 and r.labels.dtype == torch.int64 and r.num_classes == 2 and len(r) == 2
    with pytest.raises(ValueError, match=r"ICLRecords\.probs: rows must sum to 1"):
        ICLRecords(**{**ok, "probs": torch.tensor([[0.7, 0.7], [0.2, 0.8]])})
    with pytest.raises(ValueError, match=r"ICLRecords\.labels: must lie in \[0, 2\)"):
        ICLRecords(**{**ok, "labels": [0, 2]})
    with pytest.raises(ValueError, match=r"ICLRecords\.shots: expected shape \(2,\)"):
        ICLRecords(**{**ok, "shots": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"ICLRecords\.shots: must be >= 0"):
        ICLRecords(**{**ok, "shots": [0, -1]})
    with pytest.raises(ValueError, match=r"ICLRecords\.prompt_id: expected integers"):
        ICLRecords(**{**ok, "prompt_id": [0.5, 0.0]})
    with pytest.raises(ValueError, match=r"ICLRecords\.logits: expected shape \(2, 2\)"):
        ICLRecords(**ok, logits=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"ICLRecords\.probs: expected shape \(n, K\)"):
        ICLRecords(**{**ok, "probs": torch.ones(2)})


def test_records_subset_concat_roundtrip():
    r = _synthetic({(0, 0): 1.0, (2, 1): 2.0}, n=5)
    s = r.subset(r.shots == 2)
    assert len(s) == 5 and (s.shots == 2).all() and s.logits is not None
    idx = r.subset(torch.tensor([9, 0]))
    assert idx.example_id.tolist() == [9, 0]
    both = ICLRecords.concat([r.subset(r.shots == 0), s])
    assert torch.equal(both.probs, r.probs) and torch.equal(both.example_id, r.example_id)
    no_logits = ICLRecords(r.probs, r.labels, r.shots, r.prompt_id, r.example_id)
    assert ICLRecords.concat([r, no_logits]).logits is None
    back = ICLRecords.from_dict(r.to_dict())
    assert torch.allclose(back.logits, r.logits) and torch.equal(back.labels, r.labels)
    # scores(): logits when present, else log-probs (same softmax)
    assert torch.allclose(torch.softmax(no_logits.scores(), 1), r.probs)
    with pytest.raises(ValueError, match="different numbers of label words"):
        ICLRecords.concat([r, _synthetic({(0, 0): 1.0}, n=3, k=4)])


# ---------------------------------------------------------------------------------------------------------------
# summarize
# ---------------------------------------------------------------------------------------------------------------


def test_summarize_matches_manual_per_group_average():
    r = _synthetic({(0, 0): 1.0, (4, 0): 2.0, (4, 1): 0.5, (4, 2): 3.0}, n=60)
    rows = summarize(r)
    assert [x["shots"] for x in rows] == [0, 4]
    four = rows[1]
    accs, eces = [], []
    for p in range(3):
        m = (r.shots == 4) & (r.prompt_id == p)
        accs.append(float((r.probs[m].argmax(1) == r.labels[m]).double().mean()))
        eces.append(ece(r.probs[m], r.labels[m], n_bins=10, binning="width", edges="right"))
    assert four["n_groups"] == 3 and four["n"] == 180
    assert four["acc_mean"] == pytest.approx(np.mean(accs)) and four["acc_std"] == pytest.approx(np.std(accs, ddof=1))
    assert four["ece_mean"] == pytest.approx(np.mean(eces)) and four["ece_std"] == pytest.approx(np.std(eces, ddof=1))
    assert four["conf_mean"] == pytest.approx(float(r.probs[r.shots == 4].max(1).values.mean()))
    assert rows[0]["acc_std"] == 0.0 and rows[0]["n_groups"] == 1


# ---------------------------------------------------------------------------------------------------------------
# regimes
# ---------------------------------------------------------------------------------------------------------------

# calibration groups with distinct miscalibration scales, so a fitted temperature tells which rows were used
CAL_SCALES = {(0, 0): 1.0, (2, 0): 2.0, (2, 1): 4.0, (2, 2): 8.0}


def test_fit_rows_selects_the_regime_rows():
    calib = _synthetic(CAL_SCALES, n=20)
    zs = fit_rows(calib, "zero_shot", 2, 1)
    assert torch.equal(zs, calib.shots == 0)
    ss = fit_rows(calib, "shot_specific", 2, 1)
    assert torch.equal(ss, (calib.shots == 2) & (calib.prompt_id != 1)) and int(ss.sum()) == 40
    ps = fit_rows(calib, "prompt_specific", 2, 1)
    assert torch.equal(ps, (calib.shots == 2) & (calib.prompt_id == 1)) and int(ps.sum()) == 20
    for regime in ("zero_shot", "shot_specific", "prompt_specific"):  # no demonstrations at 0 shots
        assert torch.equal(fit_rows(calib, regime, 0, 0), calib.shots == 0)
    with pytest.raises(ValueError, match=r"shots=4, prompt_id=3\).*shots == 4 and prompt_id == 3"):
        fit_rows(calib, "prompt_specific", 4, 3)
    with pytest.raises(ValueError, match="unknown regime 'bogus'"):
        fit_rows(calib, "bogus", 2, 0)


def test_regimes_fit_on_the_right_rows():
    torch.manual_seed(0)
    calib = _synthetic(CAL_SCALES, n=250, seed=1)
    test = _synthetic(CAL_SCALES, n=40, seed=2, id0=10_000)
    per = evaluate_groups(test, calib, methods=("temperature",))
    assert len(per) == 4 * 3
    scores = calib.scores()
    for r in per:
        mask = fit_rows(calib, r["regime"], r["shots"], r["prompt_id"])
        want = TemperatureScaling().fit(scores[mask], calib.labels[mask]).temperature
        assert r["temperature"] == pytest.approx(want, rel=1e-9)
        assert r["n_fit"] == int(mask.sum())
        if r["regime"] == "prompt_specific" or r["shots"] == 0:
            # the fitted temperature recovers the group's own miscalibration scale
            assert r["temperature"] == pytest.approx(CAL_SCALES[(r["shots"], r["prompt_id"])], rel=0.2)
        elif r["regime"] == "zero_shot":
            assert r["temperature"] == pytest.approx(1.0, rel=0.2)
        else:  # shot-specific: pooled over the other two prompts, never the group's own scale
            others = [c for (s, p), c in CAL_SCALES.items() if s == 2 and p != r["prompt_id"]]
            assert min(others) * 0.8 < r["temperature"] < max(others) * 1.2
    # temperature scaling never changes the argmax
    assert all(r["acc_after"] == r["acc_before"] for r in per)


def test_recalibration_reduces_ece_and_zero_shot_does_not_transfer():
    calib = _synthetic(CAL_SCALES, n=600, seed=3)
    test = _synthetic(CAL_SCALES, n=600, seed=4, id0=10_000)
    rows = evaluate_regimes(test, calib)
    get = {(r["shots"], r["method"], r["regime"]): r for r in rows}
    base = get[(2, "none", "none")]
    assert base["n_groups"] == 3 and base["ece_before_mean"] > 0.15  # scales 2, 4, 8: strongly overconfident
    for method in ("temperature", "scaling_binning"):
        ps = get[(2, method, "prompt_specific")]
        assert ps["ece_before_mean"] == pytest.approx(base["ece_before_mean"])
        assert ps["ece_after_mean"] < 0.35 * ps["ece_before_mean"], method
        # the 0-shot rows are calibrated (scale 1): a calibrator fitted there leaves the k-shot miscalibration
        zs = get[(2, method, "zero_shot")]
        assert zs["ece_after_mean"] > 0.6 * zs["ece_before_mean"], method
        assert ps["ece_after_mean"] < zs["ece_after_mean"]
    assert get[(0, "none", "none")]["n_groups"] == 1
    assert {r["method"] for r in rows} == {"none", "temperature", "scaling_binning"}
    assert len(rows) == 2 * (1 + 2 * 3)


def test_regime_errors_are_clear():
    calib = _synthetic({(0, 0): 1.0, (2, 0): 2.0}, n=30)
    test = _synthetic({(0, 0): 1.0, (2, 0): 2.0, (4, 1): 2.0}, n=30, id0=1000)
    with pytest.raises(ValueError, match=r"prompt_specific.*shots=4, prompt_id=1"):
        evaluate_regimes(test, calib, regimes=("prompt_specific",))
    # shot-specific needs other demonstration sets at the same k
    test2 = _synthetic({(2, 0): 2.0}, n=30, id0=1000)
    with pytest.raises(ValueError, match=r"shot_specific.*shots=2, prompt_id=0.*prompt_id != 0"):
        evaluate_regimes(test2, calib, regimes=("shot_specific",))
    with pytest.raises(ValueError, match="share 30 example_id"):
        evaluate_regimes(_synthetic({(2, 0): 2.0}, n=30), calib)
    with pytest.raises(ValueError, match="unknown recalibration method 'platt'"):
        evaluate_regimes(test2, calib, methods=("platt",))
    with pytest.raises(ValueError, match="K=4 label words but calib has K=3"):
        evaluate_regimes(_synthetic({(2, 0): 2.0}, n=30, k=4, id0=1000), calib)
    # scaling-binning needs n_bins rows: the message says which fit failed
    tiny = _synthetic({(0, 0): 1.0, (2, 0): 2.0}, n=5)
    with pytest.raises(ValueError, match=r"scaling_binning for regime 'prompt_specific'.*shots=2"):
        evaluate_regimes(test2, tiny, methods=("scaling_binning",), regimes=("prompt_specific",))


# ---------------------------------------------------------------------------------------------------------------
# tables and plots
# ---------------------------------------------------------------------------------------------------------------


def test_table_csv_and_plot(tmp_path):
    calib = _synthetic(CAL_SCALES, n=60, seed=5)
    test = _synthetic(CAL_SCALES, n=60, seed=6, id0=10_000)
    rows = evaluate_regimes(test, calib, methods=("temperature",))
    write_csv(rows, tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["shots", "method", "regime", "n_groups"] and len(lines) == 1 + len(rows)
    md = format_table(rows, ["shots", "method", "regime", "ece_after_mean", "ece_after_std"])
    assert md.splitlines()[0] == "| shots | method | regime | ece_after |" and "±" in md
    ax = plot_vs_shots(rows, "ece_after")
    assert len(ax.get_lines()) == 4  # none/none + temperature x 3 regimes
    ax.figure.savefig(tmp_path / "ece.png")
    ax2 = plot_vs_shots(summarize(test), "acc", by=None)
    assert len(ax2.get_lines()) == 1
    y = ax2.get_lines()[0].get_ydata()
    assert all(math.isclose(a, b["acc_mean"]) for a, b in zip(y, summarize(test)))
    assert (tmp_path / "ece.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no 'nope'"):
        plot_vs_shots(rows, "nope")
