"""The package layout's rules, read from the import statements of every module (issue 17).

Layers, lowest first: the single-run library (``ifsearch`` outside ``search/`` and
``tracking/``), ``ifsearch.tracking``, then ``ifsearch.search`` and ``trainables``; the entry
modules of the documented commands sit on top. Imports point down only, and no two modules
import each other, even through a chain or an import inside a function (an import deferred to
call time is still a circle a reader has to untangle). ``if TYPE_CHECKING:`` imports are left out:
they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ifsearch", "trainables")
# The documented commands' modules: thin, imported by nothing.
ENTRY_MODULES = {"ifsearch.launch", "ifsearch.export", "ifsearch.tracking_server",
                 "ifsearch.tracking.__main__"}
THIRD_PARTY_SERVICES = ("ray", "mlflow", "optuna")  # the library trains without them


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an import statement of ``source`` names, at any depth but TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is not a module is dropped)."""
    files = {module_name(path, root): path
             for pkg in PACKAGES for path in sorted((root / pkg).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named = imported_modules(path.read_text(), package)
        graph[name] = {m for m in named if m in files and m != name}
        graph[name] |= {m for m in named if m.split(".")[0] not in PACKAGES}  # third party
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among project modules, one path each (Tarjan's strongly connected
    components of size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer(module: str) -> str:
    if module in ENTRY_MODULES:
        return "entry"
    if _within(module, "ifsearch.search") or _within(module, "trainables"):
        return "search"
    if _within(module, "ifsearch.tracking"):
        return "tracking"
    return "library"


ALLOWED = {  # layer -> the project layers it may import
    "library": {"library"},
    "tracking": {"library", "tracking"},
    "search": {"library", "tracking", "search"},
    "entry": {"library", "tracking", "search"},
}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if target.split(".")[0] in PACKAGES:
                if layer(target) not in ALLOWED[layer(module)]:
                    problems.append(f"{module} ({layer(module)}) imports {target} "
                                    f"({layer(target)})")
                if target == "ifsearch.search.cli" and module != "ifsearch.launch":
                    problems.append(f"{module} imports the command-line module {target}")
            elif layer(module) == "library" and target.split(".")[0] in THIRD_PARTY_SERVICES:
                problems.append(f"{module} (library) imports {target}: the single-run library "
                                "runs without Ray, MLflow and Optuna")
    return problems


def test_no_module_imports_itself_through_a_circle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The rules above on a tiny package: they are not vacuous."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "ifsearch" / "search").mkdir()
    (tmp_path / "ifsearch" / "search" / "__init__.py").write_text("")
    (tmp_path / "ifsearch" / "config.py").write_text(
        "def f():\n    from ifsearch.search import sweep\n")  # library -> search, deferred
    (tmp_path / "ifsearch" / "search" / "sweep.py").write_text(
        "from ifsearch import config\nfrom . import cli\n")
    (tmp_path / "ifsearch" / "search" / "cli.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
        "from ifsearch.search.sweep import run\n")
    graph = import_graph(tmp_path)
    assert graph["ifsearch.search.cli"] == {"ifsearch.search.sweep", "typing",
                                            "typing.TYPE_CHECKING"}  # not ray: never runs
    assert cycles(graph) == [["ifsearch.config", "ifsearch.search.cli", "ifsearch.search.sweep"]]
    problems = layer_violations(graph)
    assert "ifsearch.config (library) imports ifsearch.search.sweep (search)" in problems
    assert ("ifsearch.search.sweep imports the command-line module ifsearch.search.cli"
            in problems)


@pytest.mark.parametrize("module", sorted(ENTRY_MODULES - {"ifsearch.tracking.__main__"}))
def test_each_entry_module_imports_alone_in_a_fresh_interpreter(module):
    """What the static checks cannot see: an import-time circle that only bites when a module
    is the first one imported."""
    run = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
