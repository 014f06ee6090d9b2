"""The package's import graph has no cycles, lazy imports (inside functions) included.

A cycle means two modules that can only be understood, tested or moved together, and a lazy
import that hides one still breaks when the import order changes. This reads the source with
`ast` (nothing is imported), so it is fast and sees every import statement wherever it is.

`from a.b import c` counts as importing `a.b.c` when that is a module of the package, otherwise
`a.b`; the package `__init__` that Python runs on the way to a submodule is not counted, since it
is not what the importing module asks for.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "xception_jax"


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted((ROOT / PACKAGE).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules that `name` imports, anywhere in its source."""
  found = set()
  package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name in modules)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from . import x, from ..data import y
        base = package[: len(package) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      for alias in node.names:
        if f"{module}.{alias.name}" in modules:
          found.add(f"{module}.{alias.name}")
        elif module in modules:
          found.add(module)
  found.discard(name)
  return found


def _cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
  """A shortest import path from `start` back to itself, or None."""
  paths = {m: [start, m] for m in sorted(graph[start])}
  frontier = list(paths)
  while frontier:
    following = []
    for module in frontier:
      for imported in sorted(graph[module]):
        if imported == start:
          return paths[module] + [start]
        if imported not in paths:
          paths[imported] = paths[module] + [imported]
          following.append(imported)
    frontier = following
  return None


def test_the_import_graph_is_read_correctly():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  assert "xception_jax.data.pipeline" in graph["xception_jax.data"]  # a lazy import
  assert "xception_jax.models" in graph["xception_jax.train"]  # from xception_jax import models
  assert "xception_jax.data.types" in graph["xception_jax.data.pipeline"]


def test_no_module_imports_a_module_that_imports_it():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  cycles = {}
  for name in graph:
    cycle = _cycle_through(name, graph)
    if cycle and frozenset(cycle) not in cycles:
      cycles[frozenset(cycle)] = " -> ".join(cycle)
  assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles.values()))
