"""One smoke run per recipe for the whole test session.

Each recipe's smoke run is executed at most once per pytest process, however many test modules read it (the recipe's
own tests and the demo test): :func:`smoke_run` memoizes the run in this module, which Python imports once. A test
calls ``smoke_run(name, tmp_path_factory)`` with pytest's session-scoped ``tmp_path_factory`` fixture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ratelab.recipes import RecipeResult, run_recipe


@dataclass(frozen=True)
class SmokeRun:
    """A finished smoke run: its directory, what :func:`run_recipe` returned, and the ``results.json`` it wrote."""

    out_dir: Path
    result: RecipeResult
    saved: dict[str, Any]


_RUNS: dict[str, SmokeRun] = {}


def smoke_run(name: str, factory: pytest.TempPathFactory) -> SmokeRun:
    """The smoke run of recipe ``name`` (run on the CPU on first use, then reused)."""
    if name not in _RUNS:
        out = factory.mktemp(f"smoke-{name}")
        res = run_recipe(name, out, "smoke", progress=False, device="cpu")
        _RUNS[name] = SmokeRun(out, res, json.loads((out / "results.json").read_text()))
    return _RUNS[name]
