"""The package's shape: small modules, no import cycles, no private names across modules, a light import.

Read from the source with `ast` (nothing is imported but `gpt2onnx` itself in a subprocess),
so a violation is named by module before anything runs.

What counts as an import cycle:

- Between subpackages (`exporter`, `eval`, `batch`, `bench`, `integrations`, `cli`, and the
  runtime core: the top-level modules): every import, at module level or inside a function.
  A lazy import defers the cost of loading a module, not the dependency. `__main__` is the
  CLI's entry point and counts as `cli`.
- Between modules: every import too. A function-level import that closes a loop (issue #20's
  `quantize` <-> `nbits`) is still a loop to read and to change; only the import of a
  module's own parent package is left out (``from . import name`` reads a package that is
  already initializing).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from functools import cache

import gpt2onnx

ROOT = os.path.dirname(gpt2onnx.__file__)
MAX_LINES = 350
SUBPACKAGES = ("exporter", "eval", "batch", "bench", "integrations", "cli")
HEAVY = ("torch", "onnx", "transformers", "optimum")  # never loaded by `import gpt2onnx` (onnxruntime is the runtime)


@cache
def modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(mod: str, path: str) -> list[tuple[str, list[str]]]:
    """(target module or package, names imported from it) of every gpt2onnx import in `path`."""
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "gpt2onnx"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == "gpt2onnx":
                target = node.module
            else:
                continue
            out.append((target, [a.name for a in node.names]))
    return out


@cache
def graph() -> dict[str, frozenset[str]]:
    """{module: the gpt2onnx modules it imports}: ``from .x import name`` is x, ``from . import sub`` is sub."""
    mods = modules()
    out = {}
    for mod, path in mods.items():
        deps = set()
        for target, names in _imports(mod, path):
            for t in [f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names] or [target]:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t != mod and not mod.startswith(t + "."):  # its own parent package: already initializing
                    deps.add(t)
        out[mod] = frozenset(deps)
    return out


def unit(mod: str) -> str:
    """The subpackage a module belongs to, or "core" for the top-level runtime modules."""
    parts = mod.split(".")
    if parts[1:2] == ["__main__"]:
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def find_cycle(edges: dict[str, set[str] | frozenset[str]]) -> list[str] | None:
    """One cycle of the directed graph `edges` as a path [a, b, ..., a], or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), find_cycle({"a": {"b"}, "b": set()})
    (['a', 'b', 'c', 'a'], None)
    """
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            if found := visit(nxt, path + [node]):
                return found
        done.add(node)
        return None

    for start in sorted(edges):
        if found := visit(start, []):
            return found
    return None


def test_no_module_is_over_350_lines():
    long = {}
    for mod, path in modules().items():
        with open(path, encoding="utf-8") as f:
            n = len(f.read().splitlines())
        if n > MAX_LINES:
            long[mod] = n
    assert not long, f"modules over {MAX_LINES} lines (split them along what they own): {long}"


def test_no_import_cycle_between_modules():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for mod, deps in graph().items():
        for dep in deps:
            if unit(mod) != unit(dep):
                edges.setdefault(unit(mod), set()).add(unit(dep))
                why.setdefault((unit(mod), unit(dep)), f"{mod} imports {dep}")
    cycle = find_cycle(edges)
    assert cycle is None, "subpackage cycle: " + "; ".join(why[a, b] for a, b in zip(cycle, cycle[1:]))


def test_the_checks_see_a_function_level_import():
    """The graph holds imports inside functions too (the quantize <-> nbits loop of issue #20 was one)."""
    assert "gpt2onnx.exporter.quantize" in graph()["gpt2onnx.exporter.pipeline"]  # imported inside _export_into
    assert "gpt2onnx.exporter.recipe" in graph()["gpt2onnx.exporter.nbits"]
    assert find_cycle({**graph(), "gpt2onnx.exporter.recipe": {"gpt2onnx.exporter.nbits"}})


def test_no_module_imports_another_modules_private_names():
    for mod, path in modules().items():
        for target, names in _imports(mod, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{mod} imports the private {target}.{private[0]}"


def test_import_gpt2onnx_loads_no_torch_onnx_or_transformers():
    code = ("import gpt2onnx, sys; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))")
    out = subprocess.run([sys.executable, "-c", code, *HEAVY], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
