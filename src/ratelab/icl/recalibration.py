"""Accuracy / ECE vs shots and the three recalibration regimes of the ICL-calibration study (trust.md §3.5).

A calibrator (temperature scaling or Kumar et al. scaling-binning, from :mod:`ratelab.analysis.calibration`) is fitted
on *calibration* records (held-out query examples, example ids disjoint from the test records) and applied to the
test records of one (shots, prompt_id) group. The regimes differ only in which calibration rows it is fitted on:

* ``zero_shot``: every calibration row with ``shots == 0`` (one calibrator for all test groups);
* ``shot_specific``: rows with the test group's ``shots`` but *other* demonstration sets (``prompt_id`` != the
  group's), i.e. "same k, random demonstrations";
* ``prompt_specific``: rows with the test group's exact (shots, prompt_id), i.e. the demonstrations used at test time.

At ``shots == 0`` there are no demonstrations, so every prompt is the same prompt and all three regimes fit on all
0-shot calibration rows.

ECE follows the paper's convention throughout: top-label, 10 equal-width bins, (l, u] edges
(``ece(..., binning="width", edges="right")``). Calibrators are fitted on the restricted label logits when the records
carry them, else on log-probabilities (identical after the softmax, see :meth:`ICLRecords.scores`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ratelab.analysis.calibration import ScalingBinning, TemperatureScaling, ece
from ratelab.icl.records import ICLRecords

__all__ = [
    "METHODS",
    "REGIMES",
    "evaluate_groups",
    "evaluate_regimes",
    "fit_rows",
    "format_table",
    "make_calibrator",
    "summarize",
    "write_csv",
]

METHODS = ("temperature", "scaling_binning")
REGIMES = ("zero_shot", "shot_specific", "prompt_specific")


def make_calibrator(method: str, n_bins: int = 10) -> Any:
    """A fresh calibrator taking (n, K) logits: "temperature" or "scaling_binning" (``n_bins`` equal-mass bins)."""
    if method == "temperature":
        return TemperatureScaling(inputs="logits")
    if method == "scaling_binning":
        return ScalingBinning(n_bins=n_bins, inputs="logits")
    raise ValueError(f"methods: unknown recalibration method {method!r}; expected one of {METHODS}")


def fit_rows(calib: ICLRecords, regime: str, shots: int, prompt_id: int) -> torch.Tensor:
    """(n_calib,) boolean mask of the calibration rows a ``regime`` fits on for the test group (shots, prompt_id).

    Raises:
        ValueError: unknown regime, or no calibration row qualifies (the message names shots / prompt_id).
    """
    if regime not in REGIMES:
        raise ValueError(f"regimes: unknown regime {regime!r}; expected one of {REGIMES}")
    if regime == "zero_shot" or shots == 0:
        mask = calib.shots == 0
        what = "shots == 0"
    elif regime == "shot_specific":
        mask = (calib.shots == shots) & (calib.prompt_id != prompt_id)
        what = f"shots == {shots} and prompt_id != {prompt_id}"
    else:
        mask = (calib.shots == shots) & (calib.prompt_id == prompt_id)
        what = f"shots == {shots} and prompt_id == {prompt_id}"
    if not bool(mask.any()):
        avail = sorted({(int(s), int(p)) for s, p in zip(calib.shots.tolist(), calib.prompt_id.tolist())})
        raise ValueError(f"regime {regime!r} for the test group (shots={shots}, prompt_id={prompt_id}): no calibration "
                         f"rows with {what}; calibration (shots, prompt_id) groups present: {avail}")
    return mask


def _groups(rec: ICLRecords) -> list[tuple[int, int]]:
    return sorted({(int(s), int(p)) for s, p in zip(rec.shots.tolist(), rec.prompt_id.tolist())})


def _acc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).to(torch.float64).mean())


def _ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    return ece(probs, labels, n_bins=n_bins, binning="width", edges="right")


def _check_inputs(test: ICLRecords, calib: ICLRecords, methods: Sequence[str], regimes: Sequence[str]) -> None:
    if not isinstance(test, ICLRecords) or not isinstance(calib, ICLRecords):
        raise TypeError("test and calib must be ICLRecords")
    if len(test) == 0:
        raise ValueError("test: no records")
    if len(calib) == 0:
        raise ValueError("calib: no records (the regimes need held-out calibration queries)")
    if test.num_classes != calib.num_classes:
        raise ValueError(f"test has K={test.num_classes} label words but calib has K={calib.num_classes}")
    for m in methods:
        make_calibrator(m)
    for r in regimes:
        if r not in REGIMES:
            raise ValueError(f"regimes: unknown regime {r!r}; expected one of {REGIMES}")
    shared = np.intersect1d(test.example_id.numpy(), calib.example_id.numpy())
    if shared.size:
        raise ValueError(f"calib and test share {shared.size} example_id(s) (e.g. {shared[:5].tolist()}): calibrators "
                         "must be fitted on held-out query examples")


def evaluate_groups(test: ICLRecords, calib: ICLRecords, *, methods: Sequence[str] = METHODS,
                    regimes: Sequence[str] = REGIMES, n_bins: int = 10) -> list[dict]:
    """Per-(shots, prompt_id) test group: accuracy and ECE before and after each (method, regime).

    Returns:
        One dict per (shots, prompt_id, method, regime) with keys shots, prompt_id, method, regime, n (test rows),
        n_fit (calibration rows fitted on), acc_before, acc_after, ece_before, ece_after, and, for temperature
        scaling, the fitted ``temperature`` (NaN otherwise).
    """
    _check_inputs(test, calib, methods, regimes)
    scores = calib.scores()
    fitted: dict[tuple, Any] = {}
    out = []
    for s, p in _groups(test):
        g = test.subset((test.shots == s) & (test.prompt_id == p))
        acc0, ece0 = _acc(g.probs, g.labels), _ece(g.probs, g.labels, n_bins)
        for regime in regimes:
            mask = fit_rows(calib, regime, s, p)
            # zero-shot (and every regime at 0 shots) fits on the same rows for every group: fit once.
            key_rows = ("zs",) if (regime == "zero_shot" or s == 0) else (regime, s, p)
            for method in methods:
                key = (method, *key_rows)
                if key not in fitted:
                    cal = make_calibrator(method, n_bins)
                    try:
                        cal.fit(scores[mask], calib.labels[mask])
                    except ValueError as e:
                        raise ValueError(f"fitting {method} for regime {regime!r} on the test group (shots={s}, "
                                         f"prompt_id={p}) with {int(mask.sum())} calibration rows failed: {e}") from e
                    fitted[key] = cal
                cal = fitted[key]
                q = cal.transform(g.scores())
                out.append({
                    "shots": s, "prompt_id": p, "method": method, "regime": regime, "n": len(g),
                    "n_fit": int(mask.sum()), "acc_before": acc0, "acc_after": _acc(q, g.labels),
                    "ece_before": ece0, "ece_after": _ece(q, g.labels, n_bins),
                    "temperature": float(cal.temperature) if method == "temperature" else math.nan,
                })
    return out


def _mean_std(v: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(v, dtype=np.float64)
    # sample std over demonstration sets (the paper's band over seeds); a single group has no spread.
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def evaluate_regimes(test: ICLRecords, calib: ICLRecords, *, methods: Sequence[str] = METHODS,
                     regimes: Sequence[str] = REGIMES, n_bins: int = 10) -> list[dict]:
    """Recalibration table: one row per (shots, method, regime), averaged over the test groups' prompt_ids.

    Args:
        test: test records.
        calib: calibration records (held-out queries; example ids disjoint from ``test``; (shots, prompt_id) groups
            with the same demonstrations as the test groups for the prompt-specific regime).
        methods: subset of ("temperature", "scaling_binning").
        regimes: subset of ("zero_shot", "shot_specific", "prompt_specific").
        n_bins: ECE bins (equal-width, (l, u]) and scaling-binning bins (equal-mass).

    Returns:
        Rows (dicts) sorted by shots. For each shots value, first a ``method="none", regime="none"`` row (the
        uncalibrated model), then one row per (method, regime). Keys: shots, method, regime, n_groups, n (mean test
        rows per group), n_fit (mean calibration rows fitted on), and ``<m>_mean`` / ``<m>_std`` over prompt_ids for
        m in acc_before, acc_after, ece_before, ece_after.

    Raises:
        ValueError: bad inputs, shared example ids, or a regime with no fitting rows (names shots / prompt_id).
    """
    per = evaluate_groups(test, calib, methods=methods, regimes=regimes, n_bins=n_bins)
    metrics = ("acc_before", "acc_after", "ece_before", "ece_after")
    rows = []
    for s in sorted({r["shots"] for r in per}):
        at = [r for r in per if r["shots"] == s]
        # the uncalibrated row: one value per group (the before-columns repeat for every method/regime)
        first = {}
        for r in at:
            first.setdefault(r["prompt_id"], r)
        base = list(first.values())
        row = {"shots": s, "method": "none", "regime": "none", "n_groups": len(base),
               "n": float(np.mean([r["n"] for r in base])), "n_fit": 0.0}
        for m in metrics:
            src = "acc_before" if m.startswith("acc") else "ece_before"
            row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([r[src] for r in base])
        rows.append(row)
        for method in methods:
            for regime in regimes:
                sel = [r for r in at if r["method"] == method and r["regime"] == regime]
                row = {"shots": s, "method": method, "regime": regime, "n_groups": len(sel),
                       "n": float(np.mean([r["n"] for r in sel])), "n_fit": float(np.mean([r["n_fit"] for r in sel]))}
                for m in metrics:
                    row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([r[m] for r in sel])
                rows.append(row)
    return rows


def summarize(records: ICLRecords, n_bins: int = 10) -> list[dict]:
    """Accuracy and ECE vs shots, averaged over demonstration sets.

    Returns:
        One row per shots value: shots, n_groups (prompt_ids), n (rows), acc_mean, acc_std, ece_mean, ece_std
        (over prompt_ids; ECE computed per group, 10 equal-width (l, u] bins by default), conf_mean (mean top-label
        confidence over all rows of that shots value).
    """
    if len(records) == 0:
        raise ValueError("records: no rows to summarize")
    rows = []
    for s in sorted(set(records.shots.tolist())):
        at = records.subset(records.shots == s)
        accs, eces = [], []
        pids = sorted(set(at.prompt_id.tolist()))
        for p in pids:
            g = at.subset(at.prompt_id == p)
            accs.append(_acc(g.probs, g.labels))
            eces.append(_ece(g.probs, g.labels, n_bins))
        acc_m, acc_s = _mean_std(accs)
        ece_m, ece_s = _mean_std(eces)
        rows.append({"shots": int(s), "n_groups": len(pids), "n": len(at), "acc_mean": acc_m, "acc_std": acc_s,
                     "ece_mean": ece_m, "ece_std": ece_s, "conf_mean": float(at.probs.max(1).values.mean())})
    return rows


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Write rows (dicts) as a tidy CSV, columns in first-seen order; written atomically."""
    from ratelab.core.checkpoint import atomic_write_text

    if not rows:
        raise ValueError(f"write_csv: no rows to write to {os.fspath(path)}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(buf.getvalue(), path)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Markdown table of ``rows`` (``*_mean`` with a matching ``*_std`` column is shown as "mean ± std")."""
    if not rows:
        return ""
    cols = list(columns) if columns is not None else _columns(rows)
    shown = [c for c in cols if not (c.endswith("_std") and c[:-4] + "_mean" in cols)]

    def cell(r: dict, c: str) -> str:
        v = r.get(c, "")
        if c.endswith("_mean") and c[:-5] + "_std" in cols:
            return f"{v:.{digits}f} ± {r.get(c[:-5] + '_std', math.nan):.{digits}f}"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    head = [c[:-5] if c.endswith("_mean") and c[:-5] + "_std" in cols else c for c in shown]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r, c) for c in shown) + " |" for r in rows]
    return "\n".join(lines)
