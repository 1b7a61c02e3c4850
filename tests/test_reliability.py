"""Reliability and security: untrusted models and artifacts, damaged files, interrupted exports,
many threads on one model, and bounded resources.

Each test damages a copy of the tiny Llama artifact (conftest's `tiny_llama`) in one way and
checks that spexport refuses it with its own one-line error, never a raw ONNX Runtime, numpy or
KeyError traceback, and never garbage output.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from click.testing import CliRunner
from onnx.external_data_helper import convert_model_to_external_data

import spexport.export
import spexport.export.common
import spexport.export.decoder
import spexport.runtime.session
import spexport.validate
from spexport.artifact import tensorfile
from spexport.artifact.manifest import MANIFEST, seal
from spexport.cli import main
from spexport.errors import ArtifactError, InputError, ModelError, SpexportError
from spexport.export import convert
from spexport.runtime import load
from spexport.runtime.session import VerifiedFiles

IDS = np.array([[5, 9, 14, 22, 40, 7]], np.int64)


# the graph the Python runtime runs in the tiny Llama artifact on the CPU: the core graph with its cache written in
# place (export/decoder/build.py), which reads the main graph's weights file
RUNTIME_GRAPH = "core_inplace_model.onnx"


def _copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "artifact"))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(seal(manifest)))


def _rehash(folder: Path, *rels: str) -> None:
    """Record the current sha256 of files changed on purpose, so only what is tested can fail."""
    def edit(manifest):
        for rel in rels:
            manifest["files"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    _edit_manifest(folder, edit)


def _refused(pattern: str | None, folder: Path, **kwargs) -> ArtifactError:
    with pytest.raises(ArtifactError, match=pattern) as raised:
        load(folder, **kwargs)
    assert "\n" not in str(raised.value)
    return raised.value


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- untrusted model code ----------------------------------------------------------------------------

EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    pass
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def remote_code_model(tiny_llama, tmp_path):
    """The tiny Llama, but its config.json maps to a .py in the folder that leaves a marker when imported."""
    folder = Path(shutil.copytree(tiny_llama["model"], tmp_path / "remote-code"))
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_remote_code_is_refused_without_the_flag(tiny_llama, remote_code_model, tmp_path):
    folder, marker = remote_code_model
    adapter = f"pt={tiny_llama['adapters']['pt']}"
    with pytest.raises(ModelError, match=r"ships its own Python code .* only with --trust-remote-code"):
        convert(folder, [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "out")
    result = CliRunner().invoke(main, ["convert", "--model", str(folder), "--adapter", adapter,
                                       "--output", str(tmp_path / "out")])
    assert result.exit_code == ModelError.exit_code and result.stderr.count("\n") == 1
    assert "--trust-remote-code" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trust_remote_code_runs_the_models_code(tiny_llama, remote_code_model, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # not the user's cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder, marker = remote_code_model
    convert(folder, [("pt", tiny_llama["adapters"]["pt"])], tmp_path / "out", trust_remote_code=True)
    assert marker.exists()
    np.testing.assert_allclose(load(tmp_path / "out").logits(IDS), load(tiny_llama["artifact"]).logits(IDS, task="pt"),
                               atol=1e-5)


@pytest.mark.parametrize("command", ["convert", "validate"])
def test_cli_threads_trust_remote_code_through(tiny_llama, tmp_path, monkeypatch, command):
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        if "options" in kwargs:  # convert takes one ExportOptions from the CLI
            seen["trust_remote_code"] = kwargs["options"].trust_remote_code
        raise SpexportError("stop here")

    monkeypatch.setattr(spexport.export if command == "convert" else spexport.validate, command, record)
    args = [command, "--model", str(tiny_llama["model"]), "--adapter", f"pt={tiny_llama['adapters']['pt']}"]
    args += ["--output", str(tmp_path / "out")] if command == "convert" else [str(tiny_llama["artifact"])]
    for flag, trusted in [([], False), (["--trust-remote-code"], True)]:
        assert CliRunner().invoke(main, args + flag).exit_code == SpexportError.exit_code
        assert seen["trust_remote_code"] is trusted


# -- paths that leave the artifact -------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt"])
@pytest.mark.parametrize("field", ["graph", "core_graph", "prompt_bank", "tokenizer_files", "files"])
def test_manifest_paths_cannot_leave_the_artifact(tiny_llama, tmp_path, field, rel):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    (tmp_path / "outside.txt").write_text("secret")

    def edit(manifest):
        digest = hashlib.sha256(b"secret").hexdigest()
        manifest["files"][rel] = digest
        if field in ("graph", "core_graph", "prompt_bank"):
            manifest[field] = rel
        elif field == "tokenizer_files":
            manifest[field].append(rel)
    _edit_manifest(folder, edit)
    _refused(rf"manifest path '{re.escape(rel)}' points outside the artifact", folder, verify=False)


def test_a_symlink_out_of_the_artifact_is_refused(tiny_llama, tmp_path):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    shutil.move(folder / "prompts.safetensors", tmp_path / "elsewhere.safetensors")
    (folder / "prompts.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    _refused(r"'prompts.safetensors' points outside the artifact", folder)


def _external_graph(folder: Path) -> None:
    """Rewrite the artifact's graph with its weights as ONNX external data, in weights.bin beside it."""
    model = onnx.load(folder / RUNTIME_GRAPH)
    convert_model_to_external_data(model, location="weights.bin")  # tensors over 1 KB, as onnx.save does
    onnx.save(model, folder / RUNTIME_GRAPH)


def _relocate(folder: Path, location: str) -> None:
    """Point every external-data reference of the artifact's graph at `location`."""
    model = onnx.load(folder / RUNTIME_GRAPH, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, folder / RUNTIME_GRAPH)


def test_external_data_inside_the_artifact_loads(tiny_llama, tmp_path):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    _external_graph(folder)
    _relocate(folder, "./weights.bin")
    _rehash(folder, RUNTIME_GRAPH, "weights.bin")
    expected = load(tiny_llama["artifact"]).logits(IDS, task="pt")
    np.testing.assert_array_equal(load(folder).logits(IDS, task="pt"), expected)


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_artifact_is_refused_before_onnx_runtime_reads_it(tiny_llama, tmp_path, escape,
                                                                                   monkeypatch):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    _external_graph(folder)
    outside = tmp_path / "weights.bin"
    shutil.move(folder / "weights.bin", outside)
    location = {"parent": "../weights.bin", "absolute": str(outside), "symlink": "link.bin"}[escape]
    if escape == "symlink":
        (folder / "link.bin").symlink_to(outside)
    _relocate(folder, location)
    _rehash(folder, RUNTIME_GRAPH)

    def onnx_runtime_must_not_open_it(*args, **kwargs):
        raise AssertionError("ONNX Runtime was given the graph")

    monkeypatch.setattr(spexport.runtime.session.ort, "InferenceSession", onnx_runtime_must_not_open_it)
    _refused(rf"external data '{re.escape(location)}' points outside the artifact", folder)


# -- integrity ---------------------------------------------------------------------------------------


def test_a_flipped_byte_in_any_file_is_refused_naming_the_file(tiny_llama, tmp_path):
    files = json.loads((tiny_llama["artifact"] / MANIFEST).read_text())["files"]
    assert {"model.onnx", "prompts.safetensors", "tokenizer.json", "adapters/pt.onnx_adapter"} <= set(files)
    for i, rel in enumerate(files):
        folder = _copy(tiny_llama["artifact"], tmp_path / str(i))
        data = bytearray((folder / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (folder / rel).write_bytes(bytes(data))
        _refused(rf"{rel} is damaged or was replaced \(sha256 differs", folder)


def test_a_swapped_or_missing_file_is_refused(tiny_llama, tmp_path):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    shutil.copy(folder / "adapters" / "prefix.onnx_adapter", folder / "adapters" / "pt.onnx_adapter")
    _refused(r"adapters/pt.onnx_adapter is damaged or was replaced", folder)
    os.remove(folder / "adapters" / "pt.onnx_adapter")
    _refused(r"adapters/pt.onnx_adapter is missing", folder)


TRUNCATIONS = {"empty": lambda n: 0, "7 bytes": lambda n: 7, "half": lambda n: n // 2,
               "a few bytes short": lambda n: n - 3}


@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
@pytest.mark.parametrize("rel", [RUNTIME_GRAPH, "prompts.safetensors", "tokenizer.json", MANIFEST])
def test_a_truncated_file_is_an_artifact_error_even_unverified(tiny_llama, tmp_path, rel, truncation):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    data = (folder / rel).read_bytes()
    (folder / rel).write_bytes(data[:TRUNCATIONS[truncation](len(data))])
    for verify in (True, False):
        _refused(re.escape(rel) if verify and rel != MANIFEST else None, folder, verify=verify)


@pytest.mark.parametrize("position", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_a_damaged_manifest_is_refused(tiny_llama, tmp_path, position):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    data = bytearray((folder / MANIFEST).read_bytes())
    data[int(len(data) * position)] ^= 0xFF
    (folder / MANIFEST).write_bytes(bytes(data))
    _refused(r"spexport.json: damaged manifest", folder)


@pytest.mark.parametrize("old, new", [('"name": "pt"', '"name": "qt"'),
                                      ('"num_virtual_tokens": 5', '"num_virtual_tokens": 4'),
                                      ('"baked": false', '"baked": true '), ('"pad_token_id"', '"pad_tokem_id"')])
def test_a_damaged_manifest_that_still_parses_is_refused(tiny_llama, tmp_path, old, new):
    """A changed byte that leaves valid JSON (a task's name, a count, a flag, a key) breaks the
    manifest's own checksum, even when no file is verified."""
    folder = _copy(tiny_llama["artifact"], tmp_path)
    text = (folder / MANIFEST).read_text()
    assert text.count(old) == 1 and len(old) == len(new)
    (folder / MANIFEST).write_text(text.replace(old, new))
    for verify in (True, False):
        _refused(r"spexport.json: damaged manifest \(its content does not match the manifest_sha256 it records\)",
                 folder, verify=verify)


@pytest.mark.parametrize("key, pattern", [
    ("num_layers", r"the manifest does not describe|tasks\[0\].shape"),
    ("num_kv_heads", r"tasks\[0\].shape"),
    ("head_dim", r"tasks\[0\].shape"),
    ("vocab_size", r"the graph's output 'logits' is \['batch_size', '(sequence|logits)_length', 160\], its manifest "
                   r"implies \['\?', '\?', 161\]"),
])
def test_a_manifest_that_does_not_fit_its_graph_is_refused(tiny_llama, tmp_path, key, pattern):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    _edit_manifest(folder, lambda manifest: manifest["model"].update({key: manifest["model"][key] + 1}))
    _refused(pattern, folder)


def test_a_manifest_and_bank_of_fewer_layers_than_the_graph_are_refused(tiny_llama, tmp_path):
    """Manifest and bank agree on one layer, the graph has two: refused at load, not at the first call."""
    folder = _copy(tiny_llama["artifact"], tmp_path)

    def one_layer(manifest):
        manifest["model"]["num_layers"] = 1
        for task in manifest["tasks"]:
            task["shape"][0] = 1
    _edit_manifest(folder, one_layer)
    _refused(r"prompt bank entry for task 'pt' is missing or misshapen", folder, verify=False)
    bank = tensorfile.load(folder / "prompts.safetensors")
    tensorfile.save({name: prefix[:1] for name, prefix in bank.items()}, folder / "prompts.safetensors")
    _rehash(folder, "prompts.safetensors")
    _refused(r"the graph takes input 'past_key_values.1.key', which its manifest does not describe", folder)


MANIFEST_FAULTS = {
    "negative count": (lambda m: m["model"].update(num_layers=-1), r"model.num_layers must be a positive integer"),
    "count as text": (lambda m: m["model"].update(head_dim="16"), r"model.head_dim must be a positive integer"),
    "huge count": (lambda m: m["model"].update(vocab_size=10 ** 30), r"model.vocab_size must be a positive integer"),
    "missing count": (lambda m: m["model"].pop("max_positions"), r"field model.max_positions is missing"),
    "eos not ints": (lambda m: m["model"].update(eos_token_ids=[3.5]), r"model.eos_token_ids must be a list"),
    "pad past vocab": (lambda m: m["model"].update(pad_token_id=160), r"model.pad_token_id must be null or a token"),
    "shape off": (lambda m: m["tasks"][0]["shape"].__setitem__(3, 6), r"tasks\[0\].shape must be \[num_layers"),
    "shape of floats": (lambda m: m["tasks"][0].update(shape=[2.0, 2, 2, 5, 16]), r"tasks\[0\].shape must be"),
    "duplicate name": (lambda m: m["tasks"][1].update(name="pt"), r"tasks\[1\].name must be a printable name "
                                                                  r"unique among the tasks, got 'pt'"),
    "unknown dtype": (lambda m: m["tasks"][0].update(dtype="float16"), r"tasks\[0\].dtype must be 'float32'"),
    "too many virtual tokens": (lambda m: m["tasks"][0].update(num_virtual_tokens=64),
                                r"tasks\[0\].num_virtual_tokens must be a positive integer below max_positions 64"),
    "no tasks": (lambda m: m.update(tasks=[]), r"field tasks must be a non-empty list"),
    "task not an object": (lambda m: m["tasks"].append(["x"]), r"tasks\[2\] must be an object"),
    "unknown field": (lambda m: m["model"].update(surprise=1), r"unexpected field 'model.surprise'"),
    "bool version": (lambda m: m.update(format_version=True), r"format_version must be a positive integer"),
    "newer version": (lambda m: m.update(format_version=2), r"artifact format 2 is newer .* upgrade spexport"),
    "baked with a bank": (lambda m: m.update(baked=True), r"prompt_bank must be null in a baked artifact"),
    "bad digest": (lambda m: m["files"].update({"config.json": "abc"}), r"files must be an object of paths to sha256"),
    "unhashed graph": (lambda m: m["files"].pop("model.onnx"), r"files has no sha256 for 'model.onnx'"),
    "newline in a path": (lambda m: m["files"].update({"a\nb": "0" * 64}), r"files must be an object of paths"),
    "name too long for the file system": (lambda m: m["files"].update({"x" * 5000: "0" * 64}), r"x{5000} is missing"),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_manifest_fields_are_checked_and_named(tiny_llama, tmp_path, fault):
    edit, pattern = MANIFEST_FAULTS[fault]
    folder = _copy(tiny_llama["artifact"], tmp_path)
    _edit_manifest(folder, edit)
    _refused(pattern, folder)


MANIFEST_TEXTS = {
    "nested too deep": ("[" * 100_000 + "]" * 100_000, r"damaged manifest"),
    "NaN": ('{"format": "spexport", "format_version": NaN}', r"format_version must be a positive integer, got nan"),
    "no version": ('{"format": "spexport"}', r"field format_version is missing"),
    "a list": ("[1, 2]", r"not a spexport manifest"),
    # a newer spexport may seal its manifest otherwise: the reader must say upgrade, not damaged
    "newer, sealed otherwise": ('{"format": "spexport", "format_version": 2, "manifest_sha256": "' + "0" * 64 + '"}',
                                r"artifact format 2 is newer .* upgrade spexport"),
    "huge": (" " * (64 << 20) + "{}", r"too large for a manifest"),
}


@pytest.mark.parametrize("case", list(MANIFEST_TEXTS))
def test_manifest_text_that_is_not_a_manifest_is_refused(tiny_llama, tmp_path, case):
    text, pattern = MANIFEST_TEXTS[case]
    folder = _copy(tiny_llama["artifact"], tmp_path)
    (folder / MANIFEST).write_text(text)
    _refused(pattern, folder, verify=False)


def test_verification_is_remembered_until_a_file_changes(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEXPORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(VerifiedFiles, "SETTLE_NS", 0)
    hashed = []
    real_sha256 = spexport.runtime.session.sha256
    monkeypatch.setattr(spexport.runtime.session, "sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    folder = _copy(tiny_llama["artifact"], tmp_path)
    count = len(json.loads((folder / MANIFEST).read_text())["files"])
    load(folder)
    assert len(hashed) == count and (tmp_path / "cache" / "verified.json").is_file()
    hashed.clear()
    load(folder)
    assert hashed == [], "a second load hashes nothing"
    # the same bytes under a new inode are hashed again, and pass
    shutil.copy(folder / "model.onnx", tmp_path / "copy.onnx")
    os.replace(tmp_path / "copy.onnx", folder / "model.onnx")
    load(folder)
    assert hashed == ["model.onnx"]
    # an edit in place that keeps the size and puts the old mtime back still changes ctime
    path, stat = folder / "prompts.safetensors", (folder / "prompts.safetensors").stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _refused(r"prompts.safetensors is damaged or was replaced", folder)
    # a cache that cannot be read or written only costs time
    (tmp_path / "cache" / "verified.json").write_text("{not json")
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    load(folder)
    monkeypatch.setenv("SPEXPORT_CACHE_DIR", str(folder / "config.json"))  # a file: no cache folder can be made
    load(folder)


# -- interrupted exports -----------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_stopped_export_leaves_the_old_artifact_and_no_partial_folder(tiny_llama, tmp_path, stop):
    """Ctrl-C, and SIGTERM as kill, docker stop or systemd send it."""
    output = tmp_path / "out" / "artifact"
    shutil.copytree(tiny_llama["artifact"], output)
    before = _snapshot(output)
    command = [sys.executable, "-m", "spexport.cli", "convert", "--model", str(tiny_llama["model"]), "--overwrite",
               "--adapter", f"pt={tiny_llama['adapters']['pt']}", "--output", str(output)]
    # A shell that starts a job in the background without job control (nohup, `cmd &` in a script)
    # makes it ignore SIGINT, and children inherit that; a terminal's Ctrl-C finds the default handler.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # the prompt bank is written to the hidden folder just before the graph export starts
    while not list(output.parent.glob(".artifact.*.partial/prompts.safetensors")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "convert never got to the export"
        time.sleep(0.002)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (1 if stop == signal.SIGINT else 143), stderr  # 1: click's "Aborted!"
    assert _snapshot(output) == before
    assert [p.name for p in output.parent.iterdir()] == ["artifact"]


@pytest.mark.parametrize("where", ["saving the bank", "exporting the graph", "removing the old artifact"])
def test_keyboard_interrupt_leaves_one_whole_artifact(tiny_llama, tmp_path, monkeypatch, where):
    output = tmp_path / "out" / "artifact"
    shutil.copytree(tiny_llama["artifact"], output)
    (output / "old.txt").write_text("the old artifact")
    before = _snapshot(output)
    real_rmtree = shutil.rmtree

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def interrupt_removing_the_old(path, *args, **kwargs):
        if str(path).endswith(".partial") and not interrupt_removing_the_old.done:  # the old, exchanged out
            interrupt_removing_the_old.done = True
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)
    interrupt_removing_the_old.done = False

    if where == "saving the bank":
        monkeypatch.setattr(spexport.export.decoder.tensorfile, "save", interrupt)
    elif where == "exporting the graph":
        monkeypatch.setattr(spexport.export.decoder, "export_graph", interrupt)
    else:
        monkeypatch.setattr(spexport.export.common.shutil, "rmtree", interrupt_removing_the_old)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"])], output, overwrite=True)
    assert [p.name for p in output.parent.iterdir()] == ["artifact"]
    if where == "removing the old artifact":  # the swap was done: the new artifact, whole
        assert not (output / "old.txt").exists() and load(output).tasks == ["pt"]
    else:
        assert _snapshot(output) == before


def test_the_artifact_folder_follows_the_umask(tiny_llama):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_llama["artifact"].stat().st_mode & 0o777 == 0o777 & ~umask


# -- many threads, bounded memory --------------------------------------------------------------------


def _requests(count: int = 16) -> list[tuple]:
    """Mixed requests: logits and short generations, one to three rows, both tasks, left padding."""
    rng = np.random.default_rng(0)
    found = []
    for i in range(count):
        rows, length = 1 + i % 3, 3 + i % 5
        mask = np.ones((rows, length), np.int64)
        mask[0, :i % 3] = 0
        tasks = [("pt", "prefix")[(i + row) % 2] for row in range(rows)]
        found.append(("logits" if i % 2 else "generate", rng.integers(4, 160, (rows, length)), mask, tasks))
    return found


def _call(model, request):
    verb, ids, mask, tasks = request
    if verb == "logits":
        return model.logits(ids, attention_mask=mask, task=tasks)
    return model.generate(ids, attention_mask=mask, task=tasks, max_new_tokens=3)


def _in_threads(model, requests, expected, threads: int, calls: int) -> list:
    wrong = []

    def serve(thread: int):
        for call in range(calls):
            i = (call * 7 + thread) % len(requests)
            if not np.array_equal(_call(model, requests[i]), expected[i]):
                wrong.append((thread, call, i))

    workers = [threading.Thread(target=serve, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return wrong


def test_threads_share_one_model_exactly_and_memory_stays_flat(tiny_llama):
    model = load(tiny_llama["artifact"])
    requests = _requests()
    expected = [_call(model, r) for r in requests]
    assert _in_threads(model, requests, expected, threads=8, calls=200) == []
    process = psutil.Process()
    rss = process.memory_info().rss  # after 1,600 calls of warm-up in the same 8 threads
    assert _in_threads(model, requests, expected, threads=8, calls=625) == []  # 5,000 calls
    grown = (process.memory_info().rss - rss) / 2 ** 20
    assert grown < 8, f"resident memory grew {grown:.1f} MiB over 5,000 calls"


# -- resource bounds ---------------------------------------------------------------------------------


def test_batches_past_max_batch_size_are_refused_before_running(tiny_llama, monkeypatch):
    model = load(tiny_llama["artifact"], max_batch_size=4)
    assert model.logits(np.full((4, 3), 5), task="pt").shape == (4, 3, 160)
    monkeypatch.setattr(model, "session", None)  # nothing may reach the graph
    for verb in ("logits", "generate"):
        with pytest.raises(InputError, match=r"a batch of 5 rows is more than this model serves at once \(4\)"):
            getattr(model, verb)(np.full((5, 3), 5), task="pt")
    default = load(tiny_llama["artifact"])
    with pytest.raises(InputError, match=r"a batch of 1025 rows .* \(1024\); split it, or pass a larger "
                                         r"max_batch_size to load\(\)"):
        default.logits(np.full((1025, 1), 5), task="pt")


def test_generation_stops_at_max_new_tokens_and_at_the_position_limit(tiny_llama, tmp_path):
    folder = _copy(tiny_llama["artifact"], tmp_path)
    _edit_manifest(folder, lambda manifest: manifest["model"].update(eos_token_ids=[]))  # nothing stops early
    model = load(folder)
    assert model.generate(IDS, task="pt", max_new_tokens=0).tolist() == IDS.tolist()
    assert model.generate(IDS, task="pt", max_new_tokens=7).shape == (1, 6 + 7)
    # 64 positions: "pt" has 5 virtual tokens, so a row holds 59 of its own; "prefix" has 6
    assert model.generate(np.full((1, 50), 5), task="pt", max_new_tokens=100).shape == (1, 59)
    assert model.generate(np.full((2, 50), 5), task=["pt", "prefix"], max_new_tokens=100).shape == (2, 58)
    assert model.generate(np.full((1, 59), 5), task="pt", max_new_tokens=100).shape == (1, 59)
