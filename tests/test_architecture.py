"""The dependency rules of the package layout, as tests (contracts in .importlinter)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "caa_local"


def test_import_contracts_hold() -> None:
    lint = pytest.importorskip("importlinter.cli")
    assert lint.lint_imports(config_filename=str(ROOT / ".importlinter")) == 0


def _native_importers() -> list[str]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [str(node.module)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any("_native" in name.split(".") for name in names):
                found.append(str(path.relative_to(PACKAGE)))
    return sorted(set(found))


def test_only_the_engine_package_imports_the_native_extension() -> None:
    # grimp cannot see extension modules, so this rule is checked on the syntax tree.
    outside = [p for p in _native_importers() if not p.startswith("engine/")]
    assert outside == []


def _private_uses(tree: ast.AST) -> list[str]:
    """``x._name`` where x is not self/cls, and ``from m import _name`` (a module's own
    ``_native`` extension inside the engine package aside)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) and \
                    ast.unparse(node) != "os._exit":
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom):
            found += [f"import {a.name} (line {node.lineno})" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_native"]
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    used = {str(p.relative_to(PACKAGE)): _private_uses(ast.parse(p.read_text(), str(p)))
            for p in PACKAGE.rglob("*.py")}
    assert {path: names for path, names in used.items() if names} == {}


def test_no_import_cycle() -> None:
    """No module reaches itself through imports (function-level ones included)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("caa_local")
    modules = sorted(graph.modules)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is how packages re-export, not a cycle.
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert real == []
