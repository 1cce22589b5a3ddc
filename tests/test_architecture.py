"""The package's shape, as docs/architecture.md states it: every module listed there, and no
import cycle between the modules at import time.

Imports inside functions are left out on purpose: they are the deliberate lazy ones (the
openai SDK, torch, Ray), made when a command needs them, after every module has loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "autoresearch"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "templates" in path.relative_to(PACKAGE).parts:
            continue  # train.py and prepare.py: the workspace's, not the package's
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports_at_load(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports when it is loaded (module level, including
    try blocks; `if TYPE_CHECKING:` blocks are never run)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    statements = []
    for node in ast.parse(path.read_text()).body:
        statements += node.body if isinstance(node, ast.Try) else [node]
    found = set()
    for node in statements:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)]
            module = ".".join(base + [node.module or ""]).strip(".") if node.level else node.module
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in modules else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of `graph` closes, as "a -> b -> a"."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_between_the_package_modules() -> None:
    modules = _modules()
    graph = {name: _imports_at_load(name, path, modules) for name, path in modules.items()}
    assert "autoresearch.noise" in graph["autoresearch.trial"]  # the walk sees imports
    assert _cycles(graph) == []


def test_a_cycle_is_seen(tmp_path: Path) -> None:
    """The walk itself: two modules that import each other at load time are a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("import pkg.a\n\ndef later():\n    from . import a\n")
    modules = {"pkg.a": a, "pkg.b": b}
    assert _imports_at_load("pkg.a", a, modules) == {"pkg.b"}
    assert _imports_at_load("pkg.b", b, modules) == {"pkg.a"}  # the function's import is not
    graph = {name: _imports_at_load(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == ["pkg.a -> pkg.b -> pkg.a"]


def test_every_module_is_on_the_architecture_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(PACKAGE))
        for path in _modules().values()
        if f"`{path.name}`" not in page and f"`{path.relative_to(PACKAGE)}`" not in page
    ]
    assert missing == []
