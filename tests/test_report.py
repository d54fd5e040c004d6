import base64
import json
import re

import numpy as np
from matplotlib.figure import Figure

from ratelab.eval.report import Report, fmt, write_json


def test_report_is_self_contained(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    r = Report("t <title>")
    r.text("a & b").table([["x", 0.5], ["y", 2]], headers=["k", "v"]).figure(fig, "cap").check("claim", False, "d")
    path = r.save(tmp_path / "r.html")
    html = path.read_text()
    assert "t &lt;title&gt;" in html and "a &amp; b" in html
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == 1 and base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "does not hold" in html
    assert "http" not in html  # nothing fetched from outside


def test_write_json_numpy(tmp_path):
    p = write_json({"a": np.float32(1.5), "b": np.arange(3)}, tmp_path / "x.json")
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [0, 1, 2]}


def test_fmt():
    assert fmt(0.98765) == "0.9877"
    assert fmt(7730.6413) == "7731"  # significant digits, not decimals
    assert fmt(123456.7) == "123,457" and fmt(70350) == "70,350"
    assert fmt(0.0001234) == "1.23e-04" and fmt(0.0) == "0"
    assert fmt(True) == "yes"
    assert fmt(float("nan")) == "n/a"  # a measure that does not apply
    assert fmt(3) == "3"
    assert fmt(np.float32(0.5)) == "0.5"


def test_checks_renders_each_recipe_claim():
    from ratelab.recipes import check

    r = Report("t").checks([check("a & b", True, 0.5), check("c", False, "x < y")])
    body = r.body()
    assert '<td class="t">a &amp; b</td><td class="t"><span class="ok">holds</span></td><td class="t">0.5</td>' in body
    assert '<span class="bad">does not hold</span></td><td class="t">x &lt; y</td>' in body
    page = r.render()
    assert "1 of 2 claims hold" in page  # the tally opens the page


def test_table_alignment_and_precision():
    body = Report("t").table([["vit", 7730.6413, float("nan")]], headers=["model", "img/s", "R^c"]).body()
    assert '<td class="t">vit</td><td>7731</td><td>n/a</td>' in body


def test_include_nests_sections_with_unique_anchors_and_a_toc():
    from ratelab.eval.report import SummaryRow
    from ratelab.recipes import check

    inner = Report("inner").heading("Claims").checks([check("c1", True, 1.0)]).heading("Figures")
    outer = Report("outer")
    a = outer.include(inner, "alpha — paper A", anchor="alpha")
    b = outer.include(inner, "beta — paper B", anchor="beta")
    outer.summary([SummaryRow("alpha", "paper A", a, inner.claims), SummaryRow("beta", "paper B", b, inner.claims)])
    page = outer.render()
    ids = re.findall(r'id="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # unique anchors although both sections have "Claims"
    assert 'id="alpha--claims"' in page and 'id="beta--claims"' in page and "<h3" in page
    assert page.count('<a href="#alpha--claims">') == 1  # in the table of contents
    assert "2 of 2 claims hold in 2 recipes" in page
    assert re.search(r'<td class="t"><a href="#alpha">alpha</a><br><small>1/1 hold</small></td>', page)


def test_verdict_words_match_terminal_and_html(capsys):
    from ratelab.cli.reproduce import print_claims
    from ratelab.eval.report import VERDICTS
    from ratelab.recipes import check

    print_claims({"r": {"paper": "p", "checks": [check("c1", True, 1), check("c2", False, "m")]}})
    out = capsys.readouterr().out
    assert "Summary: 1 of 2 claims hold in 1 recipe" in out
    assert f"{VERDICTS[True]:<13}  c1 [1]" in out and f"{VERDICTS[False]:<13}  c2 [m]" in out
