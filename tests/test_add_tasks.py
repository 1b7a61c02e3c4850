"""Tasks added to a decoder artifact without torch equal tasks converted at export, and match PEFT."""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from builders import build_adapter
from click.testing import CliRunner
from parity import peft_generate, peft_logits, peft_model
from test_torch_free import BLOCKED

from spexport import tasks as tasks_module
from spexport.artifact import tensorfile
from spexport.artifact.manifest import Manifest
from spexport.cli import main
from spexport.export import convert
from spexport.runtime import load

IDS = np.array([[5, 9, 14, 22, 40, 7, 33]], np.int64)
NEW_TOKENS = 10
# name: (builder method, virtual tokens); "raw-embeds" and "raw-kv" are bare .npy tensors
ADDED = {"pt2": ("prompt_tuning", 4), "mlp": ("p_tuning_mlp", 3), "lstm": ("p_tuning_lstm", 2),
         "prefix2": ("prefix_tuning", 5), "proj": ("prefix_projection", 3), "mpt": ("multitask", 4)}


@pytest.fixture(scope="module")
def added(tiny_llama, tmp_path_factory):
    """Adapters of every method and two raw tensors, and an artifact with all of them converted at export."""
    root = tmp_path_factory.mktemp("added")
    model = tiny_llama["model"]
    adapters = {name: build_adapter(model, method, root / name, n, seed=10 + i)
                for i, (name, (method, n)) in enumerate(ADDED.items())}
    rng = np.random.default_rng(3)
    np.save(root / "raw-embeds.npy", rng.normal(size=(3, 64)).astype(np.float32))
    np.save(root / "raw-kv.npy", rng.normal(size=(2, 2, 2, 4, 16)).astype(np.float32))
    adapters |= {"raw-embeds": root / "raw-embeds.npy", "raw-kv": root / "raw-kv.npy"}
    exported = root / "exported"
    convert(model, list(tiny_llama["adapters"].items()) + list(adapters.items()), exported)
    return {"adapters": adapters, "exported": exported}


def run_torch_free(script: str, *args) -> dict:
    """Run `script` (which sets `result`) in a Python that cannot import torch, transformers, peft or optimum."""
    prelude = f"import json, sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\nresult = {{}}\n"
    report = (f"\nresult['heavy'] = [n for n in sys.modules if n.split('.')[0] in {BLOCKED!r} and sys.modules[n]]\n"
              "print(json.dumps(result))\n")
    done = subprocess.run([sys.executable, "-c", prelude + script + report, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def copy_artifact(tiny_llama, tmp_path):
    target = tmp_path / "artifact"
    shutil.copytree(tiny_llama["artifact"], target)
    return target


def test_add_without_torch_equals_export_and_matches_peft(tiny_llama, added, tmp_path):
    artifact = copy_artifact(tiny_llama, tmp_path)
    specs = [f"{name}={path}" for name, path in added["adapters"].items()]
    result = run_torch_free("""
import numpy as np
from spexport.cli import main
from spexport.runtime import load
try:
    main(["add", sys.argv[1], "--quiet", *[a for s in sys.argv[2:] for a in ("--adapter", s)]])
except SystemExit as e:
    assert e.code == 0, e.code
m = load(sys.argv[1])
ids = np.array([[5, 9, 14, 22, 40, 7, 33]])
result["tasks"] = m.tasks
result["logits"] = {t: m.logits(ids, task=t).tolist() for t in m.tasks}
result["tokens"] = {t: m.generate(ids, task=t, max_new_tokens=10).tolist() for t in m.tasks}
""", artifact, *specs)
    assert result["heavy"] == []
    exported = load(added["exported"])
    assert result["tasks"] == exported.tasks  # added tasks follow the old ones, in the order given
    bank, reference = tensorfile.load(artifact / "prompts.safetensors"), tensorfile.load(added["exported"] /
                                                                                          "prompts.safetensors")
    for task in exported.tasks:
        np.testing.assert_allclose(bank[task], reference[task], rtol=1e-5, atol=1e-6)
    for task, path in added["adapters"].items():
        if task.startswith("raw") or task == "mpt":  # no PEFT model; MPT: the next test, with task_ids
            continue
        peft = peft_model(tiny_llama["model"], path)
        assert np.abs(np.array(result["logits"][task]) - peft_logits(peft, IDS)).max() <= 1e-4, task
        np.testing.assert_array_equal(result["tokens"][task], peft_generate(peft, IDS, NEW_TOKENS))
    for task in exported.tasks:  # every task, MPT and raw tensors included, serves as the exported one does
        assert np.abs(np.array(result["logits"][task]) - exported.logits(IDS, task=task)).max() <= 1e-5
        assert result["tokens"][task] == exported.generate(IDS, task=task, max_new_tokens=NEW_TOKENS).tolist()


def test_mpt_added_matches_peft_with_task_ids(tiny_llama, added, tmp_path):
    import torch

    artifact = copy_artifact(tiny_llama, tmp_path)
    tasks_module.add_tasks(artifact, [("mpt", added["adapters"]["mpt"])])
    m = load(artifact)
    peft = peft_model(tiny_llama["model"], added["adapters"]["mpt"])
    for i in range(3):
        with torch.no_grad():
            expected = peft(input_ids=torch.from_numpy(IDS), task_ids=torch.tensor([i])).logits.numpy()
        assert np.abs(m.logits(IDS, task=f"mpt/{i}") - expected[:, -IDS.shape[1]:]).max() <= 1e-4


def test_remove_and_replace(tiny_llama, added, tmp_path):
    artifact = copy_artifact(tiny_llama, tmp_path)
    tasks_module.add_tasks(artifact, [("mpt", added["adapters"]["mpt"]), ("mlp", added["adapters"]["mlp"])])
    tasks_module.remove_tasks(artifact, ["pt", "mpt/1"])
    m = load(artifact)
    assert m.tasks == ["prefix", "mpt/0", "mpt/2", "mlp"]
    assert sorted(p.name for p in (artifact / "adapters").iterdir()) == [
        "mlp.onnx_adapter", "mpt%2F0.onnx_adapter", "mpt%2F2.onnx_adapter", "prefix.onnx_adapter"]
    exported = load(added["exported"])
    for task in m.tasks:
        assert np.abs(m.logits(IDS, task=task) - exported.logits(IDS, task=task)).max() <= 1e-5
    tasks_module.add_tasks(artifact, [("prefix", added["adapters"]["pt2"])], replace=True)
    m = load(artifact)
    assert m.tasks[0] == "prefix" and m.num_virtual_tokens["prefix"] == 4  # kept its id, took the new prompt
    assert np.abs(m.logits(IDS, task="prefix") - exported.logits(IDS, task="pt2")).max() <= 1e-5


def test_live_add_and_remove_while_other_threads_serve(tiny_llama, added):
    m = load(tiny_llama["artifact"])
    exported = load(added["exported"])
    expected = {t: exported.generate(IDS, task=t, max_new_tokens=6) for t in ["pt", "prefix", "mlp", "proj"]}
    errors, stop = [], threading.Event()

    def serve(task):
        while not stop.is_set():
            try:
                got = m.generate(IDS, task=task, max_new_tokens=6)
            except Exception as e:  # a task removed under this thread is refused, never served wrongly
                if task in m.tasks:
                    errors.append(repr(e))
                continue
            if not np.array_equal(got, expected[task]):
                errors.append(f"{task}: {got} != {expected[task]}")

    threads = [threading.Thread(target=serve, args=(t,)) for t in ["pt", "prefix"]]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert m.add_task("mlp", added["adapters"]["mlp"]) == ["mlp"]
            assert m.add_task("proj", added["adapters"]["proj"]) == ["proj"]
            assert m.tasks == ["pt", "prefix", "mlp", "proj"]
            np.testing.assert_array_equal(m.generate(IDS, task="proj", max_new_tokens=6), expected["proj"])
            m.remove_task("mlp")
            np.testing.assert_array_equal(m.generate(IDS, task="proj", max_new_tokens=6), expected["proj"])
            m.remove_task("proj")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert m.tasks == ["pt", "prefix"]
    with pytest.raises(Exception, match="already serves a task 'pt'"):
        m.add_task("pt", added["adapters"]["mlp"])


def test_a_failed_or_interrupted_update_leaves_the_artifact_intact(tiny_llama, added, tmp_path, monkeypatch):
    artifact = copy_artifact(tiny_llama, tmp_path)
    before = {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*") if p.is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks_module.ort_adapters, "write_adapters", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tasks_module.add_tasks(artifact, [("mlp", added["adapters"]["mlp"])])
    after = {p.relative_to(artifact): p.read_bytes() for p in artifact.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]  # no staging folder left behind
    load(artifact)


def test_errors_are_one_line_with_exit_codes(tiny_llama, added, tmp_path):
    artifact = copy_artifact(tiny_llama, tmp_path)
    runner = CliRunner()

    def fails(args, code, text):
        result = runner.invoke(main, args)
        assert result.exit_code == code, result.output
        assert text in result.output and result.output.count("\n") == 1, result.output

    mlp = added["adapters"]["mlp"]
    fails(["add", str(artifact), "--adapter", f"pt={mlp}"], 4, "already has a task 'pt'; pass --replace")
    fails(["remove", str(artifact), "nope"], 6, "has no task 'nope'; its tasks are pt, prefix")
    fails(["remove", str(artifact), "pt", "prefix"], 6, "would leave")
    fails(["add", str(artifact), "--adapter", f"x={tmp_path}"], 4, "not a PEFT adapter folder")
    baked = tmp_path / "baked"
    convert(tiny_llama["model"], list(tiny_llama["adapters"].items()), baked, bake=True)
    assert not (baked / "genai_config.json").exists() and Manifest.read(baked).prefix_graph is None
    fails(["add", str(baked), "--adapter", f"mlp={added['adapters']['mlp']}"], 5, "the artifact is baked")
    fails(["remove", str(baked), "pt"], 5, "the artifact is baked")
    result = runner.invoke(main, ["add", str(artifact), "--adapter", f"mlp={added['adapters']['mlp']}"])
    assert result.exit_code == 0 and "+ 2 mlp: P_TUNING, 3 virtual tokens" in result.output


def test_encoder_artifacts_are_refused_in_one_line(tiny_llama, tmp_path):
    import dataclasses

    from spexport.errors import ArtifactError
    from spexport.runtime.prefix import check_editable

    manifest = Manifest.read(tiny_llama["artifact"])
    for family, text in [("encoder", "head graphs that only `spexport convert` builds"),
                         ("other", "family 'other' is not served by this spexport")]:
        with pytest.raises(ArtifactError, match=text):
            check_editable(tmp_path, dataclasses.replace(manifest, family=family))
