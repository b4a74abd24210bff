"""The house rules of ``flow/`` that a reader relies on, checked on the source itself.

The layers (which module may import which) are checked by ``lint-imports`` in the test
command (see ``[tool.importlinter]`` in pyproject.toml); these tests check what it cannot:
imports hidden inside functions, and units too long to read.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

FLOW = Path(__file__).resolve().parents[1] / "flow"
MAX_FUNCTION_LINES = 80  # code lines: from the first statement after the docstring
MAX_MODULE_LINES = 800

#: Imports allowed inside functions: optional dependencies (not in flow's requirements), each
#: imported only where it is used, so flow works without them; and matplotlib, whose import
#: (~0.4 s) only the plots pay, not every ``flow`` command; and distributed (~0.4 s, with
#: flow._distributed, its subclasses of distributed's classes), which only commands that use
#: a cluster pay (flow.cluster), not those run on threads.
OPTIONAL = frozenset(
    {"psutil", "crick", "datasets", "tiledbsoma", "s3fs", "matplotlib", "distributed"}
)
LAZY_FLOW_MODULES = frozenset({"._distributed"})


def _modules() -> list[Path]:
    return sorted(p for p in FLOW.rglob("*.py"))


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its first statement after the docstring to its end."""
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    first = body[1] if has_doc and len(body) > 1 else body[0]
    return (fn.end_lineno or first.lineno) - first.lineno + 1


def _imported_top(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.ImportFrom):
        return {"." * node.level + (node.module or "")} if node.level else {node.module or ""}
    return {alias.name.split(".")[0] for alias in node.names}


def test_no_imports_inside_functions_but_optional_dependencies():
    found = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = {n.split(".")[0] for n in _imported_top(node)}
                    if not names <= OPTIONAL and not _imported_top(node) <= LAZY_FLOW_MODULES:
                        found.append(
                            f"{path.relative_to(FLOW.parent)}:{node.lineno} {sorted(names)}"
                        )
    assert found == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(FLOW.parent)))
def test_functions_and_modules_stay_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{fn.name} ({_code_lines(fn)} lines)"
        for fn in _functions(ast.parse(text))
        if _code_lines(fn) > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_rules_can_fail(tmp_path):
    """The checks above see what they look for (a local import, an 81-line function body)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f'def f():\n    """Doc."""\n    import numpy\n{body}\n')
    (fn,) = _functions(tree)
    assert _code_lines(fn) == MAX_FUNCTION_LINES + 1
    imports = [n for n in ast.walk(fn) if isinstance(n, ast.Import)]
    assert _imported_top(imports[0]) == {"numpy"}


def test_every_module_is_in_a_layer():
    """A module left out of the import contract would escape ``lint-imports`` silently."""
    config = tomllib.loads((FLOW.parent / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    names = {
        name.strip(" ()")
        for line in contract["layers"]
        for part in line.replace("|", ":").split(":")
        for name in [part]
    }
    modules = {
        ".".join(p.relative_to(FLOW.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in _modules()
    } - {"flow"}
    outside = sorted(m for m in modules if not any(m == n or m.startswith(n + ".") for n in names))
    assert outside == []
