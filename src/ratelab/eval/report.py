"""Self-contained HTML reports: a summary of the paper claims checked, a table of contents, HTML tables and
matplotlib figures embedded as base64 PNG (no external files, no scripts).

A recipe builds one :class:`Report`; ``ratelab demo`` nests every recipe's report into one page with
:meth:`Report.include`, and the page opens with one summary row per recipe (:meth:`Report.summary`). Claim verdicts
are spelled by :func:`verdict` everywhere (HTML, terminal, README), so one word means one thing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratelab.core.checkpoint import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #bbb;padding:.25em .6em;
text-align:right;vertical-align:top}th{background:#f0f0f0}td.t,th.t{text-align:left}
caption{caption-side:top;text-align:left;color:#555;font-size:.9em;padding-bottom:.2em}
.ok{color:#0a7a2f;font-weight:600;white-space:nowrap}.bad{color:#b00020;font-weight:600;white-space:nowrap}
.tally{font-size:1.05em}nav.toc{background:#f7f7f7;border:1px solid #ddd;padding:.4em 1em;margin:1em 0}
nav.toc ul{margin:.2em 0;padding-left:1.2em}nav.toc li{margin:.1em 0}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
a.top{font-size:.8em;font-weight:normal;margin-left:.6em}
"""

NA = "n/a"
VERDICTS = {True: "holds", False: "does not hold"}


def verdict(holds: bool) -> str:
    """The one word for a claim's outcome: ``holds`` or ``does not hold`` (HTML, terminal and README alike)."""
    return VERDICTS[bool(holds)]


def fmt(v: Any, digits: int = 4) -> str:
    """Human formatting of a table cell or figure.

    Floats get ``digits`` significant digits (``0.98889 -> 0.9889``, ``7730.64 -> 7731``), large ones are rounded
    to integers with thousands separators, tiny ones use an exponent; NaN (a measure that does not apply) is
    ``n/a``; integers get thousands separators; booleans are yes/no; everything else goes through ``str``.
    """
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return NA
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 10 ** digits:
            return f"{v:,.0f}"
        if a < 1e-3:
            return f"{v:.{max(digits - 2, 1)}e}"
        return f"{v:.{digits}g}"
    try:  # numpy scalars
        import numpy as np

        if isinstance(v, np.generic):
            return fmt(v.item(), digits)
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def figure_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def slug(text: str) -> str:
    """An HTML id from a heading (lower case, alphanumerics and dashes)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "section"


@dataclass
class _Heading:
    level: int
    text: str
    anchor: str


@dataclass
class SummaryRow:
    """One recipe of a combined report's summary: its name, paper, section anchor and claim checks."""

    name: str
    paper: str
    anchor: str
    checks: list[dict[str, Any]]


class Report:
    """Accumulates sections and writes one HTML file.

    The rendered page is: title, tally of the claims checked (when there are any), a table of contents of the
    headings (when there are two or more), then the body in the order it was built.

    Example:
        >>> r = Report("CRATE on digits")
        >>> r.text("Trained for 60 epochs.")
        >>> r.table([["val acc", 0.99]], headers=["metric", "value"])
        >>> r.save("runs/demo/report.html")
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str | _Heading] = []
        self.claims: list[dict[str, Any]] = []
        self._summary: list[SummaryRow] = []
        self._anchors: set[str] = set()

    # -- building -------------------------------------------------------------------------------------------------
    def _anchor(self, text: str, anchor: str | None) -> str:
        base = anchor or slug(text)
        a, i = base, 2
        while a in self._anchors:
            a, i = f"{base}-{i}", i + 1
        self._anchors.add(a)
        return a

    def heading(self, text: str, level: int = 2, anchor: str | None = None) -> Report:
        """A section heading (level 2, or 3 for a subsection); listed in the table of contents."""
        if level not in (2, 3, 4):
            raise ValueError(f"heading level must be 2, 3 or 4 (1 is the title), got {level}")
        self._parts.append(_Heading(level, text, self._anchor(text, anchor)))
        return self

    def text(self, text: str) -> Report:
        self._parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def code(self, text: str) -> Report:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def check(self, claim: str, holds: bool, detail: str = "") -> Report:
        """One claim line: ``[holds]`` / ``[does not hold]``, the claim, and what was measured."""
        cls = "ok" if holds else "bad"
        self.claims.append({"claim": claim, "holds": bool(holds), "measured": detail})
        self._parts.append(f'<p><span class="{cls}">[{verdict(holds)}]</span> {html.escape(claim)} '
                           f"{html.escape(str(detail))}</p>")
        return self

    def checks(self, checks: Iterable[dict[str, Any]]) -> Report:
        """The claims of a recipe (dicts ``{"claim", "holds", "measured"}`` from ``ratelab.recipes.check``) as a
        table: claim, verdict, measured."""
        checks = list(checks)
        self.claims.extend(checks)
        rows = [f'<tr><td class="t">{html.escape(c["claim"])}</td>{_verdict_cell(c["holds"])}'
                f'<td class="t">{html.escape(_measured(c["measured"]))}</td></tr>' for c in checks]
        self._parts.append('<table class="claims"><tr><th class="t">claim (paper)</th><th class="t">verdict</th>'
                           '<th class="t">measured here</th></tr>' + "".join(rows) + "</table>")
        return self

    def table(self, rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None, *, digits: int = 4,
              caption: str = "") -> Report:
        """An HTML table; numbers get :func:`fmt` with ``digits`` significant digits and are right-aligned, text
        cells are left-aligned. NaN cells (a measure that does not apply) show ``n/a``."""
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(caption)}</caption>")
        if headers:
            out.append("<tr>" + "".join(f'<th{_align(i == 0)}>{html.escape(str(h))}</th>'
                                        for i, h in enumerate(headers)) + "</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td{_align(not _is_number(c))}>{html.escape(fmt(c, digits))}</td>"
                                        for c in row) + "</tr>")
        out.append("</table>")
        self._parts.append("".join(out))
        return self

    def figure(self, fig_or_png: Any, caption: str = "") -> Report:
        """Embed a matplotlib Figure, PNG bytes, or the path of a PNG file."""
        if isinstance(fig_or_png, bytes):
            png = fig_or_png
        elif isinstance(fig_or_png, (str, os.PathLike)):
            png = Path(fig_or_png).read_bytes()
        else:
            png = figure_to_png(fig_or_png)
        if png[:8] != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"Report.figure: not a PNG image ({caption or 'no caption'})")
        b64 = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        img = f'<img src="data:image/png;base64,{b64}" alt="{html.escape(caption or "figure")}">'
        self._parts.append(f"<figure>{img}{cap}</figure>")
        return self

    def raw_html(self, fragment: str) -> Report:
        """Append trusted HTML (not escaped)."""
        self._parts.append(fragment)
        return self

    def include(self, other: Report, heading: str, *, anchor: str | None = None) -> str:
        """Nest ``other`` as one section: ``heading`` at level 2, ``other``'s headings one level down, its anchors
        prefixed by this section's so they stay unique. Its claims count in this report's tally.

        Returns:
            The section's anchor (for links to it).
        """
        sec = self._anchor(heading, anchor)
        self._parts.append(_Heading(2, heading, sec))
        for part in other._parts:
            if isinstance(part, _Heading):
                self._parts.append(_Heading(min(part.level + 1, 4), part.text,
                                            self._anchor(part.text, f"{sec}--{part.anchor}")))
            else:
                self._parts.append(part)
        self.claims.extend(other.claims)
        return sec

    def summary(self, rows: Sequence[SummaryRow]) -> Report:
        """One summary row per recipe (paper, each claim with its verdict and measured figure, a link to the
        section), rendered at the top of the page above the table of contents."""
        self._summary = list(rows)
        return self

    # -- rendering ------------------------------------------------------------------------------------------------
    def body(self) -> str:
        out = []
        for part in self._parts:
            if isinstance(part, _Heading):
                t = html.escape(part.text)
                top = '<a class="top" href="#top">top</a>' if part.level == 2 else ""
                out.append(f'<h{part.level} id="{part.anchor}">{t}{top}</h{part.level}>')
            else:
                out.append(part)
        return "\n".join(out)

    def _tally(self) -> str:
        if not self.claims:
            return ""
        n_ok = sum(bool(c["holds"]) for c in self.claims)
        n = len(self.claims)
        where = f" in {_count(len(self._summary), 'recipe')}" if self._summary else ""
        return (f'<p class="tally"><b>{n_ok} of {n} claims hold{where}</b>; '
                f'<span class="bad">{n - n_ok} {"does" if n - n_ok == 1 else "do"} not hold</span>.</p>')

    def _summary_html(self) -> str:
        if not self._summary:
            return ""
        out = ['<table class="summary"><tr><th class="t">recipe</th><th class="t">paper</th>'
               '<th class="t">claim</th><th class="t">verdict</th><th class="t">measured here</th></tr>']
        for row in self._summary:
            checks = row.checks or [None]
            n_ok = sum(bool(c["holds"]) for c in row.checks)
            span = f' rowspan="{len(checks)}"' if len(checks) > 1 else ""
            head = (f'<td class="t"{span}><a href="#{row.anchor}">{html.escape(row.name)}</a><br>'
                    f'<small>{n_ok}/{len(row.checks)} hold</small></td>'
                    f'<td class="t"{span}>{html.escape(row.paper)}</td>')
            for i, c in enumerate(checks):
                cells = ('<td class="t" colspan="3">no claims checked</td>' if c is None else
                         f'<td class="t">{html.escape(c["claim"])}</td>{_verdict_cell(c["holds"])}'
                         f'<td class="t">{html.escape(_measured(c["measured"]))}</td>')
                out.append(f"<tr>{head if i == 0 else ''}{cells}</tr>")
        out.append("</table>")
        return "".join(out)

    def _toc(self) -> str:
        heads = [p for p in self._parts if isinstance(p, _Heading) and p.level <= 3]
        if len(heads) < 2:
            return ""
        out, depth = ['<nav class="toc"><b>Contents</b><ul>'], 2
        for h in heads:
            while depth < h.level:
                out.append("<ul>")
                depth += 1
            while depth > h.level:
                out.append("</ul>")
                depth -= 1
            out.append(f'<li><a href="#{h.anchor}">{html.escape(h.text)}</a></li>')
        out.append("</ul>" * (depth - 1) + "</nav>")
        return "".join(out)

    def render(self) -> str:
        return (
            f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
            f'<h1 id="top">{html.escape(self.title)}</h1>\n{self._tally()}{self._summary_html()}{self._toc()}\n'
            f"{self.body()}\n</body></html>"
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(self.render(), path)
        return path


def summary_rows_text(results_by_recipe: Mapping[str, Mapping[str, Any]], width: int = 100) -> list[str]:
    """The summary table as plain text lines (the terminal's and the README's form of :meth:`Report.summary`):
    one block per recipe with its tally, then one line per claim: verdict, claim, measured figure."""
    lines = []
    total = ok = 0
    for name, res in results_by_recipe.items():
        checks = res.get("checks", [])
        n_ok = sum(bool(c["holds"]) for c in checks)
        total, ok = total + len(checks), ok + n_ok
        lines.append(f"{name} ({n_ok}/{len(checks)} hold) - {res.get('paper', '')}")
        for c in checks:
            lines.append(f"  {verdict(c['holds']):<13}  {c['claim']} [{_measured(c['measured'])}]")
    lines.insert(0, f"{ok} of {total} claims hold in {_count(len(results_by_recipe), 'recipe')}")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _measured(m: Any) -> str:
    return fmt(m) if isinstance(m, (int, float)) else str(m)


def _verdict_cell(holds: bool) -> str:
    return f'<td class="t"><span class="{"ok" if holds else "bad"}">{verdict(holds)}</span></td>'


def _is_number(c: Any) -> bool:
    if isinstance(c, bool):
        return False
    if isinstance(c, (int, float)):
        return True
    try:
        import numpy as np

        return isinstance(c, np.number)
    except ImportError:  # pragma: no cover
        return False


def _align(text: bool) -> str:
    return ' class="t"' if text else ""


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Atomic, indented JSON write; numpy scalars and arrays are converted."""
    path = Path(path)
    atomic_write_text(json.dumps(obj, indent=2, default=_json_default), path)
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
