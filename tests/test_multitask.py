"""Multitask prompt tuning and raw prompt tensors convert exactly (issue: MPT, raw tensors)."""

import numpy as np
import pytest
import torch
from builders import build_adapter, build_model
from parity import max_abs_diff, peft_generate, peft_model
from safetensors.numpy import save_file

from spexport.artifact import tensorfile
from spexport.errors import AdapterError
from spexport.export import convert
from spexport.runtime import load

IDS = np.array([[7, 12, 30, 41, 9, 66]], np.int64)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def mpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mpt-{request.param}")
    model_dir = build_model(request.param, root / "model")
    adapter = build_adapter(model_dir, "multitask", root / "mpt", num_virtual_tokens=4, seed=5)
    artifact = root / "artifact"
    convert(model_dir, [("mpt", adapter)], artifact)
    return model_dir, adapter, load(artifact)


def test_multitask_adapter_becomes_one_task_per_source_task(mpt):
    model_dir, adapter, runtime = mpt
    assert runtime.tasks == ["mpt/0", "mpt/1", "mpt/2"]
    reference = peft_model(model_dir, adapter)
    ids = torch.from_numpy(IDS)
    for i, task in enumerate(runtime.tasks):
        task_ids = torch.tensor([i])
        with torch.no_grad():
            expected = reference(input_ids=ids, task_ids=task_ids).logits[:, -IDS.shape[1]:].numpy()
        tokens = peft_generate(reference, IDS, 12, task_ids=task_ids)
        assert max_abs_diff(runtime.logits(IDS, task=task), expected) <= 1e-4
        np.testing.assert_array_equal(runtime.generate(IDS, task=task, max_new_tokens=12), tokens)
    assert max_abs_diff(runtime.logits(IDS, task="mpt/0"), runtime.logits(IDS, task="mpt/1")) > 1e-3


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    model_dir = build_model("llama", root / "model")
    return root, model_dir, build_adapter(model_dir, "prompt_tuning", root / "pt", num_virtual_tokens=5, seed=9), \
        build_adapter(model_dir, "prefix_tuning", root / "prefix", num_virtual_tokens=3, seed=10)


def test_raw_tensors_behave_like_the_adapters_holding_them(llama):
    root, model_dir, pt, prefix = llama
    prompt = tensorfile.load(pt / "adapter_model.safetensors")["prompt_embeddings"]
    np.save(root / "prompt.npy", prompt)
    save_file({"prompt": prompt}, root / "prompt.safetensors")
    convert(model_dir, [("pt", pt), ("prefix", prefix)], root / "from-peft")
    peft_artifact = load(root / "from-peft")
    kv = peft_artifact._table.prompts[1]  # the prefix adapter's canonical [layers, 2, kv_heads, n, head_dim]
    save_file({"kv": kv}, root / "kv.safetensors")
    convert(model_dir, [("npy", root / "prompt.npy"), ("st", root / "prompt.safetensors"),
                        ("kv", root / "kv.safetensors")], root / "from-raw")
    raw = load(root / "from-raw")
    for raw_task, peft_task in [("npy", "pt"), ("st", "pt"), ("kv", "prefix")]:
        assert max_abs_diff(raw.logits(IDS, task=raw_task), peft_artifact.logits(IDS, task=peft_task)) <= 1e-6
    expected = peft_model(model_dir, pt)
    with torch.no_grad():
        reference = expected(input_ids=torch.from_numpy(IDS)).logits[:, -IDS.shape[1]:].numpy()
    assert max_abs_diff(raw.logits(IDS, task="npy"), reference) <= 1e-4


@pytest.mark.parametrize("shape,match", [
    ((5, 48), "hidden size.*48.*64"),
    ((3, 2, 2, 3, 16), r"KV prefix shape \[3, 2, 2, 3, 16\].*\[2, 2, 2, 3, 16\]"),
    ((5,), "neither a prompt"),
])
def test_raw_tensor_that_does_not_fit_is_refused(llama, tmp_path, shape, match):
    _, model_dir, _, _ = llama
    np.save(tmp_path / "bad.npy", np.zeros(shape, np.float32))
    with pytest.raises(AdapterError, match=match):
        convert(model_dir, [("bad", tmp_path / "bad.npy")], tmp_path / "out")
    assert not (tmp_path / "out").exists()
