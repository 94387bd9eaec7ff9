"""The module dependencies of ``kpflow.kernels`` flow one way, with every import at module level.

Function-level imports of sibling modules hide import cycles; here the imports of every kernels module
are read from its source (AST): none may sit inside a function, the graph of the top-level ones must be
acyclic, and the layering models → kernels → estimators/tracking/training must hold. Every module must
also import first in a fresh interpreter (a cycle would fail on a half-initialised module).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kpflow

SRC = Path(kpflow.__file__).parent
KERNELS = sorted((SRC / "kernels").glob("*.py"))
ABOVE_KERNELS = ("kpflow.estimators", "kpflow.tracking", "kpflow.training", "kpflow.experiments", "kpflow.report")


def _imports(path: Path):
    """``(module imported, at top level?)`` for every import of ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = "kpflow." + ".".join(path.relative_to(SRC).parent.parts)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, id(node) in top))
        elif isinstance(node, ast.Import):
            out.extend((a.name, id(node) in top) for a in node.names)
    return out


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.stem)
def test_no_function_level_imports_of_kpflow(path):
    hidden = [m for m, top in _imports(path) if not top and m.startswith("kpflow")]
    assert not hidden, f"{path.name} imports {hidden} inside functions; import at module level"


def test_kernel_modules_form_an_acyclic_graph_below_the_estimators():
    graph = {}
    for path in KERNELS:
        name = f"kpflow.kernels.{path.stem}" if path.stem != "__init__" else "kpflow.kernels"
        mods = [m for m, _ in _imports(path)]
        assert not [m for m in mods if m.startswith(ABOVE_KERNELS)], f"{path.name} imports a layer above kernels"
        graph[name] = {m for m in mods if m.startswith("kpflow.kernels.")}
    for path in (SRC / "models").glob("*.py"):
        bad = [m for m, _ in _imports(path) if m.startswith("kpflow.kernels")]
        assert not bad, f"models/{path.name} imports {bad}"
    done, visiting = set(), []

    def visit(n):
        if n in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(n):] + [n])}")
        if n in done:
            return
        visiting.append(n)
        for m in graph.get(n, ()):
            visit(m)
        visiting.pop()
        done.add(n)

    for n in graph:
        visit(n)
    # the check sees the edges it should (the dispatch of state_space to the joint-state operators)
    assert "kpflow.kernels.joint" in graph["kpflow.kernels.state_space"]
    assert "kpflow.kernels.state_space" in graph["kpflow.kernels.recording"]


def test_every_kernels_module_imports_first_in_a_fresh_interpreter():
    names = [f"kpflow.kernels.{p.stem}" for p in KERNELS if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for k in [k for k in sys.modules if k == 'kpflow' or k.startswith('kpflow.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
