"""docs/architecture.md stays true: every file, ``file::name`` and ``panobench.*`` name it cites exists, and its
stage tables list every stage of the stage table with the table's own values.

Cheap on purpose (no torch import): names are looked up in the parsed source, not imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from panobench.stages import EVAL_STAGES, STAGES, run_dir

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
DOC = REPO / "docs" / "architecture.md"
# Backticked text that names a file of the repository (placeholders such as <name> are skipped).
PATH_ROOTS = ("src/", "tests/", "rules/", "config/", "docs/", "README.md", "Snakefile")


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


def _inline_code(text: str) -> list[str]:
    """Every `span` outside fenced code blocks (a span may wrap onto the next line)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def _cited_paths() -> list[str]:
    spans = [s.split()[0] for s in _inline_code(_text()) if s.split()]
    return sorted({s.rstrip(",.:") for s in spans
                   if s.startswith(PATH_ROOTS) and not any(c in s for c in "<{*")})


def _defined(tree: ast.Module, dotted: str) -> bool:
    """``name`` (or ``Class.member``) is defined at the top level of ``tree`` (def, class or assignment)."""
    body: list[ast.stmt] = tree.body
    for part in dotted.split("."):
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == part for t in node.targets):
                found = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == part:
                found = node
        if found is None:
            return False
        body = found.body if isinstance(found, ast.ClassDef) else []
    return True


def _module_file(parts: list[str]) -> Path | None:
    base = SRC.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_the_doc_cites_files_and_names_at_all():
    assert len(_cited_paths()) > 20
    assert any("::" in p for p in _cited_paths())


@pytest.mark.parametrize("cited", _cited_paths())
def test_every_cited_path_and_name_exists(cited):
    path, _, name = cited.partition("::")
    file = REPO / path
    assert file.exists(), f"docs/architecture.md cites {path}, which does not exist"
    if not name:
        return
    if file.suffix == ".py":
        assert _defined(ast.parse(file.read_text(encoding="utf-8")), name), f"{path} defines no {name}"
    elif file.suffix == ".smk":
        pattern = rf"^\s*(rule {re.escape(name)}:|def {re.escape(name)}\(|{re.escape(name)} =)"
        assert re.search(pattern, file.read_text(encoding="utf-8"), re.MULTILINE), f"{path} defines no {name}"
    else:
        assert name.split(".")[-1] in file.read_text(encoding="utf-8"), f"{path} has no {name}"


def _cited_modules() -> list[str]:
    return sorted({s.rstrip(",.:") for s in _inline_code(_text()) if re.fullmatch(r"panobench(\.\w+)+[,.:]?", s)})


@pytest.mark.parametrize("dotted", _cited_modules())
def test_every_cited_panobench_module_exists(dotted):
    """``panobench.a.b`` is a module, or ``panobench.a.NAME`` a name defined in module ``panobench.a``."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut])
        if module is not None:
            rest = ".".join(parts[cut:])
            assert not rest or _defined(ast.parse(module.read_text(encoding="utf-8")), rest), \
                f"{module.relative_to(REPO)} defines no {rest}"
            return
    pytest.fail(f"docs/architecture.md cites {dotted}, which is no module under src/")


def _table_rows(first_header: str) -> dict[str, str]:
    """Rows of the Markdown table whose header starts with ``| first_header |``, keyed by their first cell."""
    lines = _text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = line
    return rows


def test_stage_table_lists_every_training_stage_with_its_values():
    rows = _table_rows("stage")
    assert list(rows) == list(STAGES), "the doc's stage table must list the stages of panobench.stages, in order"
    for name, stage in STAGES.items():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[1] == str(stage.number) and cells[2].startswith(f"`{stage.objective}`")
        for component in stage.trains | stage.carries:
            assert f"`{component}`" in cells[3] + cells[4], f"{name}: component {component} not in the doc's row"
        experiment = "<cell>" if stage.per_cell else "<recipe>"
        assert f"`{run_dir('runs', '<name>', experiment, name, '<resampler>')}`" in cells[6]
        if stage.previous:
            assert f"`{stage.previous}`" in cells[5]


def test_eval_table_lists_every_evaluation_with_its_values():
    rows = _table_rows("evaluation")
    assert list(rows) == list(EVAL_STAGES)
    for name, spec in EVAL_STAGES.items():
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[1] == f"`{spec.builds}`"
        assert cells[2].startswith(f"`{spec.weights}`" if spec.weights else "nothing")
        assert cells[3].startswith("grey" if spec.image == "grey" else "dataset")
