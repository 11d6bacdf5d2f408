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
