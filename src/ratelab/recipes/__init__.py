"""Paper recipes: each reproduces one paper's experiment at a chosen scale and writes ``results.json``, figures and
``report.html`` into an output directory.

A recipe is a function ``fn(out_dir, *, quick, smoke, seed, device, progress) -> RecipeResult`` registered with
:func:`register_recipe`. ``quick=True`` is the CPU-minutes version used by ``ratelab demo``; ``quick=False`` is the
fuller study; ``smoke=True`` is a seconds-long wiring check for tests (tiny model, a few steps; its numbers mean
nothing and its claim checks are expected to fail).
Recipes live in ``ratelab/recipes/<paper>/`` and are imported lazily.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelab.eval.report import Report, write_json

# Modules that define recipes; imported on first lookup so `import ratelab` stays light.
_RECIPE_MODULES = (
    "ratelab.recipes.adventurer.recipe",
    "ratelab.recipes.crate.digits",
    "ratelab.recipes.mcr2.landscape",
    "ratelab.recipes.mcr2.label_noise",
    "ratelab.recipes.wrong_line.recipe",
    "ratelab.recipes.icl.calibration",
)


@dataclass
class RecipeResult:
    """What a recipe hands back: the JSON-able results (with a flat ``summary`` and a list of ``checks``) and the
    report it built."""

    results: dict[str, Any]
    report: Report


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    fn: Callable[..., RecipeResult]
    paper: str
    description: str
    quick_minutes: float = field(default=1.0)


_RECIPES: dict[str, RecipeSpec] = {}


def register_recipe(name: str, *, paper: str, description: str, quick_minutes: float = 1.0):
    """Decorator registering a recipe under ``name`` (duplicates are an error)."""

    def deco(fn: Callable[..., RecipeResult]) -> Callable[..., RecipeResult]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = RecipeSpec(name, fn, paper, description, quick_minutes)
        return fn

    return deco


def _load_all() -> None:
    for mod in _RECIPE_MODULES:
        importlib.import_module(mod)


def list_recipes() -> list[RecipeSpec]:
    _load_all()
    return [_RECIPES[k] for k in sorted(_RECIPES)]


def get_recipe(name: str) -> RecipeSpec:
    _load_all()
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(_RECIPES))}")
    return _RECIPES[name]


def check(claim: str, holds: bool, measured: Any) -> dict[str, Any]:
    """One paper claim as re-measured here: recorded in results.json and shown in the report."""
    return {"claim": claim, "holds": bool(holds), "measured": measured}


def run_recipe(
    name: str,
    out_dir: str | Path,
    *,
    quick: bool = False,
    smoke: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> RecipeResult:
    """Run a recipe and write ``results.json`` and ``report.html`` into ``out_dir``."""
    spec = get_recipe(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = spec.fn(out_dir, quick=quick, smoke=smoke, seed=seed, device=device, progress=progress)
    res.results.setdefault("recipe", name)
    res.results.setdefault("paper", spec.paper)
    res.results["quick"] = quick
    res.results["smoke"] = smoke
    res.results["seed"] = seed
    res.results["wall_time_s"] = round(time.time() - t0, 2)
    write_json(res.results, out_dir / "results.json")
    res.report.save(out_dir / "report.html")
    return res


__all__ = ["RecipeResult", "RecipeSpec", "check", "get_recipe", "list_recipes", "register_recipe", "run_recipe"]
