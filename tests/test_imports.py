"""The package's import graph: no cycle, the layers point down, no private name crosses a module boundary.

The graph is read from the source with ``ast`` (nothing is imported): every ``import``/``from ... import`` of a
``blindsight`` module, at module level or inside a function, relative or absolute. Importing ``a.b.c`` also runs
the ``__init__`` of package ``a.b`` unless the importing module is already inside it, so that is an edge too.
"""

from __future__ import annotations

import ast
import os

import blindsight

ROOT = os.path.dirname(os.path.abspath(blindsight.__file__))
PACKAGE = "blindsight"


def _modules() -> dict[str, str]:
    """``{module name: file}`` of every module of the package (a package's name is its ``__init__``)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([PACKAGE, *parts])] = os.path.join(folder, name)
    return out


def _is_package(module: str, files: dict[str, str]) -> bool:
    return files[module].endswith("__init__.py")


def _imports(module: str, files: dict[str, str]) -> list[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for each import of a package module in ``module``."""
    tree = ast.parse(open(files[module], encoding="utf-8").read(), files[module])
    here = module if _is_package(module, files) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in files:  # ``from .pkg import module``: an edge to the module itself
                    out.append((sub, [], node.lineno))
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                out.append((target, plain, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's modules."""
    files = _modules()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module in files:
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        for target, _, _ in _imports(module, files):
            while target not in files and "." in target:  # ``import blindsight.x.y`` of a name, not a module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            for i in range(2, len(parts)):  # the packages on the way that are not already being imported
                package = ".".join(parts[:i])
                if package not in ancestors:
                    graph[module].add(package)
            if target != module:
                graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
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


def test_the_graph_is_read():
    graph = import_graph()
    assert "blindsight.fx.sites" in graph["blindsight.fx.runtime"]
    assert "blindsight.categories" in graph["blindsight.profile"]
    assert "blindsight.tools.bench" in graph["blindsight.tools.cli"]  # a function-level import counts
    assert "blindsight.fx" in graph["blindsight.attention"]  # importing fx.options runs fx/__init__


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down():
    """The core never imports the tools (cli, bench, demo, ...) nor the shipped model; the model only the core.
    ``python -m blindsight`` (``__main__``) is the command line's entry point."""
    graph = import_graph()
    tools, zoo = f"{PACKAGE}.tools", f"{PACKAGE}.zoo"
    for module, targets in graph.items():
        if module.startswith(tools) or module == f"{PACKAGE}.__main__":
            continue
        up = sorted(t for t in targets if t.startswith(tools) or (t.startswith(zoo) and not module.startswith(zoo)))
        assert not up, f"{module} imports {up}"


def test_no_private_name_crosses_modules():
    files = _modules()
    crossings = []
    for module in files:
        for target, names, line in _imports(module, files):
            if target == module:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                crossings.append(f"{files[module]}:{line}: {module} imports {private} from {target}")
    assert not crossings, "\n".join(crossings)
