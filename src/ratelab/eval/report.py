"""Self-contained HTML reports: text, tables and matplotlib figures embedded as base64 PNG (no external files)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ratelab.core.checkpoint import atomic_write_text

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
.ok{color:#0a7a2f;font-weight:600}.bad{color:#b00020;font-weight:600}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
"""


def fmt(v: Any, digits: int = 4) -> str:
    """Compact human formatting of numbers; everything else through ``str``."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e5 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def figure_to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


class Report:
    """Accumulates sections and writes one HTML file.

    Example:
        >>> r = Report("CRATE on digits")
        >>> r.text("Trained for 60 epochs.")
        >>> r.table([["val acc", 0.99]], headers=["metric", "value"])
        >>> r.save("runs/demo/report.html")
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._parts: list[str] = []

    def heading(self, text: str, level: int = 2) -> Report:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str) -> Report:
        self._parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def code(self, text: str) -> Report:
        self._parts.append(f"<pre>{html.escape(text)}</pre>")
        return self

    def check(self, claim: str, holds: bool, detail: str = "") -> Report:
        cls, word = ("ok", "holds") if holds else ("bad", "does not hold")
        self._parts.append(f'<p><span class="{cls}">[{word}]</span> {html.escape(claim)} {html.escape(detail)}</p>')
        return self

    def checks(self, checks: Iterable[dict[str, Any]]) -> Report:
        """One :meth:`check` line per claim dict ``{"claim", "holds", "measured"}`` (``ratelab.recipes.check``)."""
        for c in checks:
            self.check(c["claim"], c["holds"], f"({c['measured']})")
        return self

    def table(self, rows: Iterable[Sequence[Any]], headers: Sequence[str] | None = None) -> Report:
        out = ["<table>"]
        if headers:
            out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>")
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
        b64 = base64.b64encode(png).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        img = f'<img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}">'
        self._parts.append(f"<figure>{img}{cap}</figure>")
        return self

    def raw_html(self, fragment: str) -> Report:
        """Append trusted HTML produced by another Report (used to merge recipe reports)."""
        self._parts.append(fragment)
        return self

    def body(self) -> str:
        return "\n".join(self._parts)

    def render(self) -> str:
        return (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>\n{self.body()}\n</body></html>"
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(self.render(), path)
        return path


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
