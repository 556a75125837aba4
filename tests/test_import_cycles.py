"""No import cycles: between modules (files), and between rooms (export, runtime, calibration,
serve, profiles) with the command-line modules a layer above the libraries they call.

Imports are read with `ast`, not by importing: every `import`/`from ... import` counts, at
module level or inside a function (a lazy import still ties the two files together), relative
ones resolved against the importing module. The rooms map onto fastsam2.* as pyproject.toml's
package-dir says (the folder `export/` is `fastsam2.export`).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# command-line modules: the layer above the libraries (entry points and `python -m` commands);
# left out of the room graph, as long as no library imports them
CLI_EXTRA = {"fastsam2.runtime.record_engines"}


def is_cli(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return leaf == "cli" or leaf.endswith("_cli") or module in CLI_EXTRA


def package_modules(root: Path = ROOT) -> dict:
    """{dotted module name: path} for every .py file of the fastsam2 package."""
    dirs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in dirs.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p == "__pycache__" or not p.isidentifier() for p in parts):
                continue
            modules[".".join([package, *parts])] = path
    return modules


def _imported(node, module: str, is_package: bool) -> list:
    """Dotted names a single import statement may bind: the module, and for `from X import y`
    the candidate submodule X.y as well."""
    if isinstance(node, ast.Import):
        return [[a.name] for a in node.names]
    base = node.module or ""
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = here[:len(here) - (node.level - 1)] if node.level > 1 else here
        base = ".".join(here + ([base] if base else []))
    return [[f"{base}.{a.name}", base] for a in node.names]


def import_graph(modules: dict) -> dict:
    """{module: {modules of the package it imports}}: `from X import y` is an edge to X.y where
    that is a module, to X otherwise (as import-linter and pydeps read it)."""
    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for candidates in _imported(node, module, is_package):
                for name in candidates:
                    # `import a.b.c` names a.b.c; the nearest known module along the dotted path
                    while name and name not in modules:
                        name = name.rpartition(".")[0]
                    if name:
                        if name != module:
                            edges.add(name)
                        break
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """One cycle (as a list of nodes, first repeated last) per strongly connected component
    with more than one node, or a node importing itself (Tarjan's algorithm, then a path)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, comp) for comp in comps]


def _a_cycle(graph: dict, comp: set) -> list:
    """A shortest cycle through the component's smallest node, for the failure message."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]] & comp):
                if w == start:
                    return path + [start]
                if w not in seen:
                    seen.add(w)
                    nxt.append(path + [w])
        paths = nxt
    return [start, start]


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def room_graph(graph: dict) -> dict:
    """Rooms (fastsam2.export, ...) and the rooms their library modules import."""
    rooms = {}
    for module, edges in graph.items():
        if is_cli(module):
            continue
        rooms.setdefault(room(module), set()).update(room(w) for w in edges if room(w) != room(module))
    return rooms


def _show(found: list) -> str:
    return "\n".join(" -> ".join(c) for c in found)


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_modules())


def test_the_graph_sees_the_package(graph):
    """The reader itself: every room is there, relative and lazy imports are edges."""
    assert {room(m) for m in graph} >= {"fastsam2.export", "fastsam2.runtime", "fastsam2.calibration",
                                         "fastsam2.serve", "fastsam2.profiles"}
    assert "fastsam2.export.engines_step" in graph["fastsam2.export.cli"]  # `from .engines_step import`
    assert "fastsam2.export.tensorrt" in graph["fastsam2.export.engines_step"]  # inside a function


def test_no_cycle_between_modules(graph):
    found = cycles(graph)
    assert not found, f"import cycles between modules:\n{_show(found)}"


def test_no_library_imports_a_command(graph):
    bad = sorted(f"{m} -> {w}" for m, edges in graph.items() if not is_cli(m) for w in edges if is_cli(w))
    assert not bad, "library modules import command-line modules:\n" + "\n".join(bad)


def _room_cycles_left(graph) -> list:
    return cycles(room_graph(graph))


def test_export_imports_nothing_of_calibration(graph):
    """calibration trains and records on top of export; export (commands included) reads what it
    needs (router weights, recorded feeds) from its own modules."""
    edges = {f"{m} -> {w}" for m, e in graph.items() if room(m) == "fastsam2.export"
             for w in e if room(w) == "fastsam2.calibration"}
    assert sorted(edges) == []


def test_no_cycle_between_rooms(graph):
    found = _room_cycles_left(graph)
    assert not found, f"import cycles between rooms (command-line modules left out):\n{_show(found)}" + \
        "\nthrough: " + "; ".join(f"{m} -> {w}" for m, e in sorted(graph.items()) if not is_cli(m)
                                   for w in sorted(e) if room(w) != room(m) and any(
                                       room(m) in c and room(w) in c for c in found))


def test_a_known_cycle_fails(tmp_path):
    """The checks bite: a module cycle and a room cycle written into a copy of the layout."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"fastsam2" = "fastsam2"\n"fastsam2.a" = "a"\n"fastsam2.b" = "b"\n')
    for d in ("fastsam2", "a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "a" / "one.py").write_text("def f():\n    from .two import g\n")  # lazy, relative
    (tmp_path / "a" / "two.py").write_text("from fastsam2.a import one\nimport fastsam2.b.lib\n")
    (tmp_path / "b" / "lib.py").write_text("from fastsam2.a.one import f\n")
    (tmp_path / "b" / "cli.py").write_text("import fastsam2.a.two\n")
    g = import_graph(package_modules(tmp_path))
    assert ["fastsam2.a.one", "fastsam2.a.two", "fastsam2.a.one"] in cycles(g)
    assert cycles(room_graph(g)) == [["fastsam2.a", "fastsam2.b", "fastsam2.a"]]
    # a command importing a library is the allowed direction: no room edge from b's cli
    (tmp_path / "b" / "lib.py").write_text("")
    assert cycles(room_graph(import_graph(package_modules(tmp_path)))) == []
