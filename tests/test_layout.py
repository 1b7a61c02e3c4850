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


# -- the family seam ---------------------------------------------------------------------------------------------

def _family_words() -> set[str]:
    from spexport.families import FAMILIES

    return {f.name for f in FAMILIES} | {f.display_name for f in FAMILIES} | {"classifier", "decoder-only"}


def _names_a_family(node: ast.AST, words: set[str]) -> bool:
    """A family's name as a string, a collection of them, or a family read off an object (`manifest.family`)."""
    if isinstance(node, ast.Constant):
        return node.value in words
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_family(element, words) for element in node.elts)
    if isinstance(node, ast.Attribute):
        return node.attr in ("family", "FAMILY") or node.attr == "name" and isinstance(node.value, ast.Name) \
            and node.value.id in ("DECODER", "ENCODER", "SEQ2SEQ", "family")
    return False


def family_comparisons(source: str, words: set[str]) -> list[int]:
    """Lines of `source` that compare a family by its name (`==`, `!=`, `in`); `family is DECODER` compares
    the record and is not one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            if any(_names_a_family(operand, words) for operand in [node.left, *node.comparators]):
                found.append(node.lineno)
    return found


def test_the_family_comparison_check_finds_comparisons():
    words = _family_words()
    for source in ['if manifest.family == "encoder": pass', 'x = model.FAMILY != "decoder-only"',
                   'ok = kind in ("decoder", "seq2seq")', 'same = family.name == SEQ2SEQ.name']:
        assert family_comparisons(source, words) == [1], source
    assert family_comparisons("ok = family is DECODER and manifest.baked == False", words) == []


def test_no_family_name_comparison_outside_families():
    """families.py is the one seam: elsewhere code asks a Family record what it can do."""
    words = _family_words()
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in PACKAGE.rglob("*.py")
             if path.name != "families.py" or path.parent != PACKAGE
             for line in family_comparisons(path.read_text(), words)]
    assert not found, "a family compared by name (ask its Family record instead): " + ", ".join(found)


# -- graph edits -------------------------------------------------------------------------------------------------

PROTOBUF_FIELDS = {"node", "input", "output", "initializer", "value_info", "opset_import", "attribute"}
PROTOBUF_EDITS = {"append", "extend", "insert", "remove", "pop"}


def protobuf_edits(source: str) -> list[int]:
    """Lines of `source` that edit an ONNX protobuf in place or build one with onnx.helper."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, verb = node.func.value, node.func.attr
            if verb in PROTOBUF_EDITS and isinstance(owner, ast.Attribute) and owner.attr in PROTOBUF_FIELDS \
                    or verb in ("CopyFrom", "MergeFrom", "ClearField") \
                    or verb.startswith("make_") and (isinstance(owner, ast.Name) and owner.id == "helper"
                                                     or isinstance(owner, ast.Attribute) and owner.attr == "helper"):
                found.append(node.lineno)
        elif isinstance(node, ast.Delete) and any(
                isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr in PROTOBUF_FIELDS
                for t in node.targets):
            found.append(node.lineno)
    return found


def test_the_protobuf_check_finds_edits():
    for source in ["model.graph.node.remove(n)", "graph.input.extend(values)", "copy.CopyFrom(weight)",
                   "del graph.node[:]", "n = onnx.helper.make_node('Cast', [], [])", "t = helper.make_tensor(1)"]:
        assert protobuf_edits(source) == [1], source
    assert protobuf_edits("graph.inputs.append(value)\nnode.replace_all_uses_with(other)\nnames.append(x)") == []


def test_no_raw_protobuf_graph_edits_outside_artifact():
    """Graph edits are onnx-ir passes (export/passes/); raw protobuf belongs to artifact/ alone."""
    editing = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if path.relative_to(PACKAGE).parts[0] != "artifact" and protobuf_edits(path.read_text())}
    assert not editing, f"raw protobuf edits (write an onnx-ir pass in export/passes/): {sorted(editing)}"


def test_the_size_and_cycle_checks_fail_on_violations(tmp_path, monkeypatch):
    """The shape checks above can fail: a package with a cycle and a long module is refused."""
    package = tmp_path / "spexport"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from spexport import b\n")
    (package / "b.py").write_text("def f():\n    from spexport import a\n" + "x = 1\n" * MAX_LINES)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", package)
    for check, message in [(test_no_import_cycles, "import cycle"), (test_modules_stay_small, "over 400 lines")]:
        try:
            check()
        except AssertionError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a package that breaks it")
