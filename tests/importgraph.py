"""The import graph of our packages, read from the AST (every ``import`` statement, at module level
or inside a function), for the boundary test."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """``{"pkg.sub.mod": path}`` for every ``.py`` file under each package folder of ``root``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(module: str, path: Path, tree: ast.AST) -> Iterable[tuple[str, int, bool]]:
    """(name, line, whether the name may be an attribute rather than a module)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield base, node.lineno, False
            for alias in node.names:  # "from pkg import sub" imports pkg.sub when it is a module
                yield f"{base}.{alias.name}", node.lineno, True


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, dict[str, int]]:
    """``{module: {imported: first line}}``: a module of ours by its full name (``import a.b``
    and ``from a.b import C`` -> ``a.b``; a name of ours that no file holds stays as written),
    anything else by its top-level package (``torch.nn`` -> ``torch``)."""
    packages = tuple(packages)
    files = module_files(root, packages)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line, maybe_attribute in _imported_names(module, path, tree):
            if maybe_attribute and name not in files:
                continue
            target = name if name.split(".")[0] in packages else name.split(".")[0]
            if target and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Every group of our modules that import each other in a circle (strongly connected
    components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, [w for w in graph[start] if w in graph])]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, [w for w in graph[nxt] if w in graph]))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return sorted(found)
