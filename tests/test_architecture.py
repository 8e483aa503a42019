"""The code's shape, checked on every run (docs/architecture.md, "Layers" and "Sizes"):

- no function in neti/ is longer than MAX_LINES, but for the named exceptions;
- no import inside a function, but for the deferred heavy dependencies, each with a comment
  saying why;
- no import cycle among neti's modules (import-linter's contracts, run by ``make test``,
  keep the layers; a package and its own modules are checked here too).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import grimp

NETI = Path(__file__).resolve().parent.parent / "neti"
MAX_LINES = 60

# Straight-line tables longer than MAX_LINES, named in docs/architecture.md ("Sizes").
LONG_ALLOWED: dict[str, str] = {}

# Imports that may sit in a function: heavy dependencies that only some commands use, whose
# import every `neti` command would otherwise pay. The line above must say why ("Deferred:").
DEFERRED = {"boto3", "botocore.config", "pyroute2", "pyroute2.netlink.exceptions"}


def _functions(
    tree: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def _modules() -> Iterator[tuple[str, list[str], ast.Module]]:
    for path in sorted(NETI.rglob("*.py")):
        text = path.read_text()
        yield path.relative_to(NETI).as_posix(), text.splitlines(), ast.parse(text)


def _length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    end = fn.end_lineno if fn.end_lineno is not None else fn.lineno
    return end - fn.lineno + 1


def test_no_function_is_longer_than_the_limit() -> None:
    long: dict[str, int] = {}
    for rel, _, tree in _modules():
        for name, fn in _functions(tree):
            if _length(fn) > MAX_LINES:
                long[f"{rel}::{name}"] = _length(fn)
    over = [
        f"{where} is {n} lines (at most {MAX_LINES}): split it"
        for where, n in sorted(long.items())
        if where not in LONG_ALLOWED
    ]
    stale = sorted(LONG_ALLOWED.keys() - long.keys())
    assert not over, "\n".join(over)
    assert not stale, f"no longer long, drop from the lists in this test: {stale}"


def _inner_imports(tree: ast.Module) -> Iterator[tuple[str, ast.Import | ast.ImportFrom]]:
    for _, fn in _functions(tree):
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, node
            elif isinstance(node, ast.ImportFrom):
                yield "." * node.level + (node.module or ""), node


def test_imports_sit_at_the_top_but_for_deferred_heavy_dependencies() -> None:
    found: dict[str, list[str]] = {}
    for rel, lines, tree in _modules():
        for module, node in _inner_imports(tree):
            where = f"neti/{rel}:{node.lineno}"
            if module not in DEFERRED:
                found.setdefault(rel, []).append(f"{where} imports {module} in a function")
                continue
            above = "\n".join(lines[max(0, node.lineno - 4) : node.lineno - 1])
            if "Deferred:" not in above:
                found.setdefault(rel, []).append(
                    f"{where} defers {module} without a '# Deferred: why' comment above"
                )
    bad = [msg for _, msgs in sorted(found.items()) for msg in msgs]
    assert not bad, "\n".join(bad)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work.append((root, iter(sorted(graph.find_modules_directly_imported_by(root)))))
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
                continue
            if child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return out


def test_no_import_cycles_in_neti() -> None:
    cycles = _cycles(grimp.build_graph("neti", cache_dir=None))
    assert not cycles, "modules that import each other (directly or not): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_finder_finds_a_package_and_its_module() -> None:
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "q"):
        graph.add_module(m)
    graph.add_import(importer="p", imported="p.a")
    graph.add_import(importer="p.a", imported="p")
    graph.add_import(importer="p.b", imported="q")
    assert _cycles(graph) == [["p", "p.a"]]
