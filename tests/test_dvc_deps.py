"""dvc.yaml lists, for each stage, exactly the project modules its command imports.

A module a stage imports but does not list leaves its recorded results stale after an edit
(``dvc repro`` says nothing); a listed module it does not import, or a whole folder, forces
needless re-runs. The closure is computed from the code: every ``import`` of a project module
(``pfp``, ``tasks``, ``flows``) anywhere in a module, function-level imports included, plus the
``__init__`` of every package on the way (it runs on import) unless it holds only a docstring and
constants.

``python -m tests.test_dvc_deps`` prints each stage's closure, ready to paste into dvc.yaml.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("pfp", "pfp_runtime", "tasks", "flows")
CODE_ROOTS = ("src/", "tasks/", "flows/")


def _module_file(name: str) -> Path | None:
    for root in (ROOT / "src", ROOT):
        base = root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "src":
        parts = parts[1:]
    return parts[:-1]  # a module's package; for an __init__, the package itself


def _imports(path: Path) -> set[Path]:
    """Project module files ``path`` imports (and the packages on the way)."""
    package = _package_of(path)
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PROJECT_PACKAGES:
                continue
            for depth in range(1, len(parts) + 1):
                module = _module_file(".".join(parts[:depth]))
                if module is not None:
                    found.add(module)
    return found


def _inert(path: Path) -> bool:
    """A package ``__init__`` of a docstring and constants (e.g. ``__version__``): it changes no output."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, (ast.Expr, ast.Assign)) and isinstance(node.value, ast.Constant) for node in body)


def closure(entry_module: str) -> set[str]:
    """Repository-relative paths of every project module ``python -m entry_module`` imports."""
    start = _module_file(entry_module)
    if start is None:
        raise FileNotFoundError(f"entry module {entry_module} not found")
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imports(path) - seen)
    return {str(path.relative_to(ROOT)) for path in seen if not (path.name == "__init__.py" and _inert(path))}


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, a ``foreach`` stage once (its code deps do not depend on the item)."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


def entry_module(stage: dict) -> str:
    match = re.search(r"python -m (\S+)", stage["cmd"])
    assert match, f"stage command {stage['cmd']!r} does not run a project module"
    return match.group(1)


def listed_code(stage: dict) -> set[str]:
    return {dep for dep in stage.get("deps", []) if isinstance(dep, str) and dep.startswith(CODE_ROOTS)}


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_lists_exactly_the_modules_it_imports(name):
    stage = stages()[name]
    imported = closure(entry_module(stage))
    listed = listed_code(stage)
    folders = sorted(dep for dep in listed if (ROOT / dep).is_dir())
    assert not folders, f"{name}: list the modules, not folders: {folders}"
    missing, surplus = sorted(imported - listed), sorted(listed - imported)
    assert not missing and not surplus, f"{name}: imported but not listed {missing}; listed but not imported {surplus}"


def test_the_closure_follows_function_level_and_relative_imports(tmp_path):
    # tasks.report imports little; its closure must contain itself and what it imports, nothing under tests/
    imported = closure("tasks.report")
    assert "tasks/report.py" in imported
    assert all(path.startswith(CODE_ROOTS) for path in imported)
    with pytest.raises(FileNotFoundError):
        closure("tasks.no_such_stage")


if __name__ == "__main__":
    for stage_name, stage_def in stages().items():
        print(f"{stage_name}:")
        for path in sorted(closure(entry_module(stage_def))):
            print(f"  - {path}")
    sys.exit(0)
