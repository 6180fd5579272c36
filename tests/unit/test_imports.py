"""The import graph of genrun (read with the standard library's ast, every import statement, top-level or inside a
function): no cycles, the worker never imports the operator, and the contract imports neither.

Known exceptions are listed, each with its owner; the lists must match exactly, so the test fails when a new one
appears and when a listed one is fixed (then delete its line)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# No known cycle; a new one fails this test (list it here only with an owner and a reason).
KNOWN_CYCLES: list[list[str]] = []


def import_graph() -> dict[str, set[str]]:
    files = {
        f"genrun.{pkg}" + ("" if p.stem == "__init__" else f".{p.stem}"): p
        for pkg in ("contract", "operator", "worker")
        for p in (ROOT / pkg).glob("*.py")
    }
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycles_finds_a_cycle_and_only_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the modules were found
    assert cycles(graph) == KNOWN_CYCLES


def test_the_worker_never_imports_the_operator() -> None:
    graph = import_graph()
    edges = {(a, b) for a, bs in graph.items() if a.startswith("genrun.worker") for b in bs}
    assert {(a, b) for a, b in edges if b.startswith("genrun.operator")} == set()
    assert ("genrun.worker.cli", "genrun.contract.api") in edges  # the worker reads the spec through the contract


def test_the_contract_imports_neither_side() -> None:
    graph = import_graph()
    assert "genrun.contract.api" in graph
    assert {
        b
        for a, bs in graph.items()
        if a.startswith("genrun.contract")
        for b in bs
        if not b.startswith("genrun.contract")
    } == set()
