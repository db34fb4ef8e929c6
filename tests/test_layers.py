"""The layers, enforced: ``common`` is below both daemons, the daemons never import each other, the CLI sits on top,
and no module imports (directly or through others) a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "coordinator", "participant", "cohort_cli")
# What each package may import from the project (itself always).
ALLOWED = {
    "common": {"common"},
    "coordinator": {"common", "coordinator"},
    "participant": {"common", "participant"},
    "cohort_cli": {"common", "coordinator", "participant", "cohort_cli"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "proto" in path.relative_to(ROOT).parts[:2]:
                continue  # generated code
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_respect_the_layers(module: str) -> None:
    package = module.split(".")[0]
    # Every import counts here, including those inside functions: a lazy import is still a dependency.
    wrong = sorted(
        n for n in _imports(MODULES[module], top_level_only=False) if n.split(".")[0] not in ALLOWED[package]
    )
    assert not wrong, f"{module} ({package}) may import only {sorted(ALLOWED[package])}, imports {wrong}"


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for name in _imports(path, top_level_only=True):
            # "from a.b import c" is module a.b.c when that is a module, else the name c in module a.b.
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets

    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
