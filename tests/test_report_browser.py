"""The report renders in a real browser: every image decodes, no script or load errors, every in-page link has a
target, the summary lists every recipe. Skipped (with the reason) where no Chromium is installed; install Debian's
``chromium`` package (or set RATELAB_CHROMIUM) to run it."""

from __future__ import annotations

import pytest
from _browser import find_chromium, render
from matplotlib.figure import Figure

from ratelab.eval.report import Report, SummaryRow
from ratelab.recipes import check

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt install chromium, or set "
                                                            "RATELAB_CHROMIUM to a Chromium/Chrome binary)")


def _combined(tmp_path, broken_image: bool = False):
    combined = Report("demo")
    rows = []
    for name in ("alpha", "beta"):
        r = Report(name)
        r.heading("Claims")
        checks = [check(f"{name} claim 1", True, 0.5), check(f"{name} claim 2", False, "x < y")]
        r.checks(checks)
        r.heading("Figures")
        fig = Figure()
        fig.subplots().plot([0, 1], [1, 0])
        r.figure(fig, f"{name} figure")
        anchor = combined.include(r, f"{name} — paper", anchor=name)
        rows.append(SummaryRow(name, "paper", anchor, checks))
    combined.summary(rows)
    if broken_image:
        combined.raw_html('<img src="data:image/png;base64,AAAA" alt="broken">')
    return combined.save(tmp_path / "report.html")


@needs_chromium
def test_combined_report_renders(tmp_path):
    seen = render(_combined(tmp_path), tmp_path)
    assert seen["images"] == seen["images_loaded"] == 2
    assert seen["errors"] == [] and seen["broken_links"] == []
    assert seen["summary_recipes"] == ["alpha", "beta"]
    assert seen["toc_entries"] == 6  # two sections with two subsections each
    assert seen["page_width"] <= 1200  # nothing forces horizontal scrolling


@needs_chromium
def test_probe_sees_a_broken_image(tmp_path):
    """The check can fail: an image that does not decode is counted as not loaded."""
    seen = render(_combined(tmp_path, broken_image=True), tmp_path)
    assert seen["images"] == 3 and seen["images_loaded"] == 2
