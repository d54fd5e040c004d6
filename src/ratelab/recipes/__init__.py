"""Paper recipes: each reproduces one paper's experiment at a chosen scale and writes ``results.json``, figures and
``report.html`` into an output directory.

Every recipe has three scales, the rows of its typed ``SCALES`` table (one frozen dataclass per recipe, e.g.
:class:`ratelab.recipes.adventurer.recipe.Scale`):

* ``smoke``: a seconds-long wiring check for tests (tiny models, a few steps; its numbers mean nothing and its claim
  checks are expected to fail);
* ``quick``: the CPU-minutes version, the one ``ratelab demo`` runs;
* ``full``: the fuller study (more seeds, longer training) whose figures the recipe docstrings record.

A recipe is a function ``fn(out_dir, *, scale, seed, device, progress) -> RecipeResult`` registered with
:func:`register_recipe` together with its table; ``scale`` is the row's name and ``SCALES[scale]`` its settings.
Helpers shared by all recipes live in :mod:`ratelab.recipes._common`. Recipes live in ``ratelab/recipes/<paper>/``
and are imported lazily.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelab.core.errors import ConfigError, UnknownNameError, did_you_mean
from ratelab.eval.report import Report, write_json
from ratelab.recipes._common import SCALE_NAMES, check_scales, limit_threads

DEFAULT_THREADS = 1

# Modules that define recipes; imported on first lookup so `import ratelab` stays light.
_RECIPE_MODULES = (
    "ratelab.recipes.adventurer.recipe",
    "ratelab.recipes.crate.digits",
    "ratelab.recipes.crate_alpha.recipe",
    "ratelab.recipes.crate_mae.recipe",
    "ratelab.recipes.mcr2.landscape",
    "ratelab.recipes.mcr2.label_noise",
    "ratelab.recipes.wrong_line.recipe",
    "ratelab.recipes.icl.calibration",
    "ratelab.recipes.segmentation.recipe",
    "ratelab.recipes.dpcap.recipe",
    "ratelab.recipes.var.recipe",
)


@dataclass
class RecipeResult:
    """What a recipe hands back: the JSON-able results (with a flat ``summary`` and a list of ``checks``) and the
    report it built."""

    results: dict[str, Any]
    report: Report


@dataclass(frozen=True)
class RecipeSpec:
    """A registered recipe: its function, the paper, a one-line description, its scale table and the quick run's
    length in seconds on one thread of a quiet 2-core machine (shown by ``ratelab reproduce --list``; the recorded
    runs are in docs/records/demo_quick.json)."""

    name: str
    fn: Callable[..., RecipeResult]
    paper: str
    description: str
    scales: Mapping[str, Any]
    quick_seconds: float = field(default=60.0)


_RECIPES: dict[str, RecipeSpec] = {}


def register_recipe(name: str, *, paper: str, description: str, scales: Mapping[str, Any],
                    quick_seconds: float = 60.0):
    """Decorator registering a recipe under ``name`` with its scale table (duplicates are an error).

    Raises:
        ValueError, TypeError: the name is taken, or ``scales`` is not a smoke/quick/full table of one frozen
            dataclass (:func:`ratelab.recipes._common.check_scales`).
    """
    check_scales(name, scales)

    def deco(fn: Callable[..., RecipeResult]) -> Callable[..., RecipeResult]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = RecipeSpec(name, fn, paper, description, dict(scales), quick_seconds)
        return fn

    return deco


def _load_all() -> None:
    for mod in _RECIPE_MODULES:
        importlib.import_module(mod)


def list_recipes() -> list[RecipeSpec]:
    _load_all()
    return [_RECIPES[k] for k in sorted(_RECIPES)]


def get_recipe(name: str) -> RecipeSpec:
    """The recipe registered as ``name``.

    Raises:
        UnknownNameError: no such recipe (the message suggests close names and lists the recipes).
    """
    _load_all()
    if name not in _RECIPES:
        raise UnknownNameError(f"unknown recipe {name!r}{did_you_mean(name, _RECIPES)}; available: "
                               f"{', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


def check(claim: str, holds: bool, measured: Any) -> dict[str, Any]:
    """One paper claim as re-measured here: recorded in results.json and shown in the report."""
    return {"claim": claim, "holds": bool(holds), "measured": measured}


def run_recipe(
    name: str,
    out_dir: str | Path,
    scale: str = "quick",
    *,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    threads: int = DEFAULT_THREADS,
) -> RecipeResult:
    """Run a recipe at ``scale`` and write ``results.json`` and ``report.html`` into ``out_dir``.

    The recipe runs with ``threads`` CPU threads (torch intra-op; the default is 1: these small models gain little
    from more, lose up to 10x when the cores are shared, and a recipe's numbers repeat bitwise only at a fixed
    thread count, so the default does not depend on the machine or ``OMP_NUM_THREADS``). On a GPU the setting only
    affects host-side work.

    ``results.json`` also records the recipe, the paper, the scale's name and settings, the seed, the requested
    device, the threads and the wall time.

    Raises:
        UnknownNameError: unknown recipe.
        ConfigError: ``scale`` is not one of smoke, quick, full.
    """
    spec = get_recipe(name)
    if scale not in spec.scales:
        raise ConfigError(f"scale: recipe {name!r} has the scales {list(SCALE_NAMES)}, got {scale!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads < 1:
        raise ConfigError(f"threads: must be >= 1, got {threads}")
    t0 = time.time()
    with limit_threads(threads, device=device):
        res = spec.fn(out_dir, scale=scale, seed=seed, device=device, progress=progress)
    res.results.setdefault("recipe", name)
    res.results.setdefault("paper", spec.paper)
    res.results["scale"] = scale
    res.results["scale_settings"] = dataclasses.asdict(spec.scales[scale])
    res.results["seed"] = seed
    res.results["device"] = device
    res.results["threads"] = threads
    res.results["wall_time_s"] = round(time.time() - t0, 2)
    write_json(res.results, out_dir / "results.json")
    res.report.save(out_dir / "report.html")
    return res


__all__ = ["DEFAULT_THREADS", "SCALE_NAMES", "RecipeResult", "RecipeSpec", "check", "get_recipe", "list_recipes",
           "register_recipe", "run_recipe"]
