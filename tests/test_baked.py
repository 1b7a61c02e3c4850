"""Baked artifacts: model.onnx alone, in plain ONNX Runtime, picks each row's task by task_ids."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import build_adapter, build_model
from parity import max_abs_diff, peft_model

from spexport.export import convert
from spexport.runtime import load

IDS = np.array([[7, 12, 30, 41, 9, 66, 20, 5]], np.int64)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def baked(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"baked-{request.param}")
    model_dir = build_model(request.param, root / "model")
    adapters = {"pt": build_adapter(model_dir, "prompt_tuning", root / "pt", 5, seed=11),
                "prefix": build_adapter(model_dir, "prefix_tuning", root / "prefix", 3, seed=12),
                "mpt": build_adapter(model_dir, "multitask", root / "mpt", 4, seed=13)}
    convert(model_dir, list(adapters.items()), root / "artifact", bake=True)
    return model_dir, adapters, root / "artifact"


def _peft_reference(model_dir, adapters, task):
    """(PeftModel, extra forward kwargs) for a task name of the baked artifact."""
    if task.startswith("mpt/"):
        return peft_model(model_dir, adapters["mpt"]), {"task_ids": torch.tensor([int(task.split("/")[1])])}
    return peft_model(model_dir, adapters[task]), {}


def test_baked_graph_alone_in_plain_onnxruntime(baked, tmp_path):
    model_dir, adapters, artifact = baked
    shutil.copy(artifact / "model.onnx", tmp_path / "model.onnx")  # no manifest, no prompt files
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    tasks = load(artifact).tasks
    assert tasks == ["pt", "prefix", "mpt/0", "mpt/1", "mpt/2"]
    for task in ["pt", "prefix", "mpt/1"]:
        seq = IDS.shape[1]
        feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(seq)[None],
                 "task_ids": np.array([tasks.index(task)], np.int64)}
        feeds.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs})
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        assert outputs["present.0.key"].shape[2] == seq  # the caller's tokens only
        step = outputs["logits"][:, -1].argmax(-1)[:, None]
        decode = {"input_ids": step, "attention_mask": np.ones((1, seq + 1), np.int64),
                  "position_ids": np.array([[seq]]), "task_ids": feeds["task_ids"]}
        decode.update({i.name: outputs[i.name.replace("past_key_values", "present")] for i in past_inputs})
        step_outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, decode)))
        assert step_outputs["present.0.key"].shape[2] == seq + 1

        reference, kwargs = _peft_reference(model_dir, adapters, task)
        full = torch.from_numpy(np.concatenate([IDS, step], axis=1))
        with torch.no_grad():
            expected = reference(input_ids=full, **kwargs).logits[:, -(seq + 1):].numpy()
        assert max_abs_diff(outputs["logits"], expected[:, :seq]) <= 1e-4
        assert max_abs_diff(step_outputs["logits"], expected[:, seq:]) <= 1e-4


def test_baked_mixed_batch_equals_rows_alone_and_unbaked(baked, tmp_path):
    model_dir, adapters, artifact = baked
    model = load(artifact)
    assert model.manifest.baked and not (artifact / "prompts.safetensors").exists()
    rows = [IDS[0, :5], IDS[0], IDS[0, 2:5], IDS[0, 1:]]
    tasks = ["mpt/2", "pt", "prefix", "mpt/0"]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + list(r) for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    batch = model.logits(ids, mask, task=tasks)
    tokens = model.generate(ids, mask, task=tasks, max_new_tokens=10)
    convert(model_dir, list(adapters.items()), tmp_path / "unbaked")
    unbaked = load(tmp_path / "unbaked")
    for i, (row, task) in enumerate(zip(rows, tasks)):
        alone = model.logits(row[None], task=task)
        assert max_abs_diff(batch[i, width - len(row):], alone[0]) <= 1e-4
        assert max_abs_diff(alone, unbaked.logits(row[None], task=task)) <= 1e-5
        alone_tokens = model.generate(row[None], task=task, max_new_tokens=10)[0]
        np.testing.assert_array_equal(tokens[i, width - len(row):][:alone_tokens.size], alone_tokens)


def test_baked_rows_padded_anywhere_generate_as_alone(baked):
    """A baked graph's first step reads each row's last real token too (right padding, gaps)."""
    _, _, artifact = baked
    model = load(artifact)
    rows, tasks = [IDS[0, :5], IDS[0, 2:5], IDS[0, 1:4]], ["mpt/2", "pt", "prefix"]
    ids, mask = np.zeros((3, 8), np.int64), np.zeros((3, 8), np.int64)
    for i, slots in enumerate([range(5), [0, 3, 4], [2, 3, 6]]):  # right-padded, a gap, padding on every side
        ids[i, list(slots)], mask[i, list(slots)] = rows[i], 1
    tokens = model.generate(ids, mask, task=tasks, max_new_tokens=6)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        alone = model.generate(row[None], task=task, max_new_tokens=6)[0, len(row):]
        np.testing.assert_array_equal(tokens[i, 8:8 + alone.size], alone)
