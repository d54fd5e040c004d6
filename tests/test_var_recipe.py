"""Recipe ``var`` (tokenizer + VAR + M-VAR at equal depth) at smoke scale, and its measurement helpers.

The smoke run is shared through tests/_recipe_fixtures.smoke_run, as for the other recipes.
"""

from __future__ import annotations

import math

import pytest
import torch
from _recipe_fixtures import smoke_run

from ratelab.recipes.var.measure import (
    fd_difference,
    grid_figure,
    loss_difference,
    quartiles,
    ratio_summary,
    time_interleaved,
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run = smoke_run("var", tmp_path_factory)
    return run.out_dir, run.saved


def test_smoke_run_reports_every_measure(smoke):
    out, r = smoke
    s = r["summary"]
    assert r["recipe"] == "var" and r["scale"] == "smoke" and r["threads"] == 1
    assert r["scale_settings"]["patch_nums"] == [1, 2, 3, 4] and r["scale_settings"]["dataset"] == "digits"
    for key in ("tokenizer held-out MSE", "tokenizer held-out PSNR dB", "tokenizer codes used",
                "classifier accuracy real", "offline FD VAR", "offline FD M-VAR", "offline class accuracy VAR",
                "offline class accuracy M-VAR", "speed VAR/M-VAR", "speed re-scan/state carry", "process cpu_s"):
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert len(s["tokenizer codes used per scale"]) == 4
    assert 0 < s["tokenizer codes used"] <= 1 and 0 <= s["offline class accuracy VAR"] <= 1
    # the PSNR is the MSE's, on [0, 1] images
    assert s["tokenizer held-out PSNR dB"] == pytest.approx(-10 * math.log10(s["tokenizer held-out MSE"]), rel=1e-5)
    assert s["params M-VAR"] > s["params VAR"]  # M-VAR adds a Mamba-2 mixer per block
    assert [c["claim"][:20] for c in r["checks"]] and len(r["checks"]) == 7
    assert all(set(c) == {"claim", "holds", "measured"} and isinstance(c["holds"], bool) for c in r["checks"])
    for fam in ("var", "mvar"):
        assert len(r["runs"][fam]) == 1 and r["runs"][fam][0]["seed"] == 0
    # three samplers, timed interleaved, each repeat recorded; state carry reproduces the re-scan's tokens
    assert set(r["sampling_seconds"]) == {"VAR (KV cache)", "M-VAR (state carry)", "M-VAR (re-scan)"}
    assert all(len(v) == r["scale_settings"]["time_repeats"] for v in r["sampling_seconds"].values())
    assert r["state_carry_equals_rescan"]["same_tokens"] is True
    assert r["state_carry_equals_rescan"]["logits_max_diff"] < 1e-3
    assert r["mamba_token_steps"] == {"state_carry": 30, "rescan": 1 + 5 + 14 + 30}
    assert "not comparable with published FID" in r["offline_note"]


def test_smoke_run_writes_figures_and_report(smoke):
    out, _ = smoke
    assert (out / "samples.png").stat().st_size > 0 and (out / "reconstructions.png").stat().st_size > 0
    html = (out / "report.html").read_text()
    assert "not comparable with published FID" in html and "M-VAR (state carry)" in html
    assert html.count("<img") >= 2


# ---- measurement helpers ----------------------------------------------------------------------------------------


def test_fd_difference_separates_a_shifted_arm_and_not_two_draws_of_one():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g)
    same = [torch.randn(300, 6, generator=g) for _ in range(2)]
    other = [torch.randn(300, 6, generator=g) for _ in range(2)]
    shifted = [torch.randn(300, 6, generator=g) + 0.8 for _ in range(2)]
    close = fd_difference(real, same, shifted, n_boot=30)
    assert close["better"] and close["diff"] < 0 and len(close["fd_a"]) == 2
    assert not fd_difference(real, shifted, same, n_boot=30)["better"]  # the direction matters
    tie = fd_difference(real, same, other, n_boot=30)
    assert not tie["separated"] and tie["two_se"] > 0
    with pytest.raises(ValueError):
        fd_difference(real, same, shifted[:1])


def test_loss_difference_needs_two_seeds_for_an_interval():
    d = loss_difference([1.80, 1.82], [2.00, 2.03])
    assert d["better"] and d["diff"] == pytest.approx(-0.205) and d["two_se"] > 0
    assert not loss_difference([1.8, 2.2], [2.0, 2.01])["separated"]  # the spread over seeds covers it
    one = loss_difference([1.0], [2.0])
    assert math.isnan(one["two_se"]) and not one["better"]


def test_time_interleaved_rotates_the_order_and_ratio_summary_reads_the_spread():
    calls: list[str] = []
    out = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then rotated by one per repeat
    assert all(len(v) == 3 and min(v) >= 0 for v in out.values())
    assert ratio_summary([2.0, 2.2, 1.8], [1.0, 1.0, 1.0])["beyond_spread"]
    mixed = ratio_summary([0.8, 1.3, 0.9, 1.4], [1.0, 1.0, 1.0, 1.0])
    assert not mixed["beyond_spread"] and mixed["q1"] < 1 < mixed["q3"]
    assert quartiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeats=0)


@pytest.mark.parametrize("ch", [1, 3])
def test_grid_figure_one_panel_per_model(ch):
    fig = grid_figure({"VAR": torch.rand(3, 4, ch, 8, 8), "M-VAR": torch.rand(3, 4, ch, 8, 8)},
                      row_names=["a", "b", "c"], title="t")
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["VAR", "M-VAR"]
    img = fig.axes[0].get_images()[0].get_array()
    assert img.shape[:2] == (3 * 9 - 1, 4 * 9 - 1)
