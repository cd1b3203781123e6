"""The test suite's own layout: test modules share helpers through conftest.py, never by importing one another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every module an ``import`` or ``from ... import`` in ``tree`` names (nested ones too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 10, "the glob found the test modules"
    offenders = {path.name: sorted(name for name in imported_modules(ast.parse(path.read_text(), path.name))
                                   if name.startswith("test_"))
                 for path in modules}
    offenders = {name: imported for name, imported in offenders.items() if imported}
    assert not offenders, f"move shared helpers into tests/conftest.py; these test modules import others: {offenders}"


def test_the_layout_check_sees_plain_aliased_and_nested_imports():
    source = "import test_a\nimport test_b as b\nfrom test_c import x\ndef f():\n    from test_d import y\n"
    assert {"test_a", "test_b", "test_c", "test_d"} <= imported_modules(ast.parse(source))
    assert imported_modules(ast.parse("from conftest import make_batch\nfrom . import test_e\n")) == {"conftest"}
