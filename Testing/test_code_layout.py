"""The shipped core's layout: segcore's modules import each other without cycles, never import training
code, and keep their functions short.

Imports inside functions count too: a lazy import that closes a cycle still
means two modules that cannot be understood (or tested) one without the other.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEGCORE = ROOT / "segcore"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def segcore_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SEGCORE.rglob("*.py")}


def imported_modules(path: Path, modules) -> set[str]:
    """The segcore modules `path` imports, at module level or inside functions."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                # `from segcore import anatomy` imports the submodule; `from segcore.x import name` module x.
                candidate = f"{origin}.{alias.name}"
                found.add(candidate if candidate in modules else origin)
    return {name for name in found if name in modules and name != this}


def import_graph() -> dict[str, set[str]]:
    modules = segcore_modules()
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_segcore_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_and_package_imports_are_resolved(tmp_path):
    modules = segcore_modules()
    graph = import_graph()
    assert "segcore.anatomy" in graph["segcore.result"]        # from .anatomy import Structure
    assert "segcore.errors" in graph["segcore.files"]          # from segcore.errors import ...
    assert "segcore.files" in graph["segcore.export"]
    assert set(graph) == set(modules)


def top_level_imports(path: Path) -> set[str]:
    """The first component of every absolute import in a file (relative imports stay inside segcore)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    return imported


def test_files_uses_the_standard_library_only():
    assert top_level_imports(SEGCORE / "files.py") <= {
        "__future__", "json", "os", "re", "secrets", "shutil", "socket", "tempfile", "time", "collections",
        "contextlib", "pathlib", "segcore"}


def test_the_shipped_core_never_imports_training_code():
    for name, path in segcore_modules().items():
        assert not top_level_imports(path) & {"training", "Testing", "bench"}, name


MAX_FUNCTION_LINES = 80


def test_no_function_in_the_shipped_core_is_longer_than_80_lines():
    """Long functions hide their parts; split them where their own comments already do."""
    long = []
    for name, path in segcore_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "split these functions: " + "; ".join(long)

