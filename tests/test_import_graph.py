"""The packages' import graph: no circles, and no arrow back up ``storage <- extractor <-
aggregator <- api``.

Every ``import`` in every module counts, wherever it stands: at module level, under
``TYPE_CHECKING``, or inside a function (a function-local import hides a circle from the
interpreter, not from a reader). The benchmarks sit above ``api``: nothing imports them, and they
must not import each other in a circle either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("storage", "extractor", "aggregator", "api", "benchmarks")  # lower first


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, list[str]]]:
    """``(target, names)`` of every import statement in ``tree``, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, target] if target else base)
            yield target, [alias.name for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this repository it imports (``from pkg import mod`` names the
    submodule ``pkg.mod`` when there is one)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for target, names in _imported(tree, name, path.name == "__init__.py"):
            if name.startswith("benchmarks.") and f"benchmarks.{target}" in modules:
                target = f"benchmarks.{target}"  # the scripts import each other by bare name
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if subs:
                edges.update(subs)
            if len(subs) < len(names) or not names:
                # the package (or module) itself, or its nearest enclosing one of ours
                parts = target.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts:
                    edges.add(".".join(parts))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_the_walk_sees_every_kind_of_import() -> None:
    """A function-local, a TYPE_CHECKING and a relative import all count (a walk that missed
    them could never fail)."""
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from storage.index import IndexTable\n"
        "def f():\n    import extractor.sources\n    from . import layout\n"
    )
    found = dict(_imported(ast.parse(src), "storage.store", False))
    assert found == {
        "typing": ["TYPE_CHECKING"],
        "storage.index": ["IndexTable"],
        "extractor.sources": [],
        "storage": ["layout"],
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles() -> None:
    graph = import_graph()
    assert "storage.store" in graph and "api.cli" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_imports_flow_one_way() -> None:
    """``storage <- extractor <- aggregator <- api <- benchmarks``: no module imports one from a
    higher layer."""
    upward = sorted(
        f"{src} -> {dst}"
        for src, dsts in import_graph().items()
        for dst in dsts
        if _layer(dst) > _layer(src)
    )
    assert not upward, "imports against the layering: " + ", ".join(upward)
