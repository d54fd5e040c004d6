"""Render an HTML file in a real headless Chromium and read back what the page saw.

The page is copied with a small probe script added (the report itself carries no scripts): it records script
errors and failed resource loads, and on ``load`` writes a JSON summary into the DOM, which ``--dump-dom`` prints.
Chromium comes from the system (Debian's ``chromium`` package, or ``RATELAB_CHROMIUM``); :func:`find_chromium`
returns None when there is none, and tests skip with that reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

_HEAD_PROBE = """<script>window.__probe_errors=[];
window.addEventListener('error',function(e){window.__probe_errors.push(e.message||('failed to load '+
(e.target&&(e.target.src||e.target.href))))},true);</script>"""

_TAIL_PROBE = """<script>window.addEventListener('load',function(){
var imgs=Array.prototype.slice.call(document.images);
var links=Array.prototype.slice.call(document.querySelectorAll('a[href^="#"]'));
var out={
 images:imgs.length,
 images_loaded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length,
 errors:window.__probe_errors,
 broken_links:links.filter(function(a){return !document.getElementById(a.getAttribute('href').slice(1))})
   .map(function(a){return a.getAttribute('href')}),
 summary_recipes:Array.prototype.slice.call(document.querySelectorAll('table.summary a'))
   .map(function(a){return a.textContent}),
 toc_entries:document.querySelectorAll('nav.toc a').length,
 page_height:document.documentElement.scrollHeight,
 page_width:document.documentElement.scrollWidth
};
var p=document.createElement('pre');p.id='__probe';p.textContent=JSON.stringify(out);document.body.appendChild(p);
});</script>"""


def find_chromium() -> str | None:
    for cand in (os.environ.get("RATELAB_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def render(path: str | Path, tmp_dir: str | Path, *, chromium: str | None = None,
           timeout: float = 120) -> dict[str, Any]:
    """Load ``path`` in headless Chromium (window 1200 px wide) and return the probe's findings: image count and
    how many decoded, script/resource errors, in-page links without a target, the summary table's recipe names,
    the number of table-of-contents entries and the page size in CSS pixels."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium found")
    src = Path(path).read_text(encoding="utf-8")
    if "<head>" not in src or "</body>" not in src:
        raise ValueError(f"{path}: not a full HTML page")
    probed = src.replace("<head>", "<head>" + _HEAD_PROBE, 1).replace("</body>", _TAIL_PROBE + "</body>", 1)
    page = Path(tmp_dir) / "probed.html"
    page.write_text(probed, encoding="utf-8")
    profile = Path(tmp_dir) / "chromium-profile"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--window-size=1200,900", "--virtual-time-budget=20000", "--dump-dom",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        raise AssertionError(f"Chromium did not finish loading {path} (rc {proc.returncode}); stderr tail:\n"
                             f"{proc.stderr[-2000:]}")
    import html

    return json.loads(html.unescape(m.group(1)))
