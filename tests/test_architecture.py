"""The shape of the code (docs/architecture.md): imports run one way, modules stay small.

Read from the source with ``ast`` (nothing is imported): a function-level import counts like a
module-level one, since it runs when the function does.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
#: modules allowed past MAX_LINES, each one cohesive thing (see docs/architecture.md)
MAX_LINES = 500
LARGE_BY_DESIGN: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "pfp").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(path: Path, package: str) -> set[str]:
    """Every dotted name ``path`` imports, relative imports resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (a package's ``__init__`` re-exporting its children excluded)."""
    graph = {}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = {_resolve(name) for name in imported_names(path, package)}
        graph[module] = {target for target in targets if target and target != module
                         and not (path.name == "__init__.py" and target.startswith(module + "."))}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle_in_the_library():
    assert not _cycles(import_graph())


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_small():
    large = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()
             if len(path.read_text().splitlines()) > MAX_LINES and module not in LARGE_BY_DESIGN}
    assert not large, f"modules over {MAX_LINES} lines (split them, or say why in LARGE_BY_DESIGN): {large}"


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    return seen - {start}


def _third_party(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return {name.split(".")[0] for name in imported_names(path, package) if not name.startswith("pfp")}


@pytest.mark.parametrize("leaf", ["pfp.spec", "pfp.backends.tvm.targets"])
def test_leaf_modules_import_no_project_module(leaf):
    assert not import_graph()[leaf]


def test_stage_logic_uses_predictors_through_the_interface():
    graph = import_graph()
    stages = [module for module in MODULES if module.startswith("pfp.stages.")]
    assert stages, "no stage modules under pfp.stages"
    for module in stages:
        assert "tvm" not in _third_party(module), f"{module} imports TVM itself"
        assert not {m for m in graph[module] if m.startswith("pfp.backends.tvm")}, f"{module} imports the TVM backend"


def test_the_runtime_side_imports_no_torch():
    graph = import_graph()
    for module in ("pfp.backends.base", "pfp.backends.tvm.runtime"):
        reached = {module} | _reaches(graph, module)
        users = sorted(m for m in reached if {"torch", "pyro"} & _third_party(m))
        assert not users, f"{module} reaches torch or pyro through {users}"


def test_the_deployed_runtime_imports_only_numpy_and_tvm_ffi():
    """src/pfp_runtime goes to boards and servers on its own: no pfp, torch, tvm compiler, scipy (PIL only for PNG files)."""
    allowed = {"numpy", "tvm_ffi", "pfp_runtime", "__future__"}
    offenders = {}
    for path in sorted((ROOT / "src" / "pfp_runtime").glob("*.py")):
        found = {name.split(".")[0] for name in imported_names(path, "pfp_runtime")}
        stdlib = {name for name in found if name in sys.stdlib_module_names}
        extra = found - allowed - stdlib - ({"PIL"} if path.name == "images.py" else set())
        if extra:
            offenders[path.name] = sorted(extra)
    assert not offenders, f"pfp_runtime imports {offenders}"


def test_no_test_imports_a_stage_script_or_another_test_module():
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        rel = path.relative_to(ROOT)
        package = ".".join(rel.with_suffix("").parts[:-1])
        for name in imported_names(path, package):
            last = name.split(".")
            if last[0] == "tasks" or (last[0] == "tests" and any(part.startswith("test_") for part in last)):
                offenders.append(f"{rel}: {name}")
    assert not offenders
