"""Smoke run of the ``wrong-line`` recipe (synthetic part + the digits variant) through the recipe registry."""

import math

import pytest
from _recipe_fixtures import smoke_run

from ratelab.analysis.accuracy_line import fit_line
from ratelab.analysis.wrong_line import WrongLineConfig
from ratelab.recipes.wrong_line.recipe import DIGITS_CLIP, SCALES, settings


@pytest.mark.slow  # runs a whole recipe or trains networks (seconds, not milliseconds)
def test_wrong_line_smoke(tmp_path_factory):
    run = smoke_run("wrong-line", tmp_path_factory)
    saved, out = run.saved, run.out_dir
    assert saved["recipe"] == "wrong-line" and saved["scale"] == "smoke"
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
    # Each claim of the paper and of the note is checked once, with what was measured.
    claims = [c["claim"] for c in saved["checks"]]
    for topic in ("clean labels: accuracy on the line", "accuracy on the wrong line", "more data does not fix OOD",
                  "literal reading", "lower bound", "reduction matches the exact", "digits: the noisy sweep",
                  "digits with label noise"):
        assert sum(topic in c for c in claims) == 1, topic
    assert all(isinstance(c["holds"], bool) and c["measured"] for c in saved["checks"])
    # The smoke synthetic part's claims hold (the digits ones are meaningless at smoke size).
    assert all(c["holds"] for c in saved["checks"] if not c["claim"].startswith("digits"))
    for name in ("scatter.png", "dataset_size.png", "r_vs_shift.png", "digits_scatter.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert saved["digits"]["meta"]["mode"] == "smoke"


def test_settings_follow_the_scale_table():
    """settings() builds the synthetic configurations from the scale row (the grids only at full scale)."""
    for name, row in SCALES.items():
        st = settings(name)
        assert st["main"].mode == "reduced" and st["main"].sizes == row.main_sizes
        assert st["main"].n_seeds == row.main_seeds and st["exact"].mode == "exact"
        assert st["exact"].sizes == row.exact_sizes and st["exact"].noise_rates == row.exact_noise_rates
        assert st["long"].noise_rates == (0.2,) and st["long"].n_seeds == row.long_seeds
        assert st["literal"].n_seeds == row.literal_seeds and st["n_boot"] == row.n_boot
        assert ("eta_grid" in st) == row.grids == (name == "full")
    # quick and full run the note's §4 main sweep (its defaults: 20 curves of 12 sizes per η).
    note = WrongLineConfig()
    for name in ("quick", "full"):
        assert SCALES[name].main_sizes == note.sizes and SCALES[name].main_seeds == note.n_seeds
