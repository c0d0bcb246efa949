"""The library's modules import in one direction: no circles, and each module imports on its own.

Two checks. (1) Static: the graph of module-level ``tan_keras`` imports (read
from the source with ``ast``; imports inside functions are deliberate late
bindings and are listed separately) has no cycle. (2) Dynamic: in one fresh
interpreter, each module is imported first, with every ``tan_keras`` module
removed from ``sys.modules`` before it, so an import that works only when
another module happened to be loaded first fails here.
"""

import ast
import os
import pathlib
import subprocess
import sys

import keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tan_keras"
# Backend packages import only under their own backend.
OTHER_BACKEND = {"tensorflow": "tan_keras.per_example.jax", "jax": "tan_keras.per_example.tensorflow"}[
    keras.backend.backend()]


def modules():
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(OTHER_BACKEND):
            out.append((name, path))
    return out


def module_level_imports(name, path):
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:  # module level only (not inside functions)
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tan_keras")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("tan_keras"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_module_level_imports_of_the_library_have_no_cycle():
    names = {name for name, _ in modules()}
    graph = {name: {m for m in module_level_imports(name, path) if m in names and m != name}
             for name, path in modules()}
    # A package's __init__ importing its own submodules is how it re-exports; the submodules
    # importing each other must not loop, so drop "package -> own submodule" edges.
    graph = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_each_library_module_imports_on_its_own():
    names = [name for name, _ in modules()]
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'tan_keras' or m.startswith('tan_keras.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(" + repr(names) + "))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
