"""The C++, Node and C# samples generate exactly the tokens the Python runtime generates.

samples/build.sh builds them into samples/build/ (once per session, fast when already built). A
sample is skipped only when its toolchain is absent and build.sh cannot install it (not root), and never
under CI=true, where that fails the run instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from builders import build_adapter, build_model

from spexport.artifact import tensorfile
from spexport.artifact.manifest import seal
from spexport.artifact.ort_adapters import adapter_path
from spexport.export import convert
from spexport.runtime import load

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
BUILD = SAMPLES / "build"
# A '/' in a task name must survive the adapter file's name.
TASKS = {"pt": ("prompt_tuning", 5), "topic/prefix": ("prefix_tuning", 3)}
# (token ids, max_new_tokens): a short prompt, one token, and one that runs into max_positions (64).
PROMPTS = [([5, 9, 14, 7], 12), ([42], 6), (list(range(4, 54)), 12)]
CLIENTS = {  # client -> (build.sh target, tools it needs, command before the sample's arguments)
    "cpp": ("cpp", ["cmake", "c++"], [str(BUILD / "spexport-cpp")]),
    "node": ("node", ["node", "npm"], ["node", str(SAMPLES / "node" / "run.js")]),
    "cs": ("cs", ["mcs", "mono"], ["mono", str(BUILD / "spexport-cs.exe")]),
}


def _build(target: str, tools: list[str]) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        if os.environ.get("CI") == "true":  # CI must build and run every sample: a skip there would hide a break
            pytest.fail(f"{' and '.join(missing)} not installed and build.sh cannot install them (CI=true)")
        pytest.skip(f"{' and '.join(missing)} not installed, and build.sh can only install them as root with apt")
    result = subprocess.run(["bash", str(SAMPLES / "build.sh"), target], check=False, capture_output=True, text=True)
    assert result.returncode == 0, f"samples/build.sh {target} failed:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="session")
def client(request):
    target, tools, command = CLIENTS[request.param]
    _build(target, tools)
    return command


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """A tiny Llama with two tasks exported unbaked and baked, plus an unbaked copy that stops early."""
    root = tmp_path_factory.mktemp("samples")
    model = build_model("llama", root / "model")
    adapters = [(name, build_adapter(model, method, root / f"adapter{i}", n, seed=i + 1))
                for i, (name, (method, n)) in enumerate(TASKS.items())]
    folders = {"unbaked": root / "unbaked", "baked": root / "baked"}
    convert(model, adapters, folders["unbaked"])
    convert(model, adapters, folders["baked"], bake=True)
    # EOS: the token the Python runtime generates third for the first task (the manifest is not
    # hashed, so editing it keeps the artifact valid)
    folders["eos"] = root / "eos"
    shutil.copytree(folders["unbaked"], folders["eos"])
    ids = PROMPTS[0][0]
    third = int(load(folders["unbaked"]).generate([ids], task="pt", max_new_tokens=3)[0, -1])
    manifest = json.loads((folders["eos"] / "spexport.json").read_text())
    manifest["model"]["eos_token_ids"] = [third]
    (folders["eos"] / "spexport.json").write_text(json.dumps(seal(manifest)))
    return folders


def _python_tokens(folder: Path, task: str, ids: list[int], max_new_tokens: int) -> list[int]:
    return load(folder).generate([ids], task=task, max_new_tokens=max_new_tokens)[0].tolist()


def _sample_tokens(command: list[str], folder: Path, task: str, ids: list[int], max_new_tokens: int,
                   use_adapter: bool = False) -> list[int]:
    env = {**os.environ, "SPEXPORT_USE_ADAPTER": "1" if use_adapter else "0"}
    args = [str(folder), task, str(max_new_tokens), *map(str, ids)]
    result = subprocess.run(command + args, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(t) for t in result.stdout.split()]


@pytest.mark.parametrize("client", list(CLIENTS), indirect=True)
@pytest.mark.parametrize("mode", ["unbaked", "baked"])
@pytest.mark.parametrize("task", list(TASKS))
def test_sample_generates_what_python_generates(client, artifacts, mode, task):
    for ids, max_new_tokens in PROMPTS:
        expected = _python_tokens(artifacts[mode], task, ids, max_new_tokens)
        assert _sample_tokens(client, artifacts[mode], task, ids, max_new_tokens) == expected, (ids, max_new_tokens)


@pytest.mark.parametrize("client", list(CLIENTS), indirect=True)
def test_sample_stops_at_eos(client, artifacts):
    ids, max_new_tokens = PROMPTS[0]
    expected = _python_tokens(artifacts["eos"], "pt", ids, max_new_tokens)
    assert len(expected) == len(ids) + 3
    assert _sample_tokens(client, artifacts["eos"], "pt", ids, max_new_tokens) == expected


@pytest.mark.parametrize("client", ["cpp", "cs"], indirect=True)
@pytest.mark.parametrize("task", list(TASKS))
def test_sample_picks_task_by_ort_adapter_file(client, artifacts, task):
    for ids, max_new_tokens in PROMPTS:
        expected = _python_tokens(artifacts["unbaked"], task, ids, max_new_tokens)
        got = _sample_tokens(client, artifacts["unbaked"], task, ids, max_new_tokens, use_adapter=True)
        assert got == expected, (ids, max_new_tokens)


@pytest.mark.parametrize("client", list(CLIENTS), indirect=True)
def test_sample_refuses_unknown_task_in_one_line(client, artifacts):
    args = [str(artifacts["unbaked"]), "nope", "3", "5"]
    result = subprocess.run(client + args, check=False, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: unknown task 'nope'; the artifact has pt, topic/prefix\n"


def test_adapter_files_hold_each_task_as_one_row(artifacts):
    folder = artifacts["unbaked"]
    manifest = json.loads((folder / "spexport.json").read_text())
    bank = tensorfile.load(folder / "prompts.safetensors")
    assert adapter_path("topic/prefix") == "adapters/topic%2Fprefix.onnx_adapter"
    for task in manifest["tasks"]:
        rel = adapter_path(task["name"])
        assert rel in manifest["files"]
        adapter = ort.AdapterFormat.read_adapter(str(folder / rel))  # its values borrow from it: keep it alive
        params = {name: value.numpy().copy() for name, value in adapter.get_parameters().items()}
        np.testing.assert_array_equal(params["kv_prefix"], bank[task["tensor"]][None])
        np.testing.assert_array_equal(params["prefix_mask"], np.ones((1, task["num_virtual_tokens"]), np.int64))
    assert not (artifacts["baked"] / "adapters").exists()


def test_python_onnxruntime_feeds_an_active_adapter_to_graph_inputs(artifacts):
    """What docs/samples.md says of adapters in Python: the core feeds them, the public `run` refuses first."""
    folder = artifacts["unbaked"]
    session = ort.InferenceSession(str(folder / "model.onnx"))
    ids = np.array([[5, 9, 14, 7]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for name in [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]:
        feeds[name] = np.zeros((1, 2, 0, 16), np.float32)
    bank = tensorfile.load(folder / "prompts.safetensors")
    prefix = {"kv_prefix": bank["pt"][None], "prefix_mask": np.ones((1, 5), np.int64)}
    expected = session.run(["logits"], {**feeds, **prefix})[0]
    adapter = ort.LoraAdapter()
    adapter.Load(str(folder / adapter_path("pt")))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    with pytest.raises(ValueError, match="kv_prefix"):
        session.run(["logits"], feeds, run_options)
    np.testing.assert_array_equal(session._sess.run(["logits"], feeds, run_options)[0], expected)
