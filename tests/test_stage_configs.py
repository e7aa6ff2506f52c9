"""Each stage declares its knobs once: the notebook's parameters cell equals the stage's Config dataclass.

For every notebook (the py:percent file and its .ipynb twin, read through jupytext): the parameters cell has
exactly the Config's field names, in order, with the same type and default, and each field's docstring is
the cell's comment. Every key of every ``configs/<profile>/NN_*.yaml`` is a field of that stage's Config.
"""

from __future__ import annotations

import ast
import importlib
import io
import tokenize
from dataclasses import fields, is_dataclass
from pathlib import Path

import jupytext
import pytest
import yaml

from erprm_core.stages import STAGE_MODULES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
CONFIG_FILES = sorted((ROOT / "configs").glob("*/[0-9][0-9]_*.yaml"))


def config_class(stage: str) -> type:
    """The Config dataclass of a stage module (the one class named ``*Config`` defined there)."""
    module = importlib.import_module(STAGE_MODULES[stage])
    found = [
        obj
        for name, obj in vars(module).items()
        if name.endswith("Config") and is_dataclass(obj) and obj.__module__ == module.__name__
    ]
    assert len(found) == 1, f"{module.__name__}: expected one *Config dataclass, found {found}"
    return found[0]


def parameters_cell(path: Path) -> str:
    """The source of the cell tagged ``parameters`` (exactly one)."""
    nb = jupytext.read(path)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters'"
    return cells[0].source


def parse_parameters(source: str) -> list[tuple[str, str, object, str]]:
    """(name, type, default, comment) of each line ``name: type = literal  # comment`` of a parameters cell."""
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = []
    for node in ast.parse(source).body:
        assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name), ast.unparse(node)
        default = ast.literal_eval(node.value)
        out.append((node.target.id, ast.unparse(node.annotation), default, comments.get(node.lineno, "")))
    return out


def field_docstrings(cls: type) -> dict[str, str]:
    """Field name -> the string literal on the line after the field in the class body."""
    module = importlib.import_module(cls.__module__)
    tree = ast.parse(Path(module.__file__).read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def test_every_notebook_has_a_stage_module():
    assert [p.stem for p in NOTEBOOKS] == list(STAGE_MODULES)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("twin", [".py", ".ipynb"])
def test_parameters_cell_equals_config(notebook, twin):
    path = notebook.with_suffix(twin)
    cls = config_class(notebook.stem)
    cell = parse_parameters(parameters_cell(path))
    declared = [(f.name, str(f.type), f.default) for f in fields(cls)]
    assert [(n, t, d) for n, t, d, _ in cell] == declared
    for (name, _, default, _), f in zip(cell, fields(cls), strict=True):
        assert type(default) is type(f.default), f"{name}: {type(default)} vs {type(f.default)}"
    docs = field_docstrings(cls)
    assert {n: c for n, _, _, c in cell} == {f.name: docs.get(f.name) for f in fields(cls)}
    assert cls.from_namespace({n: d for n, _, d, _ in cell}) == cls()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_twin_in_sync_and_stripped(notebook):
    py, ipynb = jupytext.read(notebook), jupytext.read(notebook.with_suffix(".ipynb"))
    assert [(c.cell_type, c.source) for c in ipynb.cells] == [(c.cell_type, c.source) for c in py.cells]
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{notebook.stem}: outputs not stripped"
            )


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_file_keys_are_fields(path):
    names = {f.name for f in fields(config_class(path.stem))}
    keys = set(yaml.safe_load(path.read_text()) or {})
    assert keys <= names, f"{path}: unknown parameter(s) {sorted(keys - names)}"
