"""Smoke run of the ``wrong-line`` recipe (synthetic part + the digits variant) through the recipe registry."""

import json
import math

import pytest

import ratelab.recipes.wrong_line.recipe  # noqa: F401  (registers the recipe)
from ratelab.analysis.accuracy_line import fit_line
from ratelab.recipes import run_recipe
from ratelab.recipes.wrong_line.recipe import DIGITS_CLIP


def test_wrong_line_smoke(tmp_path):
    res = run_recipe("wrong-line", tmp_path, smoke=True, progress=False, device="cpu")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["recipe"] == "wrong-line" and saved["smoke"] is True
    for key in ("corr_clean", "corr_noisy", "corr_digits_clean", "corr_digits_noisy"):
        v, (lo, hi) = saved[key], saved[key + "_ci"]
        assert math.isfinite(v) and lo <= v <= hi, key
        assert saved["summary"][key] == v
    # Even the smoke sizes of the synthetic model (3 curves, 6 sizes) show the two regimes of note §2.2.
    assert saved["corr_clean"] > 0.9
    assert saved["corr_noisy"] < -0.5 and saved["corr_noisy_ci"][1] < 0
    syn = saved["synthetic"]
    assert set(syn["by_noise"]) == {"0.0", "0.05", "0.2"}
    assert syn["exact_check"]["bound_holds_all"] and syn["exact_check"]["max_abs_diff_ood"] < 5e-3
    assert min(v["r_mean"] for v in syn["literal"].values()) > 0.9
    assert syn["s_sweep"]["1.0"]["r_mean"] > 0.99  # s = 1: no shift, OOD = ID
    # The digits correlations are the probit fits of the rows the digits sweep returned.
    for cond in ("clean", "noisy"):
        rows = saved["digits"][cond]
        assert len(rows) >= 3 and all({"model", "id_acc", "ood_acc"} <= set(r) for r in rows)
        f = fit_line([r["id_acc"] for r in rows], [r["ood_acc"] for r in rows], n_boot=0, clip=DIGITS_CLIP)
        assert saved[f"corr_digits_{cond}"] == pytest.approx(f.pearson, abs=1e-12)
    claims = [c["claim"] for c in saved["checks"]]
    assert len(claims) == 8 and all(isinstance(c["holds"], bool) for c in saved["checks"])
    for name in ("scatter.png", "dataset_size.png", "r_vs_shift.png", "digits_scatter.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 1000, name
    assert res.results["summary"]["synthetic_time_s"] < 10
