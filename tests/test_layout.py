"""The layout's rules, checked on the source: imports go one way, no circle, no huge file.

Every import counts, module-level or inside a function (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "emalora_fast"
MAX_LINES = 600
# Parts that the library (everything else in the package) must never import.
UPPER = ("emalora_fast.experiments", "emalora_fast.integrations", "emalora_fast.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "kernels" in parts:  # the Triton kernels import nothing of the package
            continue
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # the deepest known module the import names
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    # A package's __init__ re-exporting its children is not a dependency of the children on it.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    return graph


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_library_never_imports_the_experiments_or_integrations():
    graph = _graph()
    top = ("emalora_fast", "emalora_fast.__main__")  # the API and the entry point
    library = [m for m in graph if not m.startswith(UPPER) and m not in top]
    bad = {m: sorted(t for t in graph[m] if t.startswith(UPPER)) for m in library}
    bad = {m: t for m, t in bad.items() if t and not m.startswith("emalora_fast.benchmarks")}
    assert not bad, bad


def test_no_file_over_the_line_limit():
    sources = [*PKG.rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "csrc").glob("*")]
    long = {
        os.path.relpath(p, ROOT): n
        for p in sources
        if p.is_file() and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
