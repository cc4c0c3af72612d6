"""Import cycles among the modules of a package, found by parsing their imports with ``ast``.

    python tools/import_cycles.py rose_kernels [--root DIR]

Every ``import a.b``, ``from a.b import c`` (``c`` counted as the module ``a.b.c`` when that is one
of the package's modules, compiled extensions included, else as ``a.b``) and relative import in
each ``.py`` file under the package is an edge from that module to the imported one. Importing
``a.b.c`` also runs ``a/__init__.py`` and ``a/b/__init__.py``, so it is an edge to each of those
packages too, unless the importer is inside that package already (then the package is loaded
before the importer). Only edges to the package's own modules count.

Two kinds of edge:

- module level: an import that runs when the module is loaded (at the top, or under ``if``/``try``
  at module level; not under ``if TYPE_CHECKING:``, which never runs). A cycle of these is a
  load-time cycle: exit status 1.
- lazy: an import inside a function or method, run when it is called. A cycle that needs at least
  one lazy edge cannot break loading; it is printed as "lazy" and does not change the exit status.

Printed: one cycle through each group of modules that import each other at module level (a
strongly connected component), and one cycle through each lazy import that closes one.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path


def extension_names(root: Path, package: str) -> dict[str, Path | None]:
    """The package's compiled extensions (no imports of their own): built ones (``*.so``, ``*.pyd``)
    and those ``setup.py`` declares (``CppExtension("pkg._C", ...)`` and the like), built or not."""
    found: dict[str, Path | None] = {}
    for pattern in ("*.so", "*.pyd"):
        for path in (root / package.replace(".", "/")).rglob(pattern):
            parts = [*path.relative_to(root).parent.parts, path.name.split(".")[0]]
            found[".".join(parts)] = None
    setup = root / "setup.py"
    if setup.is_file():
        for node in ast.walk(ast.parse(setup.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                name = node.args[0].value
                if func.endswith("Extension") and isinstance(name, str) and name.startswith(package + "."):
                    found[name] = None
    return found


def module_names(root: Path, package: str) -> dict[str, Path | None]:
    """Every module of ``package`` (found in ``root``): dotted name -> file (None: an extension)."""
    modules: dict[str, Path | None] = dict(extension_names(root, package))
    for path in sorted((root / package.replace(".", "/")).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module with whether it is lazy (inside a function)."""
    def visit(node: ast.AST, lazy: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, lazy
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                yield from (item for stmt in child.orelse for item in visit_one(stmt, lazy))
            else:
                inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
                yield from visit(child, inner)

    def visit_one(node: ast.AST, lazy: bool):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, lazy
        else:
            yield from visit(node, lazy)

    yield from visit(tree, False)


def _resolve(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> list[str]:
    """The package's modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
        base = ".".join([*anchor, base] if base else anchor)
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in modules else base)
    return targets


def _with_parents(target: str, importer: str, modules: dict) -> list[str]:
    """``a.b.c`` and the packages ``a``, ``a.b`` whose ``__init__`` it runs (those of the package's
    modules the importer is not inside already)."""
    parts = target.split(".")
    out = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in modules or name == importer:
            continue
        if i < len(parts) and (importer == name or importer.startswith(name + ".")):
            continue  # the importer's own enclosing package: loaded before the importer itself
        out.append(name)
    return out


def import_graph(root: Path, package: str) -> dict[str, dict[str, bool]]:
    """module -> {imported module: lazy?}; an edge is module level if any import of it is."""
    modules = module_names(root, package)
    graph: dict[str, dict[str, bool]] = {name: {} for name in modules}
    for name, path in modules.items():
        if path is None:
            continue  # a compiled extension
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, lazy in _imports(tree):
            for target in _resolve(node, name, path.name == "__init__.py", modules):
                for dep in _with_parents(target, name, modules):
                    graph[name][dep] = graph[name].get(dep, True) and lazy
    return graph


def _components(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, []):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in edges.get(v, []):
                found.append(sorted(component))

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in nodes:
        if v not in index:
            connect(v)
    return sorted(found)


def _path(start: str, goal: str, edges: dict[str, list[str]]) -> list[str] | None:
    """A shortest import path ``[start, ..., goal]`` (breadth first), or None."""
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        if v == goal:
            path = [v]
            while parents[path[-1]] is not None:
                path.append(parents[path[-1]])
            return path[::-1]
        for w in edges.get(v, []):
            if w not in parents:
                parents[w] = v
                queue.append(w)
    return None


def find_cycles(root: Path, package: str) -> tuple[list[list[str]], list[list[str]]]:
    """(module-level cycles, lazy cycles), each as a path ``[a, b, ..., a]``.

    One module-level cycle per strongly connected component of the module-level edges; one lazy
    cycle per lazy edge ``a -> b`` from which an import path (of any edges) leads back to ``a``."""
    graph = import_graph(root, package)
    nodes = sorted(graph)
    eager = {m: sorted(d for d, lazy in deps.items() if not lazy) for m, deps in graph.items()}
    every = {m: sorted(deps) for m, deps in graph.items()}
    eager_cycles = []
    for component in _components(nodes, eager):
        start = component[0]
        back = min((_path(w, start, eager) for w in eager[start] if w in component), key=len)
        eager_cycles.append([start, *back])
    lazy_cycles = []
    for a in nodes:
        for b in (d for d, lazy in sorted(graph[a].items()) if lazy):
            back = _path(b, a, every)
            if back is not None:
                lazy_cycles.append([a, *back])
    return eager_cycles, lazy_cycles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", help="the package's dotted name, e.g. rose_kernels")
    parser.add_argument("--root", default=".", help="the directory holding the package (default: .)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / args.package.replace(".", "/")).is_dir():
        parser.error(f"no package {args.package} in {root.resolve()}")
    eager, lazy = find_cycles(root, args.package)
    for cycle in eager:
        print("cycle: " + " -> ".join(cycle))
    for cycle in lazy:
        print("lazy cycle (an import inside a function; not a load-time cycle): " + " -> ".join(cycle))
    print(f"{len(eager)} module-level import cycle(s), {len(lazy)} lazy one(s) in {args.package}")
    return 1 if eager else 0


if __name__ == "__main__":
    sys.exit(main())
