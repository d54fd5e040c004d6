"""Text-classification datasets from local CSV / TSV / JSONL files."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TextDataset", "load_text_classification"]


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels.

    Attributes:
        texts: input strings.
        labels: label indices in [0, len(label_names)).
        label_names: class names, in index order.
        source: where it came from (file path) for messages.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        k = len(self.label_names)
        bad = [i for i, y in enumerate(self.labels) if not (isinstance(y, int) and 0 <= y < k)]
        if bad:
            raise ValueError(f"{self.source}: label of example {bad[0]} ({self.labels[bad[0]]!r}) not in [0, {k})")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        idx = [int(i) for i in indices]
        return TextDataset(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx), self.label_names,
                           self.source)


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; line numbers are 1-based file lines (the CSV header is line 1)."""
    suffix = path.suffix.lower()
    rows = []
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                raise ValueError(f"{path}: empty file (no header line)")
            for row in reader:
                rows.append((reader.line_num, row))
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{ln}: invalid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{ln}: expected a JSON object per line, got {type(row).__name__}")
                rows.append((ln, row))
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .csv, .tsv or .jsonl")
    return rows


def load_text_classification(path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
                             labels: Sequence[str] | None = None, limit: int | None = None) -> TextDataset:
    """Load a text-classification file.

    Args:
        path: .csv / .tsv (header row with column names) or .jsonl (one object per line).
        text_field: column / key holding the input text.
        label_field: column / key holding the label: a class name from ``labels``, or an integer index into it.
        labels: class names in index order. When None, the sorted distinct label values (as strings) are used.
        limit: keep only the first ``limit`` rows.

    Returns:
        TextDataset.

    Raises:
        FileNotFoundError: missing file.
        ValueError: unsupported type, bad JSON, a missing/empty field or an unknown label (names file:line:field).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: dataset file not found")
    rows = _read_rows(p)
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{p}: no examples")
    texts, raw = [], []
    for ln, row in rows:
        for field in (text_field, label_field):
            if field not in row or row[field] is None:
                raise ValueError(f"{p}:{ln}: missing field {field!r} (fields present: {sorted(row)})")
        t = row[text_field]
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{p}:{ln}: field {text_field!r} must be a non-empty string, got {t!r}")
        texts.append(t.strip())
        raw.append((ln, row[label_field]))
    names = tuple(str(x) for x in labels) if labels is not None else tuple(sorted({str(v) for _, v in raw}))
    if len(names) < 2:
        raise ValueError(f"{p}: need at least 2 classes, got labels {names!r}")
    index = {n: i for i, n in enumerate(names)}
    ys = []
    for ln, v in raw:
        key = str(v).strip()
        if key in index:
            ys.append(index[key])
            continue
        # integer class indices (JSON ints or digit strings) are accepted when they are not names themselves
        if isinstance(v, int) and not isinstance(v, bool) or key.lstrip("-").isdigit():
            i = int(key)
            if 0 <= i < len(names):
                ys.append(i)
                continue
        raise ValueError(f"{p}:{ln}: field {label_field!r} has unknown label {v!r}; expected one of {list(names)} "
                         f"or an index in [0, {len(names)})")
    return TextDataset(tuple(texts), tuple(ys), names, str(p))
