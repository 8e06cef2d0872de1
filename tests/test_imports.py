"""The package's import rules (the house rules in the README), as tests.

* Every module of ``foam_compile`` imports on its own, first, in an interpreter where no other
  module of the package is loaded (a cycle that only shows from some entry point fails here).
* No import cycle among the modules (static, from the source).
* ``foam_compile/kernels/`` imports nothing from the rest of the package.
* ``import foam_compile`` loads neither Dynamo, Inductor, sympy, networkx, Triton nor
  ``torch.distributed.tensor`` (what is loaded, not how long it takes).

The first and last run in one subprocess that imports torch once and forks a child per check,
so each child is a fresh interpreter as far as ``foam_compile`` is concerned.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "foam_compile"
HEAVY = [
    "torch._dynamo",
    "torch._inductor",
    "sympy",
    "networkx",
    "triton",
    "torch.distributed.tensor",
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


CHILDREN = r"""
import importlib, json, os, sys, traceback
import torch

HEAVY, MODULES = json.loads(sys.argv[1])


def in_child(check):
    # A forked child: a copy of this interpreter, where nothing of foam_compile is loaded yet.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            result = check()
        except BaseException:
            result = traceback.format_exc(limit=-4)
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text) if text else "the child died without a word"


def heavy_after_import():
    import foam_compile  # noqa: F401

    return [m for m in HEAVY if m in sys.modules]


def import_alone(name):
    def check():
        loaded = [m for m in sys.modules if m.split(".")[0] == "foam_compile"]
        assert not loaded, loaded
        importlib.import_module(name)
        return None

    return check


report = {"heavy": in_child(heavy_after_import)}
# The dependencies are loaded once, here, so that each child only pays for foam_compile itself.
for dep in HEAVY + ["transformers"]:
    try:
        importlib.import_module(dep)
    except ImportError:
        pass
report["failures"] = {name: err for name in MODULES if (err := in_child(import_alone(name)))}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def fresh_imports() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILDREN, json.dumps([HEAVY, sorted(MODULES)])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_import_foam_compile_loads_no_heavy_module(fresh_imports):
    assert fresh_imports["heavy"] == []


def test_every_module_imports_on_its_own(fresh_imports):
    assert len(MODULES) > 25 and "foam_compile.kernels.foam_adam" in MODULES
    assert fresh_imports["failures"] == {}


# ------------------------------------------------------------------------------- static
def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names before its ``import`` part."""
    if not node.level:
        return node.module or ""
    base = module if is_package(module) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def imported(module: str, top_level_only: bool) -> set[str]:
    """The ``foam_compile`` modules that ``module``'s import statements name.

    ``import a.b`` names ``a.b``; ``from a import b`` names ``a.b`` when that is a module, else
    ``a``. With ``top_level_only``, imports inside functions and classes (run when called, the
    way the package defers heavy or cyclic imports) do not count; imports under a module-level
    ``if``/``try`` do. Parent packages that Python initialises on the way are not counted: they
    are already being imported when their modules run.
    """
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else base)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not top_level_only:
                    visit(node.body)
            else:
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return {name for name in found if name.split(".")[0] == "foam_compile"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its module-level imports name (see :func:`imported`)."""
    return {name: imported(name, top_level_only=True) - {name} for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        for target in sorted(graph.get(name, ())):
            if cycle := visit(target, path + [name]):
                return cycle
        done.add(name)
        return None

    return next((c for name in sorted(graph) if (c := visit(name, []))), None)


def in_kernels(name: str) -> bool:
    return name.split(".")[:2] == ["foam_compile", "kernels"]


def kernel_imports_outside() -> dict[str, list[str]]:
    """Modules of ``foam_compile.kernels`` -> what they import from the rest of the package
    (anywhere in the file, functions included)."""
    out = {}
    for name in filter(in_kernels, MODULES):
        outside = sorted(n for n in imported(name, top_level_only=False) if not in_kernels(n))
        if outside:
            out[name] = outside
    return out


def test_no_import_cycle_among_modules():
    graph = import_graph()
    assert graph["foam_compile.functional"] >= {"foam_compile.backends", "foam_compile.hyper"}
    unknown = {n for targets in graph.values() for n in targets} - set(MODULES)
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_from_the_package():
    assert "foam_compile.kernels.foam_adam" in MODULES
    assert kernel_imports_outside() == {}


FAKE_TREE = {
    "foam_compile/__init__.py": "from .a import x\n",
    "foam_compile/a.py": "import foam_compile.b\n",
    "foam_compile/b.py": "def f():\n    from . import c\nfrom .a import y\n",
    "foam_compile/c.py": "",
    "foam_compile/hyper.py": "",
    "foam_compile/kernels/__init__.py": "from .k import z\n",
    "foam_compile/kernels/k.py": "def g():\n    from ..hyper import Hyper\n",
}


def test_the_static_checks_can_fail(tmp_path, monkeypatch):
    """A cycle and a kernel's import of the package, planted in a small tree, are found; a
    function-level import breaks a cycle."""
    for rel, text in FAKE_TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    fake = {module_name(tmp_path / rel): tmp_path / rel for rel in FAKE_TREE}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert imported("foam_compile.b", top_level_only=True) == {"foam_compile.a"}
    assert imported("foam_compile.b", top_level_only=False) == {"foam_compile.a", "foam_compile.c"}
    assert find_cycle(import_graph()) == ["foam_compile.a", "foam_compile.b", "foam_compile.a"]
    assert kernel_imports_outside() == {"foam_compile.kernels.k": ["foam_compile.hyper"]}
    fake_b = tmp_path / "foam_compile/b.py"
    fake_b.write_text("def f():\n    from .a import y\n")
    assert find_cycle(import_graph()) is None
