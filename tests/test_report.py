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
    assert fmt(True) == "yes"
    assert fmt(float("nan")) == "nan"
    assert fmt(3) == "3"


def test_checks_renders_each_recipe_claim():
    from ratelab.recipes import check

    r = Report("t").checks([check("a & b", True, 0.5), check("c", False, "x < y")])
    body = r.body()
    assert '<span class="ok">[holds]</span> a &amp; b (0.5)' in body
    assert '<span class="bad">[does not hold]</span> c (x &lt; y)' in body
