"""Layers point one way (docs/architecture.md): every import under src/panobench goes down the stack.

The imports are read from the source (ast, module- and function-level alike: a lazy import is still a dependency);
``if TYPE_CHECKING:`` blocks are skipped because they never run. A fresh interpreter then checks that evaluation
really loads without the training layer or Lightning.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import panobench

SRC = Path(panobench.__file__).parent

# Unit (top-level package or module) -> rank; a unit may import units of a lower rank, and its own.
# training and evaluation share a rank and must not import each other.
RANKS = {
    "errors": 0,
    "stages": 1, "utils": 1,
    "config": 2,
    "geometry": 3,
    "data": 4,
    "models": 5,
    "measurement": 6, "matrix": 6,
    "training": 7, "evaluation": 7,
    "reporting": 8,
    "__init__": 9, "cli": 9,
    "__main__": 10,
}
# Third-party packages only a given layer may import.
RESTRICTED = {"lightning": {"training"}, "snakemake": set()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import that can run, relative imports made absolute."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".")[: len(module.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(package + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module or ""))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        unit = _unit(module)
        assert unit in RANKS, f"{module}: package {unit!r} has no layer in RANKS (add it)"
        for line, target in _imports(ast.parse(path.read_text(encoding="utf-8")), module):
            top = target.split(".")[0]
            where = f"{path.relative_to(SRC.parent)}:{line}"
            if top in RESTRICTED and unit not in RESTRICTED[top]:
                bad.append(f"{where}: {module} imports {target} (only {sorted(RESTRICTED[top])} may)")
            if top != "panobench" or target == "panobench":
                continue
            other = _unit(target)
            if other == unit:
                continue
            if RANKS[other] >= RANKS[unit]:
                bad.append(f"{where}: {module} ({unit}, layer {RANKS[unit]}) imports {target} "
                           f"({other}, layer {RANKS[other]})")
    return bad


def test_imports_point_down_the_layers():
    assert _violations() == []


def test_the_checker_sees_function_level_imports(tmp_path):
    tree = ast.parse("def f():\n    from panobench.training.runner import train_stage\n"
                     "if TYPE_CHECKING:\n    from panobench.training import system\n")
    assert _imports(tree, "panobench.evaluation.generate") == [(2, "panobench.training.runner")]


# What must not be loaded with each module (the test's parameters) ...
NOT_LOADED_WITH = [
    ("panobench.evaluation.generate", ("panobench.training", "lightning")),
    ("panobench.models.assembly", ("panobench.training", "panobench.evaluation", "lightning")),
    ("panobench.stages", ("torch", "panobench.config")),
    ("panobench.matrix", ("torch",)),
]
# ... and the order one fresh interpreter imports them in (see `loaded_after`): lightest first, each module before
# any module that may import it.
IMPORT_ORDER = ["panobench.stages", "panobench.matrix", "panobench.models.assembly", "panobench.evaluation.generate"]


@pytest.fixture(scope="module")
def loaded_after() -> dict[str, list[str]]:
    """{module: sorted(sys.modules) right after importing it}: one fresh interpreter imports IMPORT_ORDER in order.

    Every module X loads is in the list after X's import, whatever was imported before it, so a leak cannot hide;
    a forbidden module an earlier one loaded would be blamed on X too (a false failure, never a false pass). One
    interpreter instead of one per module: torch and transformers are loaded once, not twice."""
    code = ("import importlib, json, sys\n"
            "for module in json.loads(sys.argv[1]):\n"
            "    importlib.import_module(module)\n"
            "    print(json.dumps([module, sorted(sys.modules)]))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(IMPORT_ORDER)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    return dict(json.loads(line) for line in out.stdout.splitlines() if line.startswith('["panobench'))


@pytest.mark.parametrize("module, forbidden", NOT_LOADED_WITH)
def test_module_loads_without_the_layers_above(module, forbidden, loaded_after):
    """Imported in a fresh interpreter: nothing above it (or heavy) ends up in sys.modules."""
    assert sorted(IMPORT_ORDER) == sorted(m for m, _ in NOT_LOADED_WITH)
    loaded = loaded_after[module]
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert leaked == []
