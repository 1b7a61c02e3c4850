"""Prompt ensembles: stored in the sealed manifest, edited from the command line, and served as one batch whose
answers equal the members' combination computed one member at a time (classify: the mean of the members'
probabilities; generation: each token the argmax of the mean of the members' log_softmax)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from builders import EOS, build_adapter, build_model
from click.testing import CliRunner

from spexport.artifact.manifest import MANIFEST, Manifest, seal
from spexport.cli import main
from spexport.ensembles import edit_ensembles
from spexport.errors import ArtifactError, InputError, OptionError
from spexport.export import convert
from spexport.runtime import load

ENSEMBLE = ["pt", "mlp", "prefix"]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensembles")
    model = build_model("llama", root / "model")
    adapters = {"pt": build_adapter(model, "prompt_tuning", root / "pt", 5, seed=1),
                "mlp": build_adapter(model, "p_tuning_mlp", root / "mlp", 3, seed=2),
                "prefix": build_adapter(model, "prefix_tuning", root / "prefix", 6, seed=3),
                "solo": build_adapter(model, "prompt_tuning", root / "solo", 4, seed=4)}
    artifact = root / "artifact"
    convert(model, list(adapters.items()), artifact, ensembles={"ens": ENSEMBLE})
    return {"root": root, "model": model, "adapters": adapters, "artifact": artifact, "runtime": load(artifact)}


def _copy(artifact: Path, tmp_path: Path) -> Path:
    shutil.copytree(artifact, tmp_path / "copy")
    return tmp_path / "copy"


# -- the manifest ---------------------------------------------------------------------------------


def test_manifest_holds_the_ensemble_under_its_seal(decoder, tmp_path):
    assert Manifest.read(decoder["artifact"]).ensembles == {"ens": ENSEMBLE}
    assert decoder["runtime"].ensembles == {"ens": tuple(ENSEMBLE)}
    copy = _copy(decoder["artifact"], tmp_path)
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text.replace('"mlp",\n', '"solo",\n', 1))  # a member swapped, seal kept
    with pytest.raises(ArtifactError, match="damaged manifest"):
        Manifest.read(copy)


def test_artifact_without_ensembles_loads_and_writes_no_field(decoder, tmp_path):
    copy = _copy(decoder["artifact"], tmp_path)
    edit_ensembles(copy, remove=["ens"])
    assert "ensembles" not in json.loads((copy / MANIFEST).read_text())  # as written before ensembles existed
    assert load(copy).ensembles == {}


@pytest.mark.parametrize("ensembles, problem", [
    ({"ens": ["pt"]}, "at least two"), ({"ens": ["pt", "pt"]}, "names a task twice"),
    ({"ens": ["pt", "nope"]}, "'nope', which is not a task"), ({"pt": ["mlp", "prefix"]}, "the name of a task"),
    ({"ens": "pt,mlp"}, "at least two member task names"), (["pt"], "an object of names")])
def test_manifest_refuses_a_bad_ensemble(decoder, tmp_path, ensembles, problem):
    copy = _copy(decoder["artifact"], tmp_path)
    document = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps(seal({**document, "ensembles": ensembles})))
    with pytest.raises(ArtifactError, match=f"field ensembles.*{problem}"):
        Manifest.read(copy)


# -- the command line -----------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_convert_add_and_remove_ensembles(decoder, tmp_path):
    out = tmp_path / "artifact"
    adapters = [a for name in ("pt", "mlp", "prefix") for a in ("--adapter", f"{name}={decoder['adapters'][name]}")]
    result = _cli("convert", "--model", decoder["model"], "--output", out, *adapters, "--ensemble", "a=pt,mlp",
                  "--ensemble", "b=mlp,prefix")
    assert result.exit_code == 0, result.output
    assert load(out).ensembles == {"a": ("pt", "mlp"), "b": ("mlp", "prefix")}
    result = _cli("add", out, "--ensemble", "c=pt,prefix,mlp")
    assert result.exit_code == 0 and "ensemble c: pt, prefix, mlp" in result.output, result.output
    result = _cli("add", out, "--ensemble", "c=pt,mlp")
    assert result.exit_code == InputError.exit_code and "already has an ensemble 'c'" in result.output
    assert _cli("add", out, "--ensemble", "c=pt,mlp", "--replace").exit_code == 0
    # a new task and an ensemble that needs it, in one update
    result = _cli("add", out, "--adapter", f"solo={decoder['adapters']['solo']}", "--ensemble", "d=solo,pt")
    assert result.exit_code == 0, result.output
    assert load(out).ensembles == {"a": ("pt", "mlp"), "b": ("mlp", "prefix"), "c": ("pt", "mlp"),
                                   "d": ("solo", "pt")}
    result = _cli("remove", out, "solo")
    assert result.exit_code == InputError.exit_code, result.output
    assert result.output.strip().count("\n") == 0 and "member of ensemble 'd'" in result.output
    assert _cli("remove", out, "solo", "--ensemble", "d").exit_code == 0
    assert _cli("remove", out, "--ensemble", "a", "--ensemble", "b").exit_code == 0
    assert Manifest.read(out).ensembles == {"c": ["pt", "mlp"]} and "solo" not in load(out).tasks
    result = _cli("remove", out, "--ensemble", "zzz")
    assert result.exit_code == InputError.exit_code and "no ensemble 'zzz'" in result.output


@pytest.mark.parametrize("spec, message", [
    ("ens", "is not NAME=TASK,TASK"), ("=pt,mlp", "is not NAME=TASK,TASK"), ("ens=pt,,mlp", "is not NAME=TASK"),
    ("ens=pt", "at least two"), ("ens=pt,pt", "names a task twice"), ("ens=pt,nope", "'nope', which is not a task"),
    ("pt=mlp,prefix", "the name of a task")])
def test_cli_refuses_a_bad_spec_in_one_line(decoder, tmp_path, spec, message):
    copy = _copy(decoder["artifact"], tmp_path)
    before = (copy / MANIFEST).read_bytes()
    result = _cli("add", copy, "--ensemble", spec)
    assert result.exit_code == OptionError.exit_code, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1 and message in result.output
    assert (copy / MANIFEST).read_bytes() == before


def test_cli_convert_refuses_a_bad_ensemble_and_writes_nothing(decoder, tmp_path):
    out = tmp_path / "artifact"
    result = _cli("convert", "--model", decoder["model"], "--output", out, "--adapter",
                  f"pt={decoder['adapters']['pt']}", "--ensemble", "e=pt,missing")
    assert result.exit_code == OptionError.exit_code and "'missing', which is not a task" in result.output
    assert not out.exists()


def test_runtime_keeps_an_ensembles_members(decoder, tmp_path):
    m = load(_copy(decoder["artifact"], tmp_path))
    with pytest.raises(InputError, match="member of ensemble 'ens'"):
        m.remove_task("mlp")
    with pytest.raises(Exception, match="ensemble named 'ens'"):
        m.add_task("ens", decoder["adapters"]["solo"])


# -- generation -----------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def _ensemble_greedy(m, prompt: list[int], members, new_tokens: int) -> list[int]:
    """Each token the argmax of the mean of the members' log_softmax, every member run alone on the shared
    continuation with `logits`."""
    out = []
    for _ in range(new_tokens):
        means = np.mean([_log_softmax(m.logits([prompt + out], task=task)[0, -1]) for task in members], axis=0)
        out.append(int(means.argmax()))
        if out[-1] == EOS:
            break
    return out


def _new(row: np.ndarray, width: int) -> list[int]:
    tokens = row[width:].tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_generate_picks_the_mean_of_the_members_log_probabilities(decoder):
    m = decoder["runtime"]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 150, size=n).tolist() for n in (7, 3, 10)]
    for prompt in prompts:
        got = m.generate([prompt], task="ens", max_new_tokens=10)
        assert _new(got[0], len(prompt)) == _ensemble_greedy(m, prompt, ENSEMBLE, 10)
        assert got[0, :len(prompt)].tolist() == prompt
        assert all(m.generate([prompt], task=t, max_new_tokens=10)[0].tolist() != got[0].tolist() for t in ENSEMBLE)
    # one batch: padded rows of the ensemble and of plain tasks, each as it is alone
    width = max(map(len, prompts))
    ids = np.zeros((4, width), np.int64)
    mask = np.zeros_like(ids)
    rows = prompts + [prompts[1]]
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    tasks = ["ens", "solo", "ens", "pt"]
    batch = m.generate(ids, mask, task=tasks, max_new_tokens=10)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        alone = m.generate([row], task=task, max_new_tokens=10)[0, len(row):]
        assert batch[i, width:].tolist()[:len(alone)] == alone.tolist()


def test_every_text_verb_takes_an_ensemble(decoder):
    m = decoder["runtime"]
    text = "the cat sat on"
    ids = m.tokenizer.encode(text).ids
    expected = _ensemble_greedy(m, ids, ENSEMBLE, 8)
    expected_text = m.tokenizer.decode([t for t in expected if t != EOS])
    assert m.generate_text(text, task="ens", max_new_tokens=8) == [expected_text]
    assert "".join(m.stream(text, task="ens", max_new_tokens=8)) == expected_text
    columns = np.stack(list(m.generate_columns([ids], task="ens", max_new_tokens=8)), axis=1)[0].tolist()
    assert columns[:len(expected)] == expected
    sampled = [m.generate_text([text, "a dog"], task=["ens", "pt"], max_new_tokens=6, do_sample=True, seed=3)
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_logits_refuses_an_ensemble(decoder):
    with pytest.raises(InputError, match="'ens' is an ensemble of pt, mlp, prefix: pass a member"):
        decoder["runtime"].logits([[5, 6, 7]], task="ens")


# -- classification -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, one_torch_thread):
    from test_encoders import SEQ, build_base
    from test_encoders import build_adapter as build_head_adapter

    root = tmp_path_factory.mktemp("ensemble-classifier")
    model = build_base("bert", root / "model")
    specs = {"a": (SEQ, "prompt_tuning", 3, 3), "b": (SEQ, "p_tuning_mlp", 4, 3), "c": (SEQ, "prefix_tuning", 2, 3),
             "two": (SEQ, "prompt_tuning", 2, 2)}
    adapters = [(name, build_head_adapter(model, "bert", spec, root / name, seed=i + 1))
                for i, (name, spec) in enumerate(specs.items())]
    convert(model, adapters, root / "artifact", ensembles={"abc": ["a", "b", "c"]})
    return load(root / "artifact")


def test_classify_returns_the_mean_probability_and_each_members_answer(classifier):
    texts = ["the cat sat on the mat", "a dog ran", "red green blue yellow and more words"]
    got = classifier.classify(texts, task="abc")
    labels = classifier.labels["a"]
    for text, answer in zip(texts, got):
        probs = []
        for member, task in zip(answer["members"], "abc"):
            alone = classifier.classify(text, task=task)[0]
            assert member == {"task": task, **alone}
            logits = classifier.logits([classifier.tokenizer.encode(text).ids], task=task)[0].astype(np.float64)
            probs.append(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
        mean = np.mean(probs, axis=0)
        assert answer["label"] == labels[int(mean.argmax())]
        assert answer["score"] == pytest.approx(float(mean.max()), abs=1e-6)
    mixed = classifier.classify(texts, task=["two", "abc", "a"])
    assert mixed[0] == classifier.classify(texts[0], task="two")[0] and set(mixed[0]) == {"label", "score"}
    assert mixed[1] == got[1] and mixed[2] == classifier.classify(texts[2], task="a")[0]


def test_classifier_ensemble_members_share_their_labels(classifier, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(classifier.folder, folder)
    with pytest.raises(OptionError, match="labels differ"):
        edit_ensembles(folder, {"bad": ["a", "two"]})
    with pytest.raises(InputError, match="'abc' is an ensemble"):
        classifier.logits([[5, 6]], task="abc")


# -- the server -----------------------------------------------------------------------------------


def _get(port: int, path: str) -> dict:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", path)
    return json.loads(connection.getresponse().read())


def test_server_lists_and_serves_ensembles(decoder, classifier, tmp_path):
    pytest.importorskip("uvicorn")
    from test_serve import post, served

    m = decoder["runtime"]
    with served(decoder["artifact"], tmp_path) as (_, port):
        models = {entry["id"]: entry for entry in _get(port, "/v1/models")["data"]}
        assert set(models) == {*m.tasks, "ens"} and models["ens"]["ensemble"] == ENSEMBLE
        assert "ensemble" not in models["pt"]
        status, body = post(port, "/v1/completions", {"model": "ens", "prompt": "the cat sat on", "max_tokens": 8,
                                                      "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == m.generate_text("the cat sat on", task="ens",
                                                                               max_new_tokens=8)[0]
        status, body = post(port, "/v1/completions", {"model": "nope", "prompt": "a"})
        assert status == 404 and "its ensembles ens" in body["error"]["message"]
    with served(classifier.folder, tmp_path) as (_, port):
        listed = _get(port, "/v1/models")["data"][-1]
        assert (listed["id"], listed["ensemble"]) == ("abc", ["a", "b", "c"])
        status, body = post(port, "/v1/classify", {"model": "abc", "input": ["a dog ran"]})
        assert status == 200 and body["data"][0]["result"] == classifier.classify("a dog ran", task="abc")[0]


def test_encoder_decoder_generation_picks_the_mean_of_the_members_log_probabilities(tmp_path, one_torch_thread):
    import torch
    from builders import save_tokenizer
    from test_seq2seq import METHODS as SEQ2SEQ_METHODS
    from test_seq2seq import MODELS
    from test_seq2seq import build_adapter as build_seq2seq_adapter

    torch.manual_seed(0)
    MODELS["t5"]().save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    adapters = [(name, build_seq2seq_adapter(tmp_path / "model", make(n), tmp_path / name, seed=i + 1))
                for i, (name, (make, n)) in enumerate(SEQ2SEQ_METHODS.items()) if name in ("pt", "mlp", "prefix")]
    convert(tmp_path / "model", adapters, tmp_path / "artifact", ensembles={"ens": ["pt", "mlp", "prefix"]})
    m = load(tmp_path / "artifact")
    prompt = [[17, 40, 95, 23, 8, 61]]
    got = m.generate(prompt, task="ens", max_new_tokens=8)[0].tolist()
    out = got[:1]  # the decoder start token
    for _ in range(8):
        means = np.mean([_log_softmax(m.logits(prompt, task=t, decoder_input_ids=[out])[0, -1])
                         for t in ("pt", "mlp", "prefix")], axis=0)
        out.append(int(means.argmax()))
        if out[-1] == EOS:
            break
    assert got[:len(out)] == out
    assert any(m.generate(prompt, task=t, max_new_tokens=8)[0].tolist() != got for t in ("pt", "mlp", "prefix"))
