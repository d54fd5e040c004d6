"""Test and calibration records of an in-context learner on synthetic few-shot tasks (:mod:`ratelab.data.fewshot`).

The LM harness (:mod:`ratelab.icl.harness`) scores a language model on text datasets; this module does the same
for a model trained on synthetic sequences (``icl_gpt_*``), with the same record layout (:class:`ICLRecords`), so
the recalibration regimes of :mod:`ratelab.icl.recalibration` apply unchanged.

Protocol of :func:`collect_records`. An *evaluation task* is one fixed draw of class centers and label words -- the
analogue of one text dataset. For each task: a pool of test queries and a disjoint pool of calibration queries;
``n_prompts`` demonstration sets (the demonstration seeds) of ``max(shots)`` demonstrations each, the k-shot prompt
using the first k (nested, so k-shot prompts differ only in length); ``n_extra_prompts`` further demonstration sets
used only for calibration (shot-specific fitting). Test records hold (shots, demonstration set) groups for the test
prompts; calibration records hold the same groups plus the extra ones, on the calibration queries. A 0-shot prompt
has no demonstrations, so 0 shots is one group, evaluated once. ``prompt_id = PROMPT_STRIDE * task_index +
demonstration_set`` is unique across tasks. Probabilities are the softmax of the model's logits restricted to the
task's K label words.
"""

from __future__ import annotations

from typing import Any

import torch

from ratelab.core.seeding import derive_seed
from ratelab.data.fewshot import FewShotConfig, FewShotTask, sample_points, sample_task
from ratelab.data.noise import symmetric_noise
from ratelab.icl.records import ICLRecords

__all__ = ["DEFAULT_SHOTS", "PROMPT_STRIDE", "collect_records", "restricted_logits"]

DEFAULT_SHOTS = (0, 1, 2, 4, 8, 16)
PROMPT_STRIDE = 1000  # prompt_id = PROMPT_STRIDE * task_index + demonstration set


def restricted_logits(model: torch.nn.Module, demo_x: torch.Tensor, demo_y: torch.Tensor, qx: torch.Tensor,
                      label_words: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Label-word logits of each query after the same k demonstrations.

    Args:
        model: anything with ``label_logits(x (B, T, d), y (B, T - 1), label_words (K,)) -> (B, T, K)``.
        demo_x: (1, k, d) demonstration inputs; demo_y: (1, k) their label tokens.
        qx: (Q, d) queries.
        label_words: (K,) the task's label tokens.
        batch: queries per forward pass.

    Returns:
        (Q, K) float64 logits on the CPU.
    """
    out = []
    for i in range(0, qx.shape[0], batch):
        q = qx[i: i + batch]
        n = q.shape[0]
        x = torch.cat([demo_x.expand(n, -1, -1), q[:, None]], dim=1)  # (n, k + 1, d)
        y = demo_y.expand(n, -1)  # (n, k): the query's own label is not an input
        out.append(model.label_logits(x, y, label_words)[:, -1])
    return torch.cat(out).double().cpu()


def _append(c: dict[str, list[torch.Tensor]], z: torch.Tensor, labels: torch.Tensor, k: int, pid: int, lo: int,
            hi: int) -> None:
    """Add query rows lo..hi-1 (their logits, labels, shots, prompt id and example ids) to record columns ``c``."""
    c["logits"].append(z[lo:hi])
    c["labels"].append(labels[lo:hi])
    c["shots"].append(torch.full((hi - lo,), k))
    c["prompt_id"].append(torch.full((hi - lo,), pid))
    c["example_id"].append(torch.arange(lo, hi))


@torch.no_grad()
def collect_records(model: torch.nn.Module, cfg: FewShotConfig, *, n_tasks: int = 4,
                    shots: tuple[int, ...] = DEFAULT_SHOTS, n_prompts: int = 5, n_extra_prompts: int = 5,
                    n_test: int = 300, n_calib: int = 300, seed: int = 0, device: str | torch.device = "cpu",
                    num_classes: int | None = None) -> list[dict[str, Any]]:
    """Test and calibration records of ``model`` on ``n_tasks`` fixed evaluation tasks (see the module docstring).

    Args:
        model: an :class:`~ratelab.models.icl_gpt.ICLGPT` (anything with ``label_logits(x, y, label_words)``).
        cfg: task distribution (input dimension, vocabulary, cluster noise, demonstration label noise).
        n_tasks: evaluation tasks.
        shots: numbers of demonstrations (max <= the model's ``max_pairs - 1``).
        n_prompts: demonstration sets evaluated on the test queries (and on the calibration queries).
        n_extra_prompts: extra demonstration sets evaluated only on the calibration queries (shot-specific fits).
        n_test, n_calib: query pool sizes (disjoint draws; example ids 0..n_test-1 and n_test..n_test+n_calib-1).
        seed: fixes tasks, demonstrations and queries (independent of the model).
        device: where the model runs.
        num_classes: K for every task; default drawn per task from ``cfg``.

    Returns:
        One dict per task: ``task`` (:class:`FewShotTask`), ``test`` and ``calib`` (:class:`ICLRecords`).
        Demonstration labels carry ``cfg.label_noise``; query labels are clean.

    Raises:
        ValueError: a count out of range (named).
    """
    if n_prompts < 1 or n_test < 1 or n_calib < 1 or n_extra_prompts < 0:
        raise ValueError(f"collect_records: need n_prompts, n_test, n_calib >= 1 and n_extra_prompts >= 0, got "
                         f"{n_prompts}, {n_test}, {n_calib}, {n_extra_prompts}")
    if n_prompts + n_extra_prompts > PROMPT_STRIDE:
        raise ValueError(f"collect_records: at most {PROMPT_STRIDE} demonstration sets (n_prompts + "
                         f"n_extra_prompts) per task")
    max_k = max(shots)
    model.eval()
    out = []
    for t in range(n_tasks):
        g = torch.Generator().manual_seed(derive_seed(seed, t, 0x7A5C))
        task: FewShotTask = sample_task(cfg, g, num_classes)
        qx, qy = sample_points(task, n_test + n_calib, cfg, g)  # clean query labels
        qx_dev, words = qx.to(device), task.label_words.to(device)
        cols: dict[str, dict[str, list[torch.Tensor]]] = {
            s: {"logits": [], "labels": [], "shots": [], "prompt_id": [], "example_id": []} for s in ("test", "calib")
        }

        for p in range(n_prompts + n_extra_prompts):
            gp = torch.Generator().manual_seed(derive_seed(seed, t, p, 0xD3))
            dx, dc = sample_points(task, max_k, cfg, gp)
            if cfg.label_noise > 0:  # the noise of the training sequences: each label independently
                dc = symmetric_noise(dc, cfg.label_noise, task.num_classes, generator=gp, selection="bernoulli").labels
            dx, dy = dx.to(device), task.label_words[dc].to(device)
            pid = PROMPT_STRIDE * t + p
            for k in shots:
                if k == 0 and p > 0:
                    continue  # no demonstrations: every 0-shot prompt is the same prompt
                lo = 0 if p < n_prompts else n_test  # extra demonstration sets only score calibration queries
                z = torch.zeros(n_test + n_calib, task.num_classes, dtype=torch.float64)
                z[lo:] = restricted_logits(model, dx[None, :k], dy[None, :k], qx_dev[lo:], words)
                if p < n_prompts:
                    _append(cols["test"], z, qy, k, pid, 0, n_test)
                _append(cols["calib"], z, qy, k, pid, n_test, n_test + n_calib)
        recs = {}
        for split, c in cols.items():
            z = torch.cat(c["logits"])
            recs[split] = ICLRecords(probs=z.softmax(1), labels=torch.cat(c["labels"]), shots=torch.cat(c["shots"]),
                                     prompt_id=torch.cat(c["prompt_id"]), example_id=torch.cat(c["example_id"]),
                                     logits=z)
        out.append({"task": task, "test": recs["test"], "calib": recs["calib"]})
    return out
