"""What convert writes, and where: task names every file of the artifact can be named after, output
folders it may replace (only an artifact, swapped in one step), and checks that come before the model
loads or that only the model can answer (a KV prefix it computes)."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from checks import copy, ends_cleanly, invoke, one_line, snapshot
from safetensors.numpy import load_file, save_file

import spexport.artifact.folders as folders
from spexport.artifact.manifest import MANIFEST, Manifest
from spexport.errors import AdapterError, OutputError, SpexportWarning
from spexport.export import convert
from spexport.runtime import load


def _adapter_args(adapters) -> list[str]:
    return [arg for name, path in adapters for arg in ("--adapter", f"{name}={path}")]


# -- task names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("names, pattern", [
    # the old rule took it; ONNX Runtime's adapter writer then failed on its 266-byte file name, after the export
    (["a/" * 63 + "a"], r"task name 'a/a/.*' is not allowed: a task name is at most 64 characters"),
    (["x" * 65], r"at most 64 characters of letters, digits"),
    (["Sentiment", "sentiment"], r"task names 'Sentiment' and 'sentiment' differ only in case"),
])
def test_task_names_every_writer_can_take(tiny_llama, tmp_path, no_model_load, names, pattern):
    adapters = [(name, tiny_llama["adapters"]["pt"]) for name in names]
    with pytest.raises(AdapterError, match=pattern) as raised:
        convert(tiny_llama["model"], adapters, tmp_path / "out")
    one_line(str(raised.value))
    result = invoke("convert", "--model", tiny_llama["model"], "--output", tmp_path / "out", *_adapter_args(adapters))
    assert result.exit_code == AdapterError.exit_code
    ends_cleanly(result, pattern)
    assert list(tmp_path.iterdir()) == []


def test_the_longest_names_the_rule_takes_export(tiny_llama, tmp_path):
    names = ["a" + "/" * 63, "b" * 64]
    convert(tiny_llama["model"], [(name, tiny_llama["adapters"]["pt"]) for name in names], tmp_path / "out")
    assert load(tmp_path / "out").tasks == names


# -- output folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", [".", "..", "/", "sub/.."])
def test_output_that_is_the_current_folder_or_holds_it_is_refused(tiny_llama, tmp_path, monkeypatch, no_model_load,
                                                                  output):
    cwd = tmp_path / "work"
    (cwd / "sub").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"is the current folder or holds it; name a folder for the artifact"):
            convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], Path(output), overwrite=overwrite)
    result = invoke("convert", "--model", tiny_llama["model"], "--adapter", f"pt={tiny_llama['adapters']['pt']}",
                    "--output", output, "--overwrite")
    assert result.exit_code == OutputError.exit_code
    ends_cleanly(result, r"current folder")
    assert snapshot(tmp_path) == before and sorted(p.name for p in cwd.iterdir()) == ["sub"]


def test_output_that_is_a_symbolic_link_is_refused(tiny_llama, tmp_path, no_model_load):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match=r"link is a symbolic link"):
        convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "link")


@pytest.mark.parametrize("manifest", [None, "{not json", '{"format": "something else"}', "[1]"])
def test_overwrite_replaces_only_a_spexport_artifact(tiny_llama, tmp_path, no_model_load, manifest):
    output = tmp_path / "mine"
    (output / "chapters").mkdir(parents=True)
    (output / "thesis.tex").write_text("years of work")
    (output / "chapters" / "one.tex").write_text("chapter one")
    if manifest is not None:
        (output / MANIFEST).write_text(manifest)
    before = snapshot(output)
    with pytest.raises(OutputError, match=r"mine is not a spexport artifact .*--overwrite replaces only") as raised:
        convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], output, overwrite=True)
    one_line(str(raised.value))
    assert snapshot(output) == before and [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_overwrite_replaces_an_artifact_even_a_damaged_one(tiny_llama, tmp_path):
    output = copy(tiny_llama["artifact"], tmp_path / "artifact")
    (output / "prompts.safetensors").write_bytes(b"damaged")
    convert(tiny_llama["model"], [("only", tiny_llama["adapters"]["pt"])], output, overwrite=True)
    assert load(output).tasks == ["only"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_the_swap_never_leaves_the_output_without_a_whole_artifact(tiny_llama, tmp_path, monkeypatch):
    """After every rename, `output` holds a whole artifact: a process killed between two of them (SIGKILL,
    power loss) cannot leave the only copy of the old artifact at a hidden path."""
    output = copy(tiny_llama["artifact"], tmp_path / "artifact")
    seen = []

    def watched(rename):
        def call(*args, **kwargs):
            result = rename(*args, **kwargs)
            seen.append(sorted(t.name for t in Manifest.read(output).tasks) if (output / MANIFEST).is_file() else None)
            return result
        return call

    for owner, name in [(os, "rename"), (os, "replace"), (Path, "rename"), (Path, "replace")]:
        monkeypatch.setattr(owner, name, watched(getattr(owner, name)))
    if hasattr(folders, "exchange"):
        monkeypatch.setattr(folders, "exchange", watched(folders.exchange))
    convert(tiny_llama["model"], [("new", tiny_llama["adapters"]["pt"])], output, overwrite=True)
    assert seen and None not in seen, seen
    assert seen[-1] == ["new"] and load(output).tasks == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_without_an_atomic_exchange_the_old_artifact_waits_under_a_visible_name(tiny_llama, tmp_path, monkeypatch):
    output = copy(tiny_llama["artifact"], tmp_path / "artifact")
    monkeypatch.setattr(folders, "exchange", lambda a, b: False)  # as where neither renameat2 nor renamex_np is
    moved, rename = [], Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, target: moved.append(Path(target).name) or rename(self, target))
    convert(tiny_llama["model"], [("new", tiny_llama["adapters"]["pt"])], output, overwrite=True)
    assert moved == [f"artifact.old-{os.getpid()}", "artifact"]
    assert load(output).tasks == ["new"] and [p.name for p in tmp_path.iterdir()] == ["artifact"]


# -- the base model ------------------------------------------------------------------------------------


def test_an_adapter_naming_another_base_model_warns_naming_both(tiny_llama, tmp_path):
    adapter = copy(tiny_llama["adapters"]["pt"], tmp_path / "adapter")
    config = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(config.replace(str(tiny_llama["model"]), "meta-llama/Llama-3-8B"))
    with pytest.warns(SpexportWarning, match=r"adapter x was trained on meta-llama/Llama-3-8B, not on model"):
        convert(tiny_llama["model"], [("x", adapter)], tmp_path / "out")
    result = invoke("convert", "--model", tiny_llama["model"], "--adapter", f"x={adapter}", "--output",
                    tmp_path / "cli")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "meta-llama/Llama-3-8B" in warned[0] and "not on model" in warned[0], result.stderr
    quiet = invoke("convert", "--model", tiny_llama["model"], "--adapter", f"x={adapter}", "--output",
                   tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_an_adapter_of_the_same_base_does_not_warn(tiny_llama, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpexportWarning)
        convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "out")


def test_a_kv_prefix_the_model_computes_as_nan_is_refused_naming_the_task(tiny_llama, tmp_path):
    """A finite prompt run through a damaged model (NaN in one layer's key projection) gives a NaN prefix."""
    model = copy(tiny_llama["model"], tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"][0, 0] = np.nan
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=r"task 'pt': the KV prefix that the frozen model computes from its prompt "
                                           r"holds NaN or Inf") as raised:
        convert(model, [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "out")
    one_line(str(raised.value))
    assert not (tmp_path / "out").exists()
