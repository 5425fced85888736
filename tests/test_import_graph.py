"""The package's import graph: no module imports one that imports it back, and the trainer
side never reaches the engine.

Parsed with ``ast`` (nothing is imported), counting imports anywhere in a module, inside
functions too; only ``if TYPE_CHECKING:`` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vllm_lora_hotswap", "trl_callbacks")
# The trainer side: what a trainer process imports. Neither these nor anything they import
# inside the package may import vllm_lora_hotswap.engine.
TRAINER_ROOTS = ("trl_callbacks", "vllm_lora_hotswap.client", "vllm_lora_hotswap.weights.trainer")
ENGINE = "vllm_lora_hotswap.engine"


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (a ``from X import y`` counts X.y where that is a
    module, else X)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    targets: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                source = ".".join(parent + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                targets.add(candidate if candidate in modules else source)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    resolved = set()
    for target in targets:
        # An import of a.b.c names a.b.c if it is a module here, else its nearest module parent.
        parts = target.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts and ".".join(parts) != name:
            resolved.add(".".join(parts))
    return resolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_one_cycle(graph, set(component)) for component in components]


def _one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    # Breadth-first from start back to start inside the component: the shortest cycle.
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    return sorted(component)


def _reachable(graph: dict[str, set[str]], roots: list[str]) -> dict[str, list[str]]:
    """Every module reachable from roots, with the import chain that reaches it."""
    chains = {root: [root] for root in roots}
    frontier = list(roots)
    while frontier:
        node = frontier.pop()
        for successor in sorted(graph.get(node, ())):
            if successor not in chains:
                chains[successor] = chains[node] + [successor]
                frontier.append(successor)
    return chains


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "vllm_lora_hotswap.pipeline.controller" in graph
    assert "vllm_lora_hotswap.store" in graph["vllm_lora_hotswap.pipeline.controller"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_trainer_side_never_imports_the_engine():
    graph = _graph()
    roots = [name for name in graph if any(name == root or name.startswith(root + ".") for root in TRAINER_ROOTS)]
    assert "vllm_lora_hotswap.client" in roots and "trl_callbacks" in roots
    chains = _reachable(graph, roots)
    offending = [
        " -> ".join(chain)
        for module, chain in sorted(chains.items())
        if module == ENGINE or module.startswith(ENGINE + ".")
    ]
    assert not offending, "trainer side imports the engine: " + "; ".join(offending)
