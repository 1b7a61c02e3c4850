"""The package's shape, as DESIGN.md states it: no import cycles (function-local imports count), no
module reaching into another's private names, and modules small enough to read top to bottom."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "spexport"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in `path`, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module in modules:
            for alias in node.names:  # `from package import submodule` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in modules else (node.module, [alias.name]))
    return found


def test_no_import_cycles():
    modules = _modules()
    edges = {name: {target for target, _ in _imports(path, modules) if target != name}
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join(trail + [name, target])
            if target not in state:
                visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])


def test_no_module_imports_anothers_private_names():
    modules = _modules()
    private = [f"{path.relative_to(PACKAGE.parent)}: {target}.{name}"
               for path in modules.values() for target, names in _imports(path, modules)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "private names imported: " + ", ".join(private)


def test_modules_stay_small():
    large = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
             if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not large, f"modules over {MAX_LINES} lines: {large}"
