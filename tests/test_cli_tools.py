"""`spexport inspect`, `validate`, `run` and `convert --json` from the command line."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from builders import build_adapter, build_model
from click.testing import CliRunner

from spexport.artifact import tensorfile
from spexport.artifact.manifest import seal
from spexport.cli import main
from spexport.errors import AdapterError, ArtifactError, InputError
from spexport.runtime import load

TASKS = ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2"]
BLOCKED = ("torch", "transformers", "peft", "optimum", "safetensors", "onnx", "rich")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny Llama, a prompt-tuning, a prefix-tuning and a 3-task MPT adapter, converted with --json."""
    root = tmp_path_factory.mktemp("cli-tools")
    model = build_model("llama", root / "model")
    adapters = {"pt": build_adapter(model, "prompt_tuning", root / "pt", num_virtual_tokens=5, seed=1),
                "prefix": build_adapter(model, "prefix_tuning", root / "prefix", num_virtual_tokens=6, seed=2),
                "mpt": build_adapter(model, "multitask", root / "mpt", num_virtual_tokens=4, seed=3)}
    artifact = root / "artifact"
    converted = _invoke("convert", "--model", model, "--output", artifact, "--json", *_adapter_args(adapters))
    return {"model": model, "adapters": adapters, "artifact": artifact, "converted": converted}


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _adapter_args(adapters: dict) -> list[str]:
    return [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]


def _validate(built, artifact: Path, *extra, adapters=None):
    return _invoke("validate", artifact, "--model", built["model"], *_adapter_args(adapters or built["adapters"]),
                   *extra)


def _copy(built, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["artifact"], tmp_path / "artifact"))


def _assert_one_line_error(result, code: int, pattern: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert pattern in result.stderr


def test_convert_json_is_the_manifest_summary(built):
    result = built["converted"]
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [t["name"] for t in summary["tasks"]] == TASKS
    assert [t["id"] for t in summary["tasks"]] == list(range(5))
    assert summary["tasks"][0] == {"id": 0, "name": "pt", "method": "PROMPT_TUNING", "num_virtual_tokens": 5,
                                   "bytes": 2 * 2 * 2 * 5 * 16 * 4}
    assert summary["baked"] is False and summary["output"] == str(built["artifact"])
    written = {p.relative_to(built["artifact"]).as_posix() for p in built["artifact"].rglob("*") if p.is_file()}
    assert set(summary["files"]) == written - {"spexport.json"}


def test_inspect_lists_tasks_graph_and_intact_files(built):
    result = _invoke("inspect", built["artifact"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.split() == ["0", "pt", "PROMPT_TUNING", "5", "2560"] for line in lines)
    assert any(line.split() == ["4", "mpt/2", "MULTITASK_PROMPT_TUNING", "4", "2048"] for line in lines)
    assert "prompt bank: prompts.safetensors" in lines
    assert any(line.split()[:3] == ["input", "kv_prefix", "float32"] for line in lines)
    assert any(line.split()[:3] == ["output", "logits", "float32"] for line in lines)
    assert "CPUExecutionProvider" in result.stdout
    assert any(line.split() == ["ok", "model.onnx"] for line in lines)
    assert any(line.split() == ["ok", "prompts.safetensors"] for line in lines)


def test_inspect_json_without_torch(built):
    """inspect runs where only the runtime is installed: torch, onnx and rich cannot be imported."""
    script = (f"import sys\nfor n in {BLOCKED!r}: sys.modules[n] = None\n"
              "from spexport.cli import main\nmain()")
    done = subprocess.run([sys.executable, "-c", script, "inspect", "--json", str(built["artifact"])],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["intact"] is True and set(report["files"].values()) == {"ok"}
    assert [t["name"] for t in report["summary"]["tasks"]] == TASKS
    inputs = {p["name"]: p for p in report["inputs"]}
    assert inputs["kv_prefix"]["dtype"] == "float32" and inputs["kv_prefix"]["shape"][-1] == 16
    assert {"input_ids", "attention_mask", "position_ids", "prefix_mask"} <= set(inputs)
    assert "logits" in [p["name"] for p in report["outputs"]]
    assert "CPUExecutionProvider" in report["providers"]


def test_inspect_reports_damaged_and_missing_files_and_exits_5(built, tmp_path):
    artifact = _copy(built, tmp_path)
    data = bytearray((artifact / "prompts.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (artifact / "prompts.safetensors").write_bytes(data)
    (artifact / "tokenizer_config.json").unlink()
    result = _invoke("inspect", artifact)
    assert result.exit_code == ArtifactError.exit_code == 5, result.output
    lines = result.stdout.splitlines()
    assert any(line.split() == ["DAMAGED", "prompts.safetensors"] for line in lines)
    assert any(line.split() == ["missing", "tokenizer_config.json"] for line in lines)
    assert any(line.split() == ["ok", "model.onnx"] for line in lines)
    assert "prompts.safetensors is DAMAGED, tokenizer_config.json is missing" in result.stderr
    quiet = _invoke("inspect", artifact, "--quiet")
    _assert_one_line_error(quiet, ArtifactError.exit_code, "prompts.safetensors is DAMAGED")
    as_json = _invoke("inspect", artifact, "--json")
    assert as_json.exit_code == ArtifactError.exit_code
    assert json.loads(as_json.stdout)["files"]["prompts.safetensors"] == "DAMAGED"


def test_inspect_of_an_unreadable_graph(built, tmp_path):
    artifact = _copy(built, tmp_path)
    (artifact / "model.onnx").write_bytes(b"not a graph")
    result = _invoke("inspect", artifact)
    assert result.exit_code == ArtifactError.exit_code, result.output
    assert "  unreadable: " in result.stdout and "pt" in result.stdout
    assert any(line.split() == ["DAMAGED", "model.onnx"] for line in result.stdout.splitlines())


def test_inspect_of_a_folder_without_manifest(tmp_path):
    _assert_one_line_error(_invoke("inspect", tmp_path), ArtifactError.exit_code, "not a spexport artifact")


def test_validate_passes_every_task_and_prints_the_numbers(built):
    result = _validate(built, built["artifact"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:-1]}
    assert list(rows) == TASKS
    for task, (diff, agreement, verdict) in rows.items():
        assert float(diff) <= 1e-4 and agreement == "1.000" and verdict == "ok", (task, rows[task])
    assert result.stdout.splitlines()[-1] == "all 5 tasks match PEFT (atol 0.0001, 12 greedy tokens)"


def test_validate_fails_on_a_wrong_but_intact_prompt(built, tmp_path):
    """A bank whose prefix task is scaled, with the manifest's sha256 fixed: it loads but is wrong."""
    artifact = _copy(built, tmp_path)
    bank = tensorfile.load(artifact / "prompts.safetensors")
    bank["prefix"] = bank["prefix"] * 1.5
    tensorfile.save(bank, artifact / "prompts.safetensors")
    manifest = json.loads((artifact / "spexport.json").read_text())
    manifest["files"]["prompts.safetensors"] = hashlib.sha256((artifact / "prompts.safetensors").read_bytes()) \
        .hexdigest()
    (artifact / "spexport.json").write_text(json.dumps(seal(manifest)))
    adapters = {name: built["adapters"][name] for name in ("pt", "prefix")}
    result = _validate(built, artifact, "--json", adapters=adapters)
    assert result.exit_code == 1, result.output
    checks = {c["task"]: c for c in json.loads(result.stdout)["tasks"]}
    assert checks["pt"]["passed"] and checks["pt"]["max_abs_diff"] <= 1e-4
    assert not checks["prefix"]["passed"] and checks["prefix"]["max_abs_diff"] > 1e-2
    assert result.stderr.splitlines()[-1].startswith("error: 1 of 2 tasks differ from PEFT")
    assert result.stderr.splitlines()[-1].endswith(": prefix")


def test_validate_quiet_prints_nothing_when_it_passes(built):
    result = _validate(built, built["artifact"], "--quiet", "--new-tokens", "3",
                       adapters={"pt": built["adapters"]["pt"]})
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


@pytest.mark.parametrize("name,pattern,error", [
    ("nope", "the artifact has no task 'nope'", InputError),
    ("raw", "validate compares with PEFT and needs a PEFT adapter folder", AdapterError)])
def test_validate_refuses_what_it_cannot_compare(built, tmp_path, name, pattern, error):
    path = built["adapters"]["pt"]
    if name == "raw":
        np.save(tmp_path / "raw.npy", np.zeros((5, 64), np.float32))
        path = tmp_path / "raw.npy"
    _assert_one_line_error(_validate(built, built["artifact"], adapters={name: path}), error.exit_code, pattern)


def test_run_prints_the_generated_text(built):
    expected = load(built["artifact"]).generate_text(["the cat", "red green blue"], task="prefix", max_new_tokens=6)
    result = _invoke("run", built["artifact"], "--task", "prefix", "the cat", "red green blue", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected and all(expected)


def test_run_json_with_seeded_sampling(built):
    args = ["run", built["artifact"], "--task", "mpt/1", "the cat", "--sample", "--seed", 7, "--top-k", 20,
            "--temperature", 0.8, "--max-new-tokens", 5, "--json"]
    first, second = _invoke(*args), _invoke(*args)
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert first.stdout == second.stdout
    expected = load(built["artifact"]).generate_text("the cat", task="mpt/1", max_new_tokens=5, do_sample=True,
                                                     seed=7, top_k=20, temperature=0.8)
    assert document == {"task": "mpt/1", "outputs": [{"prompt": "the cat", "text": expected[0]}]}


def test_run_unknown_task_is_one_line(built):
    _assert_one_line_error(_invoke("run", built["artifact"], "--task", "nope", "the cat"), InputError.exit_code,
                           "unknown task 'nope'")


@pytest.mark.parametrize("args", [["--new-tokens", "-5"], ["--atol", "-1"], ["--atol", "nan"], ["--atol", "inf"],
                                  ["--min-agreement", "1.5"], ["--min-agreement", "-0.1"]])
def test_validate_refuses_bad_numbers_before_any_work(built, no_model_load, args):
    """Before: --new-tokens -5 reached PEFT's generate after the model had loaded, and ended in its traceback."""
    result = _validate(built, built["artifact"], *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Invalid value for '{args[0]}'" in result.stderr, result.stderr


def test_validate_refuses_bad_numbers_from_python_too(built, no_model_load):
    from spexport.validate import validate

    for kwargs in ({"new_tokens": -5}, {"new_tokens": 2.5}, {"atol": float("nan")}, {"atol": "1e-4"}):
        with pytest.raises(InputError, match=rf"{next(iter(kwargs))} must be"):
            validate(built["artifact"], built["model"], [("pt", built["adapters"]["pt"])], **kwargs)


@pytest.mark.parametrize("args", [["--max-new-tokens", "-1"], ["--top-k", "-3"], ["--temperature", "0"],
                                  ["--temperature", "nan"], ["--top-p", "0"], ["--top-p", "1.5"]])
def test_run_refuses_negative_counts_as_usage_errors(built, args):
    result = _invoke("run", built["artifact"], "--task", "pt", "the cat", *args)
    assert result.exit_code == 2 and f"Invalid value for '{args[0]}'" in result.stderr, result.output
