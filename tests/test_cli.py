"""`spexport convert` from the command line: what it prints, when it exits 2, what --overwrite does.

Every library error seen through the CLI is covered case by case in test_errors.py.
"""

from pathlib import Path

import pytest
from builders import build_adapter, build_model
from click.testing import CliRunner

from spexport.cli import main
from spexport.errors import OptionError, OutputError
from spexport.runtime import load


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_model("llama", root / "model")
    return {"model": model, "pt": build_adapter(model, "prompt_tuning", root / "pt", num_virtual_tokens=5),
            "prefix": build_adapter(model, "prefix_tuning", root / "prefix", num_virtual_tokens=6)}


def _convert(inputs, output: Path, *extra: str, tasks=("pt", "prefix")):
    args = ["convert", "--model", str(inputs["model"]), "--output", str(output), *extra]
    for task in tasks:
        args += ["--adapter", f"{task}={inputs[task]}"]
    return CliRunner().invoke(main, args)


def _assert_refused(result, pattern: str, exit_code: int) -> None:
    assert result.exit_code == exit_code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert pattern in result.stderr


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "artifact"
    return _convert(inputs, output), output


def test_convert_prints_the_tasks_and_exits_0(converted):
    result, output = converted
    assert result.exit_code == 0, result.output
    assert "pt: PROMPT_TUNING, 5 virtual tokens" in result.output
    assert "prefix: PREFIX_TUNING, 6 virtual tokens" in result.output
    assert f"wrote {output} (2 tasks)" in result.output
    assert load(output).tasks == ["pt", "prefix"]
    assert [p.name for p in output.parent.iterdir()] == ["artifact"]


def test_existing_output_is_kept_without_overwrite(inputs, converted):
    _, output = converted
    before = _snapshot(output)
    _assert_refused(_convert(inputs, output, tasks=["pt"]), "exists and is not empty; pass --overwrite to replace it",
                    OutputError.exit_code)
    assert _snapshot(output) == before


def test_overwrite_replaces_the_output(inputs, tmp_path):
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "spexport.json").write_text('{"format": "spexport"}')  # an artifact, if a damaged one
    (tmp_path / "artifact" / "old.txt").write_text("old")
    result = _convert(inputs, tmp_path / "artifact", "--overwrite", "--quiet", tasks=["pt"])
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert not (tmp_path / "artifact" / "old.txt").exists()
    assert load(tmp_path / "artifact").tasks == ["pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.mark.parametrize("spec", ["pt", "=adapters/pt", "pt=", "pt:adapters/pt"])
def test_malformed_adapter_option(inputs, tmp_path, spec):
    result = CliRunner().invoke(main, ["convert", "--model", str(inputs["model"]), "--adapter", spec,
                                       "--output", str(tmp_path / "artifact")])
    assert result.exit_code == OptionError.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '--adapter': {spec!r} is not NAME=PATH, e.g. --adapter sentiment=" in result.stderr
    assert list(tmp_path.iterdir()) == []



def test_the_group_maps_every_spexport_error_to_one_line_and_its_exit_code():
    """Errors are handled once, in the group's invoke: a command only raises."""
    from spexport.cliparams import SpexportGroup
    from spexport.errors import SpexportError

    group = SpexportGroup()
    errors = [SpexportError, *SpexportError.__subclasses__()]
    for error in errors:
        group.command(error.__name__)(_raising(error))
    for error in errors:
        result = CliRunner().invoke(group, [error.__name__])
        assert result.exit_code == error.exit_code, result.output
        assert result.stderr == "error: what went wrong and the fix\n" and result.stdout == ""


def _raising(error: type) -> callable:
    def command() -> None:
        raise error("what went wrong\nand the fix")
    return command
