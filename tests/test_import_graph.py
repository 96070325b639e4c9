"""No import circles: between our modules, imports inside functions counted too, and between packages.

A circle works until someone moves an import; then it is an ImportError at start-up, or a module
half-initialised. The rollout engines take what they need from the policy they are handed, never
from grpoflow.train; the rewards take ConfigError from grpoflow.errors, not from the config that
loads them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpoflow", "stages", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for base in PACKAGES:
        for path in (ROOT / base).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports, anywhere in it (a function's import is an edge too)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
            named.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule by name
    edges = set()
    for name in named:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            edges.add(name)
    return edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """stages, flows, a subpackage of grpoflow (grpoflow.train), or a module of grpoflow's own (grpoflow.cli)."""
    parts = module.split(".")
    if parts[0] != "grpoflow":
        return parts[0]
    return ".".join(parts[:2])


def test_no_module_imports_itself_round_a_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert circles(graph) == []


def test_no_two_packages_import_each_other():
    known = modules()
    edges = {(package_of(a), package_of(b)) for a, path in known.items() for b in imports(path, known)
             if package_of(a) != package_of(b)}
    both_ways = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert both_ways == [], both_ways


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
