"""Per-query records of an in-context-learning (ICL) evaluation, the exchange format of :mod:`ratelab.icl`.

A record row is one (query example, number of shots, demonstration set). Both the Hugging Face harness
(:func:`ratelab.icl.harness.run_icl`) and the synthetic in-context learner of the recipes produce them, and
:mod:`ratelab.icl.recalibration` consumes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

__all__ = ["ICLRecords"]

_SUM_TOL = 1e-4  # rows come from a float32 softmax in most producers


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise ValueError(f"ICLRecords.{name}: cannot convert {type(x).__name__} to a tensor ({e})") from e


def _int_field(x: Any, name: str, n: int) -> torch.Tensor:
    t = _tensor(x, name)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"ICLRecords.{name}: expected shape ({n},) to match probs, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"ICLRecords.{name}: expected integers, got dtype {t.dtype}")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or not torch.equal(t, t.round()):
            raise ValueError(f"ICLRecords.{name}: expected integers, got non-integer values")
    return t.to(torch.int64)


@dataclass
class ICLRecords:
    """One row per (test example, shots, demonstration set).

    Attributes:
        probs: (n, K) float64 label probabilities restricted to the K label words and renormalized.
        labels: (n,) int64 gold labels in [0, K).
        shots: (n,) int64 number of demonstrations in the prompt (>= 0).
        prompt_id: (n,) int64 id of the demonstration set; rows with equal (shots, prompt_id) share the same
            demonstrations (also across the test and calibration records of one run).
        example_id: (n,) int64 id of the query example (pairing / splitting; test and calibration ids are disjoint).
        logits: optional (n, K) restricted label scores before renormalization (log-probabilities up to a per-row
            constant); ``softmax(logits)`` must equal ``probs``.

    Inputs may be tensors, numpy arrays or lists; they are converted to the dtypes above. Zero rows are allowed
    (probs of shape (0, K)), so a run without calibration queries still has a typed record set.
    """

    probs: torch.Tensor
    labels: torch.Tensor
    shots: torch.Tensor
    prompt_id: torch.Tensor
    example_id: torch.Tensor
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        p = _tensor(self.probs, "probs")
        if p.ndim != 2 or p.shape[1] < 2:
            raise ValueError(f"ICLRecords.probs: expected shape (n, K) with K >= 2, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"ICLRecords.probs: expected floating point probabilities, got dtype {p.dtype}")
        p = p.to(torch.float64)
        n, k = p.shape
        if n:
            if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
                raise ValueError("ICLRecords.probs: probabilities must be finite and lie in [0, 1]")
            dev = float((p.sum(1) - 1).abs().max())
            if dev > _SUM_TOL:
                raise ValueError(f"ICLRecords.probs: rows must sum to 1 over the K label words (max deviation "
                                 f"{dev:.3g}); renormalize over the label words first")
        self.probs = p
        self.labels = _int_field(self.labels, "labels", n)
        if n and (self.labels.min() < 0 or self.labels.max() >= k):
            raise ValueError(f"ICLRecords.labels: must lie in [0, {k}), got range "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")
        self.shots = _int_field(self.shots, "shots", n)
        if n and self.shots.min() < 0:
            raise ValueError(f"ICLRecords.shots: must be >= 0, got {int(self.shots.min())}")
        self.prompt_id = _int_field(self.prompt_id, "prompt_id", n)
        self.example_id = _int_field(self.example_id, "example_id", n)
        if self.logits is not None:
            z = _tensor(self.logits, "logits")
            if tuple(z.shape) != (n, k):
                raise ValueError(f"ICLRecords.logits: expected shape {(n, k)} to match probs, got {tuple(z.shape)}")
            if not z.is_floating_point():
                raise ValueError(f"ICLRecords.logits: expected floating point scores, got dtype {z.dtype}")
            z = z.to(torch.float64)
            if n and not torch.isfinite(z).all():
                raise ValueError("ICLRecords.logits: contains NaN or inf")
            self.logits = z

    # ------------------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """K, the number of label words."""
        return int(self.probs.shape[1])

    def __len__(self) -> int:
        return int(self.probs.shape[0])

    def scores(self) -> torch.Tensor:
        """(n, K) float64 calibration input: ``logits`` when present, else log(probs) (equal up to a row constant)."""
        if self.logits is not None:
            return self.logits
        return self.probs.clamp_min(1e-300).log()

    def subset(self, mask: Any) -> ICLRecords:
        """Rows selected by a (n,) boolean mask or an integer index tensor/array."""
        m = _tensor(mask, "mask")
        if m.dtype == torch.bool:
            if m.shape != (len(self),):
                raise ValueError(f"ICLRecords.subset: boolean mask must have shape ({len(self)},), "
                                 f"got {tuple(m.shape)}")
        else:
            m = m.to(torch.int64).reshape(-1)
        return ICLRecords(
            probs=self.probs[m], labels=self.labels[m], shots=self.shots[m], prompt_id=self.prompt_id[m],
            example_id=self.example_id[m], logits=None if self.logits is None else self.logits[m],
        )

    @staticmethod
    def concat(records: Sequence[ICLRecords]) -> ICLRecords:
        """Stack record sets row-wise. All must have the same K; ``logits`` is kept only if every part has it."""
        records = list(records)
        if not records:
            raise ValueError("ICLRecords.concat: got an empty list")
        ks = {r.num_classes for r in records}
        if len(ks) != 1:
            raise ValueError(f"ICLRecords.concat: parts have different numbers of label words {sorted(ks)}")
        with_logits = all(r.logits is not None for r in records)
        return ICLRecords(
            probs=torch.cat([r.probs for r in records]),
            labels=torch.cat([r.labels for r in records]),
            shots=torch.cat([r.shots for r in records]),
            prompt_id=torch.cat([r.prompt_id for r in records]),
            example_id=torch.cat([r.example_id for r in records]),
            logits=torch.cat([r.logits for r in records]) if with_logits else None,
        )

    def to_dict(self) -> dict[str, list]:
        """Plain-Python columns (for JSON): one list per field; ``logits`` omitted when absent."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[f.name] = v.tolist()
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ICLRecords:
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("probs", "labels", "shots", "prompt_id", "example_id") if k not in d]
        if missing:
            raise ValueError(f"ICLRecords.from_dict: missing keys {missing}")
        probs = d["probs"]
        if len(probs) == 0:
            raise ValueError("ICLRecords.from_dict: cannot infer K from zero rows")
        return ICLRecords(probs=torch.tensor(probs, dtype=torch.float64), labels=d["labels"], shots=d["shots"],
                          prompt_id=d["prompt_id"], example_id=d["example_id"],
                          logits=None if d.get("logits") is None else torch.tensor(d["logits"], dtype=torch.float64))
