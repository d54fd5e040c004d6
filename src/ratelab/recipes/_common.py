"""What every recipe shares: its scale table, fresh run directories, thread limits, figures, device, log lines.

A recipe declares one frozen dataclass ``Scale`` and a table ``SCALES = {"smoke": Scale(...), "quick": ...,
"full": ...}`` (the three rows of one type; :func:`check_scales`), and gets the name of the scale to run;
``SCALES[scale]`` is its settings. Inside the recipe:

* :func:`fresh_run_dir` for every training run directory (a re-run retrains from scratch instead of meeting the
  old run's checkpoint);
* :func:`limit_threads` around CPU work on tiny tensors, where extra threads only add contention on a shared
  machine (measured in the recipes' docstrings: up to 10x slower with 2 threads on a busy 2-core machine);
* :func:`add_figure` to write a figure next to ``results.json`` and embed the same PNG into the report;
* :func:`resolve_device` for the ``device`` argument (``"auto"`` = CUDA when available);
* :func:`logger` for progress lines;
* :func:`train_arm` to train one arm of a comparison (a model factory on given datasets, with the trainer) and
  :func:`accuracy_difference` to tell whether two arms' accuracies separate beyond their noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ratelab.core.dist import resolve_device
from ratelab.eval.report import Report

__all__ = ["FIGURE_DPI", "SCALE_NAMES", "accuracy_difference", "add_figure", "binom_se_diff", "check_scales",
           "fresh_run_dir", "limit_threads", "logger", "resolve_device", "spearman", "train_arm"]

SCALE_NAMES = ("smoke", "quick", "full")
FIGURE_DPI = 110


def check_scales(name: str, scales: Mapping[str, Any]) -> None:
    """A recipe's scale table: exactly the rows ``smoke``, ``quick`` and ``full``, frozen dataclasses of one type.

    Raises:
        TypeError, ValueError: naming the recipe and what is wrong (a programming error in the recipe).
    """
    if not isinstance(scales, Mapping) or tuple(sorted(scales)) != tuple(sorted(SCALE_NAMES)):
        got = sorted(scales) if isinstance(scales, Mapping) else type(scales).__name__
        raise ValueError(f"recipe {name!r}: the scale table must have exactly the rows {list(SCALE_NAMES)}, got {got}")
    types = {type(row) for row in scales.values()}
    if len(types) != 1:
        raise TypeError(f"recipe {name!r}: the scale rows must share one type, got {sorted(t.__name__ for t in types)}")
    row_type = types.pop()
    params = getattr(row_type, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(row_type) or params is None or not params.frozen:
        raise TypeError(f"recipe {name!r}: the scale rows must be frozen dataclasses, got {row_type.__name__}")


def fresh_run_dir(out_dir: str | Path, *parts: str) -> Path:
    """``out_dir/parts...``, emptied and created: a recipe re-run trains from scratch, never on a stale run.

    Only paths strictly inside ``out_dir`` are removed (``parts`` must be relative names without ``..``), so a
    recipe cannot delete the directory the user pointed it at.

    Raises:
        ValueError: no ``parts``, or a part that is absolute or climbs out of ``out_dir``.
    """
    if not parts:
        raise ValueError("fresh_run_dir: give the run's name inside out_dir (refusing to empty out_dir itself)")
    rel = Path(*parts)
    if rel.is_absolute() or ".." in rel.parts or rel == Path("."):
        raise ValueError(f"fresh_run_dir: {rel} must be a relative path inside out_dir")
    path = Path(out_dir) / rel
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def limit_threads(n: int = 1, *, device: str | torch.device = "cpu", blas: bool = False) -> Iterator[None]:
    """Limit CPU threads for the duration of the block; the previous settings are restored afterwards.

    Args:
        n: threads to use.
        device: the device the work runs on; torch's intra-op threads are limited only when it resolves to the
            CPU (``"auto"`` included), because on a GPU they only feed the launches.
        blas: also limit the BLAS thread pools that numpy/scipy use (threadpoolctl), for dense linear algebra
            outside torch.
    """
    if n < 1:
        raise ValueError(f"limit_threads: n must be >= 1, got {n}")
    prev = torch.get_num_threads()
    on_cpu = resolve_device(device).type == "cpu"
    with contextlib.ExitStack() as stack:
        if blas:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        if on_cpu:
            torch.set_num_threads(n)
            stack.callback(torch.set_num_threads, prev)
        yield


def add_figure(report: Report, fig: Any, out_dir: str | Path, filename: str, caption: str = "") -> Path:
    """Save ``fig`` (a matplotlib Figure) as ``out_dir/filename`` (PNG) and embed that file into ``report``.

    Returns:
        The path of the PNG.
    """
    path = Path(out_dir) / filename
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
    report.figure(path, caption)
    return path


def logger(progress: bool, prefix: str) -> Callable[[str], None]:
    """``log(msg)`` printing ``[prefix] msg`` (flushed) when ``progress`` is on, else doing nothing."""
    if not progress:
        return lambda msg: None
    return lambda msg: print(f"[{prefix}] {msg}", flush=True)


def train_arm(name: str, factory: Callable[[], torch.nn.Module], *, train_dataset: Any, val_dataset: Any,
              out_dir: str | Path, seed: int, device: str, progress: bool, task_cls: Any = None,
              task_kwargs: dict[str, Any] | None = None, **cfg: Any) -> dict[str, Any]:
    """Train ``factory()`` (built after the trainer seeds, so the seed fixes its initialization) on the given
    datasets in a fresh ``out_dir/runs/<name>_seed<seed>`` and return its final metrics and model.

    Args:
        task_cls: a Task class taking ``(config, train_dataset=, val_dataset=, **task_kwargs)`` (default:
            classification); its config is the run's ``task`` section (give ``task=`` in ``cfg``).
        task_kwargs: extra keyword arguments of the task (e.g. MAE's ``fit_dataset``).
        cfg: :class:`ratelab.train.TrainConfig` fields (epochs, batch_size, lr, task, ...); ``model`` defaults to
            ``name`` (a label here: the factory builds the network).

    Returns:
        ``{"name", "seed", "final" (the trainer's final metrics), "model" (eval mode), "run_dir"}``.
    """
    from ratelab.train import ClassificationTask, TrainConfig, Trainer

    base = task_cls or ClassificationTask

    class FactoryTask(base):  # type: ignore[misc, valid-type]
        def build_model(self, cfg_):
            return factory()

    safe = name.replace(" ", "_").replace("+", "plus").replace("/", "_").strip("_")
    run_dir = fresh_run_dir(out_dir, "runs", f"{safe}_seed{seed}")
    settings = {"model": name, "ckpt_every": 0, "log_every": 10_000, **cfg}
    tc = TrainConfig(seed=seed, out_dir=str(run_dir), device=device, progress=progress, **settings)
    trainer = Trainer(tc, FactoryTask(tc.task, train_dataset=train_dataset, val_dataset=val_dataset,
                                      **(task_kwargs or {})))
    final = trainer.fit()
    return {"name": name, "seed": seed, "final": final, "model": trainer.model.eval(), "run_dir": run_dir}


def spearman(x: Any, y: Any) -> float:
    """Rank correlation of two sequences (ranks by order, ties broken by position); 0 when either is constant."""
    import numpy as np

    rx, ry = np.argsort(np.argsort(np.asarray(x))), np.argsort(np.argsort(np.asarray(y)))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def binom_se_diff(p: float, n: int) -> float:
    """Standard error of the difference of two independent accuracies near ``p`` on ``n`` images each."""
    return math.sqrt(2 * max(p * (1 - p), 1e-6) / n)


def accuracy_difference(a: list[float], b: list[float], n_eval: int) -> dict[str, float | bool]:
    """Whether arm ``a`` beats arm ``b`` beyond noise: the difference of mean accuracies and twice its standard
    error, which adds the binomial error of ``n_eval`` evaluation images to the spread over seeds (the sample
    variance of each arm over its seeds, when it has two or more).

    Returns:
        ``{"diff", "two_se", "separated" (|diff| > two_se), "better" (diff > two_se)}``.
    """
    if not a or not b:
        raise ValueError("accuracy_difference: both arms need at least one accuracy")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    var = binom_se_diff((ma + mb) / 2, n_eval) ** 2
    for xs, m in ((a, ma), (b, mb)):
        if len(xs) > 1:
            var += sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)
    two_se = 2 * math.sqrt(var)
    d = ma - mb
    return {"diff": d, "two_se": two_se, "separated": abs(d) > two_se, "better": d > two_se}
