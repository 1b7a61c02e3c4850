"""Runtime behaviour beyond parity: manifest, integrity, providers, sampling, text helpers."""

import json
import shutil

import numpy as np
import pytest
from conftest import TASKS

from spexport.artifact import tensorfile
from spexport.artifact.integrity import sha256
from spexport.errors import ArtifactError, InputError
from spexport.runtime import load

IDS = np.array([[5, 9, 14, 22, 40, 7]], np.int64)


def test_manifest_lists_tasks_files_and_versions(built):
    manifest = json.loads((built["artifact"] / "spexport.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == list(TASKS)
    for task in manifest["tasks"]:
        n_virtual = TASKS[task["name"]][1]
        assert task["num_virtual_tokens"] == n_virtual and task["dtype"] == "float32"
        assert task["shape"][3] == n_virtual and task["shape"][:2] == [manifest["model"]["num_layers"], 2]
    assert {"torch", "transformers", "peft", "onnx", "spexport"} <= set(manifest["versions"])
    assert {"model.onnx", "prompts.safetensors", "tokenizer.json", "config.json"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert sha256(built["artifact"] / name) == digest
    bank = tensorfile.load(built["artifact"] / "prompts.safetensors")
    assert {k: list(v.shape) for k, v in bank.items()} == {t["tensor"]: t["shape"] for t in manifest["tasks"]}


def test_damaged_file_is_refused(built, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(built["artifact"], copy)
    data = bytearray((copy / "prompts.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "prompts.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="prompts.safetensors is damaged"):
        load(copy)


def test_unknown_provider_is_refused(built):
    """(tests/runtime/test_device.py: providers in full.)"""
    with pytest.raises(InputError, match="'NoSuchExecutionProvider' is not an ONNX Runtime execution provider"):
        load(built["artifact"], providers=["NoSuchExecutionProvider"])


def test_sampling_is_seeded_and_top_k_1_is_greedy(runtime_model):
    greedy = runtime_model.generate(IDS, task="pt", max_new_tokens=8)
    top1 = runtime_model.generate(IDS, task="pt", max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    np.testing.assert_array_equal(top1, greedy)
    kwargs = dict(task="pt", max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    first, second = runtime_model.generate(IDS, **kwargs), runtime_model.generate(IDS, **kwargs)
    np.testing.assert_array_equal(first, second)
    others = [runtime_model.generate(IDS, **{**kwargs, "seed": s}) for s in range(8, 12)]
    assert any(not np.array_equal(first, o) for o in others)


def test_generate_text_decodes_new_tokens(runtime_model):
    texts = ["the cat sat", "one two"]
    got = runtime_model.generate_text(texts, task=["pt", "prefix"], max_new_tokens=6)
    for text, task, out in zip(texts, ["pt", "prefix"], got):
        ids = runtime_model.tokenizer.encode(text).ids
        tokens = runtime_model.generate(np.array([ids]), task=task, max_new_tokens=6)[0, len(ids):]
        assert out == runtime_model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def test_generation_feeds_the_prefix_once_as_the_past(runtime_model):
    """generate's first step gives the graph each row's prefix as its past (and no prefix inputs, or
    empty ones), so later steps pass `present` back as it is; the logits equal the main graph's, which
    joins the prefix itself from kv_prefix and prefix_mask (what C++, C# and Node clients run)."""
    import onnxruntime as ort

    from spexport.artifact.ports import KV_PREFIX, PREFIX_MASK, stack_prefixes

    tasks = ["pt", "proj"]  # 5 and 2 virtual tokens
    rows = [runtime_model.tasks.index(t) for t in tasks]
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int64)  # row 0 left-padded
    prefix, past, full_mask, positions = runtime_model._first_step(mask, rows, runtime_model.task_table())
    core = runtime_model.manifest.core_graph is not None
    assert prefix == {} if core else (prefix[KV_PREFIX].shape[4] == 0 and prefix[PREFIX_MASK].shape == (2, 0))
    assert all(p.shape[2] == 5 for p in past)
    np.testing.assert_array_equal(full_mask, [[1, 1, 1, 1, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(positions, [[6, 5, 6], [2, 3, 4]])
    ids = np.random.default_rng(3).integers(4, 150, (2, 3)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": full_mask, "position_ids": positions, **prefix,
             **dict(zip(runtime_model._past_names, past))}
    if "logits_positions" in {value.name for value in runtime_model.session.get_inputs()}:  # the core graph
        feeds["logits_positions"] = np.array([[0, 1, 2]] * 2, np.int64)
    got = runtime_model.session.run(["logits"], feeds)[0]
    main = ort.InferenceSession(str(runtime_model.folder / runtime_model.manifest.graph))
    kv, prefix_mask = stack_prefixes([runtime_model._table.prompts[r] for r in rows])
    empty = np.zeros((2, runtime_model.info.num_kv_heads, 0, runtime_model.info.head_dim), np.float32)
    want = main.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": positions - prefix_mask.sum(
        axis=1, keepdims=True), KV_PREFIX: kv, PREFIX_MASK: prefix_mask, **dict.fromkeys(runtime_model._past_names,
                                                                                         empty)})[0]
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= 1e-5
    # logits() joins the prefix the same way (a windowed model runs its padded rows alone: float noise)
    np.testing.assert_allclose(runtime_model.logits(ids, mask, task=tasks)[real], got[real], atol=1e-5)


def test_core_graph_computes_the_logits_of_the_positions_asked(runtime_model):
    """Generation asks the core graph for each row's last real token only; those logits are the ones
    it gives for every position. (Traced graphs have no core graph: the runtime runs the main one.)"""
    if runtime_model.manifest.core_graph is None:  # a traced graph: the runtime runs the main graph, all positions
        assert runtime_model._graph.name == runtime_model.manifest.graph
        assert "logits_positions" not in {value.name for value in runtime_model.session.get_inputs()}
        assert runtime_model.info.model_type not in ("llama", "mistral", "qwen2")  # those are written directly
        return
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.int64)  # row 0 right-padded, row 1 left-padded
    prefix, past, joined, positions = runtime_model._first_step(mask, [0, 1], runtime_model.task_table())
    ids = np.random.default_rng(5).integers(4, 150, (2, 4)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": joined, "position_ids": positions, **prefix,
             **dict(zip(runtime_model._past_names, past))}
    run = runtime_model.session.run
    every = run(["logits"], {**feeds, "logits_positions": np.array([[0, 1, 2, 3]] * 2, np.int64)})[0]
    last = run(["logits"], {**feeds, "logits_positions": np.array([[2], [3]], np.int64)})[0]
    assert last.shape == (2, 1, runtime_model.info.vocab_size)
    np.testing.assert_allclose(last[:, 0], every[[0, 1], [2, 3]], atol=1e-5)


def test_one_row_first_step_reads_the_bank_without_copying_it(runtime_model):
    """A one-row request's past is the bank's own memory, so a long prefix costs no copy per
    request; its mask covers exactly the task's virtual tokens and its positions follow them."""
    row = runtime_model.tasks.index("pt")  # 5 virtual tokens
    _, past, full_mask, positions = runtime_model._first_step(np.ones((1, 3), np.int64), [row],
                                                                 runtime_model.task_table())
    bank = runtime_model._table.prompts[row]
    assert all(np.shares_memory(p, bank) for p in past)
    np.testing.assert_array_equal(past[1][0], bank[0, 1])  # layer 0's values
    np.testing.assert_array_equal(full_mask, [[1] * 8])
    np.testing.assert_array_equal(positions, [[5, 6, 7]])
    assert runtime_model.generate(np.array([[7, 8, 9]]), task="pt", max_new_tokens=3).shape == (1, 6)
