"""The package layout: rooms that import one way, no cycle anywhere, and subpackages a user can import.

`lint-imports` (run by CI) checks the layer contracts of pyproject.toml; this checks what a
contract cannot: that no cycle hides among modules of one room (function-local imports included),
and that the dotted imports researchers use to subclass the built-ins work in a fresh process,
from another directory, in an editable and in a regular install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
# What a build of the package does not need from the checkout (environments, caches, run outputs).
BUILD_IGNORES = (".git", ".venv*", "build", "runs", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")

DOTTED_IMPORTS = """
import sys
import tokenprune as tp
import tokenprune.strategies.fastv
from tokenprune.adapters.llava import LlavaAdapter
from tokenprune.strategies.fastv import FastV
assert issubclass(FastV, tp.ScoreReducer) and issubclass(LlavaAdapter, tp.Adapter)
assert tp.strategy_class("fastv") is FastV and "llava" in tp.list_adapters()
assert "matplotlib" not in sys.modules, "import tokenprune loaded matplotlib"
print(tokenprune.strategies.fastv.__file__)
"""


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while component[-1:] != [module]:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_cycle_in_the_package():
    graph = grimp.build_graph("tokenprune", include_external_packages=False)
    assert "tokenprune.core.language.session" in graph.modules
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from cyclic import b\n")
    (package / "b.py").write_text("from cyclic import a\n")
    (package / "c.py").write_text("from cyclic import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("cyclic")) == [["cyclic.a", "cyclic.b"]]


def _run_from_elsewhere(cwd: Path, extra_path: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    done = subprocess.run(
        [sys.executable, "-c", DOTTED_IMPORTS], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_dotted_imports_in_this_install(tmp_path):
    assert _run_from_elsewhere(tmp_path).endswith(os.path.join("strategies", "fastv.py"))


def test_dotted_imports_in_a_regular_install(tmp_path):
    source = tmp_path / "source"  # a build writes egg-info beside its sources: never into the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_IGNORES))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    where = _run_from_elsewhere(tmp_path, str(target))
    assert where.startswith(str(target)), where
