"""Plots of ICL accuracy / calibration against the number of shots (matplotlib, no pyplot: safe under Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["plot_vs_shots"]


def plot_vs_shots(rows: Sequence[dict], metric: str, ax: Any = None, by: str | Sequence[str] | None = ("method",
                  "regime"), label: str | None = None, band: bool = True) -> Any:
    """Plot ``<metric>_mean`` (± ``<metric>_std`` as a band) against shots, one line per ``by`` key.

    Works on the rows of :func:`ratelab.icl.recalibration.summarize` (``metric="acc"`` / ``"ece"``, ``by=None``) and
    of :func:`~ratelab.icl.recalibration.evaluate_regimes` (``metric="ece_after"`` etc., ``by=("method", "regime")``).
    Keys named in ``by`` that the rows lack are ignored.

    Args:
        rows: table rows with a ``shots`` key.
        metric: metric stem; the rows must have ``<metric>_mean`` (or ``<metric>`` itself).
        ax: matplotlib Axes; a new Figure (not registered with pyplot) is made when None.
        by: key(s) whose distinct values get separate lines.
        label: legend label prefix (e.g. the model name).
        band: shade mean ± std.

    Returns:
        The Axes.
    """
    if not rows:
        raise ValueError("plot_vs_shots: no rows")
    mean_key = f"{metric}_mean" if f"{metric}_mean" in rows[0] else metric
    if mean_key not in rows[0] or "shots" not in rows[0]:
        raise ValueError(f"plot_vs_shots: rows have no {metric!r} (or {metric + '_mean'!r}) / 'shots' column; "
                         f"columns: {sorted(rows[0])}")
    std_key = f"{metric}_std"
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(4.5, 3.2)).add_subplot(111)
    keys = [by] if isinstance(by, str) else list(by or ())
    keys = [k for k in keys if k in rows[0]]
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        lines.setdefault(tuple(r[k] for k in keys), []).append(r)
    for key, rs in lines.items():
        rs = sorted(rs, key=lambda r: r["shots"])
        x = [r["shots"] for r in rs]
        y = [r[mean_key] for r in rs]
        name = "/".join(str(k) for k in key)
        if label:
            name = f"{label} {name}".strip()
        (ln,) = ax.plot(x, y, marker="o", label=name or None)
        if band and std_key in rs[0]:
            s = [r[std_key] for r in rs]
            ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], color=ln.get_color(),
                            alpha=0.15, linewidth=0)
    shots = sorted({r["shots"] for r in rows})
    ax.set_xticks(shots)
    ax.set_xlabel("shots (demonstrations in the prompt)")
    ax.set_ylabel(metric)
    if any(k for k in lines) or label:
        ax.legend(fontsize=7)
    return ax
