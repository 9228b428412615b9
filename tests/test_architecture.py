"""The package's shape: imports flow one way down the pipeline, as each subpackage's docstring says.

Every subpackage's `__init__.py` states its job and, on a line `Imports: a, b, c.`, the parts of distributed_peft it may
import (`Imports: anything in distributed_peft.` for cli/, the top). This test reads those lines and every import
statement in the package (module level and inside functions alike), so the docstrings and the code cannot drift.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distributed_peft"
ROOT_MODULES = {"__init__", "errors", "constants"}  # importable by every part; they import nothing of ours
RESOURCES = {"conf", "launch", "adapters_prebuilt", "sample_corpora", "resources"}  # data the package ships


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every distributed_peft module that `path` imports, wherever the import statement sits."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distributed_peft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distributed_peft"):
            found |= {
                f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module for a in node.names
            }
    return found


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part_of(module: str) -> str:
    """The top-level part of the package a module belongs to: a subpackage or a root module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if not ({"conf", "launch"} & set(p.parts))}


def allowed_imports(subpackage: str) -> set[str] | None:
    """The parts a subpackage's docstring allows (its own always); None: anything."""
    doc = ast.get_docstring(ast.parse((PACKAGE / subpackage / "__init__.py").read_text())) or ""
    line = re.search(r"^Imports: (.*?)\.?$", doc, re.M)
    assert line, f"distributed_peft/{subpackage}/__init__.py: its docstring has no 'Imports: ...' line"
    if line.group(1).startswith("anything"):
        return None
    named = {name.strip() for name in line.group(1).split(",")}
    return named | {subpackage}


SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py") if p.parent.name not in RESOURCES)


def test_the_top_level_shows_the_pipeline():
    """Modules live in their stage's subpackage; only the shared root modules sit beside them."""
    loose = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ROOT_MODULES)
    assert not loose, f"modules outside a subpackage: {loose}"
    assert {"runtime", "config", "data", "modeling", "adapters", "evaluation", "training", "serving", "cli"} <= set(
        SUBPACKAGES
    )


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_a_subpackage_imports_only_what_its_docstring_allows(subpackage):
    allowed = allowed_imports(subpackage)
    if allowed is None:
        return
    allowed |= ROOT_MODULES
    wrong = [
        f"{module} imports {target}"
        for module, path in source_files().items()
        if part_of(module) == subpackage
        for target in sorted(imported_modules(path))
        if part_of(target) not in allowed and part_of(target) not in RESOURCES - {"conf"}
    ]
    assert not wrong, "\n".join(wrong)


def test_the_allowed_imports_form_one_order_with_cli_at_the_top():
    """No two parts may import each other, and nothing below cli imports cli: the docstrings describe layers."""
    rules = {s: allowed_imports(s) for s in SUBPACKAGES}
    for name, allowed in rules.items():
        for other in allowed or ():
            if other != name and other in rules and rules[other] is not None:
                assert name not in rules[other], f"{name} and {other} may import each other"
    assert all(allowed is None or "cli" not in allowed for name, allowed in rules.items() if name != "cli")


def test_root_modules_and_shipped_resources_import_nothing_of_ours():
    files = source_files()
    for module, path in files.items():
        if part_of(module) in ROOT_MODULES | (RESOURCES - {"conf"}):
            outside = {t for t in imported_modules(path) if part_of(t) != part_of(module)}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_no_import_cycles_between_modules():
    """Module-level graph over every import statement (lazy ones included): a cycle is a knot to untie, not hide."""
    files = source_files()
    graph = {m: {t for t in imported_modules(p) if t in files and t != m} for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph = {m: {t for t in targets if t not in packages} for m, targets in graph.items()}  # re-export facades
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            visit(node)
    return found
