"""The package's layers (docs/design.md "Layers") and its size limits, checked on the source with ``ast``.

Every module of ``erprm_core`` has a layer and a place in its layer's order (``LAYERS``). A module may import
(at module level, inside ``if TYPE_CHECKING:``, or inside a function: all count) only modules of a lower
layer, or modules that come earlier in its own layer's order; so the imports have no cycle. Besides: at most
``MAX_INNER_IMPORTS`` erprm_core imports inside functions (the target is none), no function over
``MAX_FUNCTION_LINES`` lines, no module over ``MAX_MODULE_LINES`` lines, and the core layer under
``MAX_CORE_LINES`` lines. A new module must be added to ``LAYERS`` (and to docs/design.md).

The checks are plain functions of a scanned tree, so the tests at the end run them on small fake trees too:
each rule is shown to fail, with the file and line in its message.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = "erprm_core"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

MAX_INNER_IMPORTS = 10
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 800
MAX_CORE_LINES = 5125  # 4975 until the tiny tokenizer and Llama moved down from stages/policy; 4825 until issue 31 (prefix-tree PRM scoring); 4500 until issue 30 (SmolLM2, split step tags); 4800 until issue 29 (the loss floor
# of soft labels and the processbench stratified sample); issue 28 moved problem-resampled
# intervals, within-problem ranking and the policy's likelihood down from the stages

# (layer, name, order). Order: groups from left to right; a module may import the modules of earlier groups
# of its layer, never those of its own group or a later one. Names are relative to erprm_core ("" is the
# package itself; "tasks" is tasks/__init__.py).
LAYERS: list[tuple[int, str, list[list[str]]]] = [
    (0, "package", [[""]]),
    (
        1,
        "core",
        [
            ["steps"],
            ["labels"],
            ["grading"],
            ["io"],
            ["tasks._io"],
            ["tasks.arith"],
            ["tasks.arith_truth", "tasks.gsm8k", "tasks.math500"],
            ["tasks.math_train"],
            ["tasks"],
            ["models", "prefix_tree", "tiny_lm"],
            ["stats"],
            ["evaluators"],
            ["prm"],
            ["training"],
            ["sampler"],
            ["rollouts"],
            ["raft"],
            ["processbench"],
        ],
    ),
    (
        2,
        "generation",
        [
            ["generation.prefix_cache"],
            ["generation.lean_decode"],
            ["generation.hf", "generation.vllm"],
            ["generation"],
        ],
    ),
    (
        3,
        "report",
        [
            ["report"],
            ["report.style", "report.findings"],
            ["report.intervals"],
            ["report.figures"],
            ["report.summary"],
        ],
    ),
    (
        4,
        "running-base",
        [
            ["running"],
            ["running.numerics"],
            ["running.workers"],
            ["running.artifacts", "running.reproducibility"],
            ["running.config"],
        ],
    ),
    (
        5,
        "stages",
        [
            ["stages"],
            ["stages._common"],
            ["stages.bon_tables", "stages.raft_tables", "stages.raft_models", "stages.processbench_eval"],
            ["stages.bon_pool"],
            [
                "stages.policy",
                "stages.rollouts",
                "stages.labels",
                "stages.train_prm",
                "stages.best_of_n",
                "stages.raft",
                "stages.figures",
                "stages.processbench",
            ],
        ],
    ),
    (
        6,
        "running-top",
        [
            ["running.pipeline"],
            ["running.dryrun"],
            ["running.costs", "running.processbench_cmd", "running.bench", "running.seeds"],
            ["running.cli"],
        ],
    ),
]

# Modules of the layout before the layers (issue 13); none may come back.
OLD_MODULES = [
    "artifacts",
    "costs",
    "dryrun",
    "evaluation",
    "numerics",
    "pipeline",
    "plotting",
    "report",
    "reproducibility",
    "sampling",
]


def full_name(short: str) -> str:
    """``"running.cli"`` -> ``"erprm_core.running.cli"``; ``""`` -> ``"erprm_core"``."""
    return f"{PACKAGE}.{short}" if short else PACKAGE


@dataclass(frozen=True)
class Place:
    """Where a module sits: its layer (number and name) and its group's index in the layer's order."""

    layer: int
    layer_name: str
    group: int

    def __str__(self) -> str:
        return f"layer {self.layer} {self.layer_name}"


def places(layers: list[tuple[int, str, list[list[str]]]] = LAYERS) -> dict[str, Place]:
    """Full module name -> its :class:`Place`."""
    out = {}
    for layer, name, groups in layers:
        for index, group in enumerate(groups):
            for short in group:
                out[full_name(short)] = Place(layer, name, index)
    return out


@dataclass(frozen=True)
class Import:
    """One import of an erprm_core module, resolved to the module it loads."""

    where: str  # file:line
    module: str
    target: str
    in_function: bool


@dataclass(frozen=True)
class Function:
    """One function or method and its length (``def`` line to last line)."""

    where: str
    name: str
    lines: int


@dataclass
class Scan:
    """What the checks need of a source tree: imports, functions and each module's line count."""

    modules: dict[str, int] = field(default_factory=dict)  # module -> lines
    files: dict[str, str] = field(default_factory=dict)  # module -> file shown in messages
    imports: list[Import] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module in ``path`` (a file under the package folder ``root``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, shown: str, known: set[str], scan: Scan):
        self.module, self.is_package, self.shown, self.known, self.scan = (
            module,
            is_package,
            shown,
            known,
            scan,
        )
        self.stack: list[str] = []  # enclosing classes and functions
        self.depth = 0  # enclosing functions

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        name = ".".join([*self.stack, node.name])
        lines = node.end_lineno - node.lineno + 1
        self.scan.functions.append(Function(f"{self.shown}:{node.lineno}", name, lines))
        self.stack.append(node.name)
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def _add(self, node: ast.stmt, target: str) -> None:
        where = f"{self.shown}:{node.lineno}"
        self.scan.imports.append(Import(where, self.module, target, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the module's package, one level up per extra dot
            parts = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join([*parts, *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        if base != PACKAGE and not base.startswith(PACKAGE + "."):
            return
        targets = []
        for alias in node.names:  # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod
            sub = f"{base}.{alias.name}"
            targets.append(sub if sub in self.known else base)
        for target in dict.fromkeys(targets):
            self._add(node, target)


def scan(root: Path = ROOT, layers: list[tuple[int, str, list[list[str]]]] = LAYERS) -> Scan:
    """Parse every module under the package folder ``root``."""
    out = Scan()
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files} | set(places(layers))
    for path in files:
        module = module_name(path, root)
        shown = f"{PACKAGE}/{path.relative_to(root).as_posix()}"
        text = path.read_text(encoding="utf-8")
        out.modules[module] = len(text.splitlines())
        out.files[module] = shown
        tree = ast.parse(text, filename=shown)
        _Visitor(module, path.name == "__init__.py", shown, known, out).visit(tree)
    return out


# ----------------------------------------------------------------------------------------------------
# The checks: each returns one message per violation, naming file:line
# ----------------------------------------------------------------------------------------------------


def unlisted_modules(s: Scan, layers=LAYERS) -> list[str]:
    """Modules that have no place in the layer table, and modules of the old layout that exist again."""
    where = places(layers)
    old_files = {f"{PACKAGE}/{old}.py" for old in OLD_MODULES}  # report/ is a package now: not old
    out = []
    for m, shown in s.files.items():
        if shown in old_files:
            out.append(
                f"{shown}:1: {m} is a module of the layout before the layers (issue 13); "
                "its code lives in the layered modules now"
            )
        elif m not in where:
            out.append(
                f"{shown}:1: module {m} has no layer: add it to LAYERS in tests/test_layers.py and to the "
                "'Layers' section of docs/design.md"
            )
    return out


def layer_violations(s: Scan, layers=LAYERS) -> list[str]:
    """Imports of a higher layer (upward), of a module at the same place or to the right in the same layer,
    and of modules that do not exist."""
    where = places(layers)
    out = []
    for imp in s.imports:
        if imp.target == imp.module or imp.module not in where:
            continue  # an unlisted importer is reported by unlisted_modules
        if imp.target not in where:
            if imp.target not in s.modules:
                out.append(f"{imp.where}: {imp.module} imports {imp.target}, which does not exist")
            continue
        mine, theirs = where[imp.module], where[imp.target]
        if theirs.layer > mine.layer:
            out.append(
                f"{imp.where}: {imp.module} ({mine}) imports {imp.target} ({theirs}): an upward import"
            )
        elif theirs.layer == mine.layer and theirs.group >= mine.group:
            side = "at the same place as" if theirs.group == mine.group else "to the right of"
            out.append(
                f"{imp.where}: {imp.module} imports {imp.target}, which is {side} it in the order of "
                f"{mine}: a module may import only modules to its left"
            )
    return out


def inner_imports(s: Scan) -> list[str]:
    """Every erprm_core import inside a function."""
    return [f"{i.where}: {i.module} imports {i.target} inside a function" for i in s.imports if i.in_function]


def long_functions(s: Scan, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (and methods) longer than ``limit`` lines."""
    return [
        f"{f.where}: function {f.name} has {f.lines} lines (limit {limit})"
        for f in s.functions
        if f.lines > limit
    ]


def large_modules(s: Scan, limit: int = MAX_MODULE_LINES) -> list[str]:
    """Modules longer than ``limit`` lines."""
    return [f"{s.files[m]}:1: {n} lines (limit {limit})" for m, n in s.modules.items() if n > limit]


def core_lines(s: Scan, layers=LAYERS) -> int:
    """Lines of all core (layer 1) modules, tasks included."""
    where = places(layers)
    return sum(n for m, n in s.modules.items() if m in where and where[m].layer == 1)


# ----------------------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> Scan:
    return scan()


def _report(messages: list[str], what: str) -> str:
    return f"{len(messages)} {what}:\n" + "\n".join(messages)


def test_every_module_has_a_layer(tree):
    messages = unlisted_modules(tree)
    assert not messages, _report(messages, "module(s) outside the layer table")


def test_imports_follow_the_layers(tree):
    messages = layer_violations(tree)
    assert not messages, _report(messages, "import(s) against the layers (docs/design.md 'Layers')")


def test_few_imports_inside_functions(tree):
    messages = inner_imports(tree)
    assert len(messages) <= MAX_INNER_IMPORTS, _report(
        messages, f"erprm_core imports inside functions (limit {MAX_INNER_IMPORTS}, target 0)"
    )


def test_no_function_too_long(tree):
    messages = long_functions(tree)
    assert not messages, _report(messages, "function(s) too long")


def test_no_module_too_large(tree):
    messages = large_modules(tree)
    assert not messages, _report(messages, "module(s) too large")


def test_core_stays_small(tree):
    where = places()
    sizes = {tree.files[m]: n for m, n in tree.modules.items() if m in where and where[m].layer == 1}
    total = core_lines(tree)
    assert total < MAX_CORE_LINES, f"the core layer has {total} lines (limit {MAX_CORE_LINES - 1}): {sizes}"


# ----------------------------------------------------------------------------------------------------
# The checks themselves, on fake trees: each rule fails, naming file:line
# ----------------------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Scan:
    root = tmp_path / PACKAGE
    for name, text in {"__init__.py": '"""x"""\n', **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(root)


def test_upward_import_is_reported(tmp_path):
    s = _tree(tmp_path, {"labels.py": "x = 1\n\nfrom erprm_core.running import cli\n"})
    (message,) = layer_violations(s)
    assert message.startswith("erprm_core/labels.py:3: erprm_core.labels (layer 1 core) imports")
    assert "erprm_core.running.cli (layer 6 running-top): an upward import" in message


def test_right_to_left_import_in_a_layer_is_reported(tmp_path):
    s = _tree(
        tmp_path,
        {
            "steps.py": "def f():\n    from erprm_core import labels\n",
            "labels.py": "from erprm_core import steps\n",
            "running/__init__.py": "",
            "running/config.py": "from erprm_core.running import artifacts, numerics\n",
            "running/artifacts.py": "from . import reproducibility\n",  # same group: not allowed either
            "running/numerics.py": "",
            "running/reproducibility.py": "",
        },
    )
    messages = layer_violations(s)
    assert len(messages) == 2
    assert messages[0].startswith("erprm_core/running/artifacts.py:1: erprm_core.running.artifacts imports")
    assert "at the same place as it in the order of layer 4 running-base" in messages[0]
    assert messages[1].startswith(
        "erprm_core/steps.py:2: erprm_core.steps imports erprm_core.labels, which is"
    )
    assert "to the right of it in the order of layer 1 core" in messages[1]


def test_imports_under_type_checking_count(tmp_path):
    code = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from erprm_core.report import style\n"
    (message,) = layer_violations(_tree(tmp_path, {"prm.py": code}))
    assert message.startswith("erprm_core/prm.py:4:") and "upward" in message


def test_missing_and_unlisted_modules_are_reported(tmp_path):
    s = _tree(
        tmp_path, {"raft.py": "from erprm_core.artifacts import paths\n", "extra.py": "", "pipeline.py": ""}
    )
    (missing,) = layer_violations(s)
    assert (
        missing == "erprm_core/raft.py:1: erprm_core.raft imports erprm_core.artifacts, which does not exist"
    )
    unlisted = unlisted_modules(s)
    assert len(unlisted) == 2
    assert any(m.startswith("erprm_core/extra.py:1: module erprm_core.extra has no layer") for m in unlisted)
    assert any(
        m.startswith("erprm_core/pipeline.py:1: erprm_core.pipeline is a module of the layout")
        for m in unlisted
    )


def test_more_than_ten_imports_inside_functions_fail(tmp_path):
    body = "".join(f"def f{i}():\n    from erprm_core import steps\n\n\n" for i in range(11))
    messages = inner_imports(_tree(tmp_path, {"labels.py": body}))
    assert len(messages) == 11 > MAX_INNER_IMPORTS
    assert (
        messages[0] == "erprm_core/labels.py:2: erprm_core.labels imports erprm_core.steps inside a function"
    )
    with pytest.raises(AssertionError, match="11 erprm_core imports inside functions"):
        test_few_imports_inside_functions(_tree(tmp_path, {"labels.py": body}))


def test_long_function_large_module_and_large_core_fail(tmp_path):
    long_function = "class A:\n    def f(self):\n" + "        x = 1\n" * 100  # 101 lines from `def`
    s = _tree(
        tmp_path, {"models.py": long_function, "grading.py": "x = 1\n" * 801, "io.py": "x = 1\n" * 4224}
    )
    assert long_functions(s) == ["erprm_core/models.py:2: function A.f has 101 lines (limit 100)"]
    assert large_modules(s) == [
        "erprm_core/grading.py:1: 801 lines (limit 800)",
        "erprm_core/io.py:1: 4224 lines (limit 800)",
    ]
    assert core_lines(s) == 102 + 801 + 4224 >= MAX_CORE_LINES
    with pytest.raises(AssertionError, match="the core layer has 5127 lines"):
        test_core_stays_small(s)
