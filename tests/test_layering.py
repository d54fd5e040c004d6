"""Dependency hygiene: no import cycles, and dependencies point down the layers.

Every module of ``src/ratelab`` is parsed with ``ast`` (nothing is imported). Module-level imports (those that run
when the module is imported: the module body, class bodies, ``try``/``if`` blocks, but not ``if TYPE_CHECKING:``)
must form no cycle. Function-level imports are lazy and may point anywhere except where a rule below forbids it:

* ``core`` imports nothing from ratelab above ``core`` at module level (it is the base every layer uses);
* ``data`` never imports ``train``;
* ``analysis`` never imports ``train`` or ``recipes``;
* ``models`` never imports ``train``, ``eval``, ``recipes`` or ``cli``;
* ``core`` reaches above itself lazily only from a module ``__getattr__`` (PEP 562 re-exports that keep old import
  paths such as ``ratelab.core.checkpoint.load_model`` working): no core function calls into a family.

A failure names each offending import as ``path:line: statement (module-level|function-level)``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Import:
    module: str  # importing module, dotted
    target: str  # imported ratelab module, dotted (the longest prefix that is a module of the tree)
    path: str
    line: int
    statement: str
    module_level: bool
    function: str | None = None  # innermost enclosing function of a function-level import
    typing_only: bool = False  # under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        if self.module_level:
            where = "module-level"
        elif self.function is not None:
            where = f"function-level, in {self.function}()"
        else:
            where = "under TYPE_CHECKING" if self.typing_only else "function-level"
        return f"{self.path}:{self.line}: {self.statement} ({where})"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


Found = list[tuple[ast.Import | ast.ImportFrom, bool, str | None, bool]]


def _walk(node: ast.AST, function: str | None, out: Found, *, typing_only: bool = False) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            out.append((child, function is None and not typing_only, function, typing_only))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _walk(child, child.name, out)
        elif isinstance(child, ast.Lambda):
            _walk(child, "<lambda>", out)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            # Only for type checkers: never executed, so it cannot form a runtime cycle; still a dependency.
            for sub in child.body:
                _walk(ast.Module(body=[sub], type_ignores=[]), function, out, typing_only=True)
            for sub in child.orelse:
                _walk(ast.Module(body=[sub], type_ignores=[]), function, out, typing_only=typing_only)
        else:
            _walk(child, function, out, typing_only=typing_only)


def collect_imports(root: Path, package: str = "ratelab", *, shown_from: Path | None = None
                    ) -> tuple[set[str], list[Import]]:
    """All modules of ``root/package`` and every import of a module of that package, with where it happens.

    Paths in the reports are relative to ``shown_from`` (default: the parent of ``root``, i.e. ``src/...``).
    """
    shown_from = root.parent if shown_from is None else shown_from
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    found: list[Import] = []
    for f in files:
        name = module_name(f, root)
        is_pkg = f.name == "__init__.py"
        source = f.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(f))
        nodes: Found = []
        _walk(tree, None, nodes)
        for node, module_level, function, typing_only in nodes:
            statement = " ".join((ast.get_source_segment(source, node) or "").split())
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                # ``from a.b import c``: c is a module when a.b.c is one, otherwise a name inside a.b.
                candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for cand in dict.fromkeys(candidates):
                if cand != package and not cand.startswith(package + "."):
                    continue
                parts = cand.split(".")
                while len(parts) > 1 and ".".join(parts) not in modules:
                    parts.pop()
                target = ".".join(parts)
                found.append(Import(name, target, str(f.relative_to(shown_from)), node.lineno, statement,
                                    module_level, function, typing_only))
    return modules, found


def find_cycles(imports: list[Import]) -> list[list[Import]]:
    """Cycles among module-level imports: one list of edges (importer -> imported) per strongly connected group."""
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        if imp.module_level and imp.target != imp.module:
            edges.setdefault(imp.module, []).append(imp)
    # Tarjan's strongly connected components, iterative (the tree is small, but recursion limits are not ours).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            out = edges.get(node, [])
            if i < len(out):
                work.append((node, i + 1))
                nxt = out[i].target
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                group = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    group.add(top)
                    if top == node:
                        break
                if len(group) > 1:
                    groups.append(group)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return [
        sorted((e for m in group for e in edges.get(m, []) if e.target in group), key=lambda e: (e.path, e.line))
        for group in groups
    ]


def layer(module: str) -> str:
    """``ratelab.models.crate.crate`` -> ``models``; the package itself -> ``ratelab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# (layer, forbidden target layers, module-level only?)
RULES = [
    ("core", None, True),  # None: everything outside core
    ("data", {"train"}, False),
    ("analysis", {"train", "recipes"}, False),
    ("models", {"train", "eval", "recipes", "cli"}, False),
]


def violations(imports: list[Import]) -> dict[str, list[Import]]:
    out: dict[str, list[Import]] = {}
    for src_layer, forbidden, module_level_only in RULES:
        bad = []
        for imp in imports:
            if layer(imp.module) != src_layer or (module_level_only and not imp.module_level):
                continue
            dst = layer(imp.target)
            if (forbidden is None and dst != src_layer) or (forbidden is not None and dst in forbidden):
                bad.append(imp)
        out[src_layer] = bad
    return out


def lazy_core_violations(imports: list[Import]) -> list[Import]:
    """Core imports of a higher layer made anywhere but in a module ``__getattr__`` (module-level ones included)."""
    return [
        i for i in imports if layer(i.module) == "core" and layer(i.target) != "core" and i.function != "__getattr__"
    ]


def _report(title: str, items: list[Import]) -> str:
    return title + "\n" + "\n".join(f"  {imp}" for imp in items)


# ---- the checker itself can fail ----------------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "ratelab" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_and_its_edges(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "from ratelab.core import b\n",
        "core/b.py": "import ratelab.core.c as c\n",
        "core/c.py": "from . import a\n\ndef f():\n    from ratelab.core import b\n",
        "core/d.py": "from ratelab.core import a\n",  # points into the cycle, not part of it
    })  # fmt: skip
    _, imports = collect_imports(root, shown_from=root)
    cycles = find_cycles(imports)
    assert len(cycles) == 1
    assert {(e.module, e.target) for e in cycles[0]} == {
        ("ratelab.core.a", "ratelab.core.b"),
        ("ratelab.core.b", "ratelab.core.c"),
        ("ratelab.core.c", "ratelab.core.a"),
    }
    assert "ratelab/core/c.py:1: from . import a (module-level)" in [str(e) for e in cycles[0]]


def test_checker_reports_layer_violations_exactly(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/reg.py": "import ratelab.models\n\ndef lazy():\n    from ratelab.models import x\n",
        "models/__init__.py": "",
        "models/x.py": "def f():\n    from ratelab.train.loop import run\n",
        "data/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ratelab.train import t\n",
        "train/__init__.py": "",
        "train/loop.py": "",
        "train/t.py": "",
        "analysis/__init__.py": "",
    })  # fmt: skip
    _, imports = collect_imports(root, shown_from=root)
    bad = violations(imports)
    assert [str(i) for i in bad["core"]] == ["ratelab/core/reg.py:1: import ratelab.models (module-level)"]
    assert [str(i) for i in bad["models"]] == [
        "ratelab/models/x.py:2: from ratelab.train.loop import run (function-level, in f())"
    ]
    assert [str(i) for i in bad["data"]] == [
        "ratelab/data/__init__.py:3: from ratelab.train import t (under TYPE_CHECKING)"
    ]
    assert bad["analysis"] == []
    assert [str(i) for i in lazy_core_violations(imports)] == [
        "ratelab/core/reg.py:1: import ratelab.models (module-level)",
        "ratelab/core/reg.py:4: from ratelab.models import x (function-level, in lazy())",
    ]
    assert find_cycles(imports) == []


# ---- the real tree ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree() -> tuple[set[str], list[Import]]:
    modules, imports = collect_imports(SRC)
    assert "ratelab.core.registry" in modules and imports  # the scan sees the package
    return modules, imports


def test_no_import_cycles(tree):
    _, imports = tree
    cycles = find_cycles(imports)
    assert not cycles, "\n".join(_report("import cycle (module-level imports):", c) for c in cycles)


@pytest.mark.parametrize("src_layer", [r[0] for r in RULES])
def test_layering(tree, src_layer):
    _, imports = tree
    bad = violations(imports)[src_layer]
    rule = {
        "core": "core/ imports nothing from ratelab above core at module level",
        "data": "data/ never imports train/",
        "analysis": "analysis/ never imports train/ or recipes/",
        "models": "models/ never imports train/, eval/, recipes/ or cli/",
    }[src_layer]
    assert not bad, _report(f"{rule}; offending imports:", bad)


def test_core_reaches_above_itself_only_through_lazy_reexports(tree):
    # The hidden cycle of the issue ran through lazy imports (the registry's create_model imported the families,
    # whose converters imported core.checkpoint, whose load_model imported the registry): module-level rules alone
    # would not see it. Core code may name a higher layer only in a module __getattr__ that re-exports it.
    _, imports = tree
    bad = lazy_core_violations(imports)
    assert not bad, _report("core/ imports above core outside a module __getattr__ re-export:", bad)


def test_registry_and_checkpoint_do_not_import_the_families():
    # The cycle the issue found (registry -> models -> convert -> checkpoint -> registry) is gone at import time:
    # importing core's registry and checkpoint loads no family; the factory above them does.
    import subprocess
    import sys

    code = (
        "import sys, ratelab.core.registry, ratelab.core.checkpoint, ratelab.core.keymap; "
        "print(sorted(m for m in sys.modules if m.startswith('ratelab.models')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
