"""The package's layering, read from the source: the core never imports the evaluation harness,
``exporters`` depends only on the core, and no module imports itself back through others.

Every ``import`` statement counts, also those inside functions: a lazy import is still a
dependency a user of the core would have to install and load.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ccpurify", "exporters")

# The evaluation harness (docs/design.md, "Layout"): what measures backdoors, not what removes them.
HARNESS = {
    "ccpurify.models",
    "ccpurify.data",
    "ccpurify.attacks",
    "ccpurify.train",
    "ccpurify.metrics",
    "ccpurify.evaluation",
    "ccpurify.defender",
    "ccpurify.demo",
    "ccpurify.cli",
}
# The package's front door re-exports both layers; it is neither.
FRONT = {"ccpurify"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def in_layer(name: str, layer: set[str]) -> bool:
    return any(name == top or name.startswith(top + ".") for top in layer)


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """The package modules ``name`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


CORE = sorted(m for m in MODULES if not in_layer(m, HARNESS) and m not in FRONT)


def test_the_layers_are_what_the_design_says():
    assert {
        "ccpurify.graph",
        "ccpurify.lowrank",
        "ccpurify.recipe",
        "ccpurify.cost",
        "ccpurify.distill",
        "ccpurify.passes.base",
        "ccpurify.io",
        "exporters.onnx",
    } <= set(CORE)
    assert "ccpurify.metrics" not in CORE and "ccpurify.models" not in CORE


@pytest.mark.parametrize("name", CORE)
def test_a_core_module_never_imports_the_harness(name):
    assert not {m for m in imports(name) if in_layer(m, HARNESS) or m in FRONT}, f"{name} imports the harness"


def test_there_is_no_import_circle():
    graph = {name: imports(name, top_level_only=True) for name in MODULES if name not in FRONT}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node)


def test_the_checker_sees_a_circle_and_a_harness_import(tmp_path, monkeypatch):
    """The two checks above can fail: a planted circle and a planted harness import are found."""
    fake = {"ccpurify.graph": tmp_path / "graph.py", "ccpurify.recipe": tmp_path / "recipe.py"}
    fake["ccpurify.graph"].write_text("from ccpurify.recipe import x\ndef f():\n    from ccpurify import metrics\n")
    fake["ccpurify.recipe"].write_text("from ccpurify.graph import y\n")
    monkeypatch.setattr(__import__(__name__), "MODULES", {**MODULES, **fake}, raising=True)
    assert "ccpurify.metrics" in imports("ccpurify.graph")
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_there_is_no_import_circle()
