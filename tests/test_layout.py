"""The house: stage folders, small modules, no import circles, nothing importing the CLI.

The import graph is read from the source (module-level imports, including those inside
functions; `if TYPE_CHECKING:` blocks are left out since they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "areal_lite"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = _imports(ast.parse(path.read_text()), modules)
        # importing a.b.c also runs a/__init__ and a/b/__init__: those are not edges we
        # care about (the package face is lazy), so only the named module counts
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def test_no_import_circles():
    graph = _graph()
    graph["areal_lite"] = set()  # the lazy face imports nothing at run time
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_nothing_imports_the_cli_and_the_library_does_not_import_the_fakes():
    for name, deps in _graph().items():
        assert "areal_lite.cli" not in deps, f"{name} imports the command line"
        if not name.startswith(("areal_lite.testing", "areal_lite.cli")):
            assert not any(d.startswith("areal_lite.testing") for d in deps), (
                f"{name} imports a test double")


def test_modules_are_small():
    big = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_module_names_its_place():
    for path in PKG.rglob("*.py"):
        if path.name == "__init__.py" and not path.read_text().strip():
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(SRC)} has no module docstring"
