"""Every adapter is checked before the frozen model loads: its config's fields, and every tensor's type,
shape and values. A bad one is refused in one line that names it; nothing is cast or written."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checks import ends_cleanly, invoke, one_line
from safetensors.numpy import load_file, save_file

from spexport.errors import AdapterError
from spexport.export import convert


def _adapter(source: Path, folder: Path, config=None, weights=None, text: str | None = None) -> Path:
    """A copy of the adapter at `source`, its config and weights edited in place."""
    shutil.copytree(source, folder)
    if config is not None:
        edited = json.loads((folder / "adapter_config.json").read_text())
        config(edited)
        (folder / "adapter_config.json").write_text(json.dumps(edited))
    if text is not None:
        (folder / "adapter_config.json").write_text(text)
    if weights is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        weights(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _set(key, value):
    return lambda config: config.update({key: value})


def _poke(name, index, value):
    return lambda tensors: tensors[name].__setitem__(index, value)


def _retype(name, dtype, extra=0):
    return lambda tensors: tensors.update({name: tensors[name].astype(dtype) + extra})


def _npy(folder: Path, array) -> Path:
    np.save(folder.with_suffix(".npy"), array)
    return folder.with_suffix(".npy")


def _bin(source: Path, folder: Path, dtype) -> Path:
    """The adapter saved as a pickled adapter_model.bin, its tensors of `dtype`."""
    folder = _adapter(source, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    torch.save({k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder


PROMPT = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
NAN_PROMPT = PROMPT.copy()
NAN_PROMPT[1, 2] = np.nan
# case: (build(prompt-tuning adapter, prefix-tuning adapter, folder) -> adapter path, message pattern)
BAD_ADAPTERS = {
    "NaN in a prompt-tuning prompt": (
        lambda pt, pre, f: _adapter(pt, f, weights=_poke("prompt_embeddings", (0, 3), np.nan)),
        r"adapter x: .*: prompt_embeddings holds NaN or Inf \(first at \[0, 3\]\)"),
    "Inf in a prefix": (lambda pt, pre, f: _adapter(pre, f, weights=_poke("prompt_embeddings", (2, 0), -np.inf)),
                        r"adapter x: .*: prompt_embeddings holds NaN or Inf \(first at \[2, 0\]\)"),
    "NaN in a .npy prompt": (lambda pt, pre, f: _npy(f, NAN_PROMPT),
                             r"adapter x: .*\.npy: its tensor holds NaN or Inf"),
    "float64 past float32's range": (lambda pt, pre, f: _npy(f, PROMPT.astype(np.float64) * 1e300),
                                     r"adapter x: .*too large for float32"),
    "complex .bin": (lambda pt, pre, f: _bin(pt, f, torch.complex64),
                     r"prompt_embeddings holds complex64 values; a soft prompt is a floating-point tensor"),
    "integer prompt": (lambda pt, pre, f: _adapter(pt, f, weights=_retype("prompt_embeddings", np.int32)),
                       r"prompt_embeddings holds int32 values"),
    "integer .npy": (lambda pt, pre, f: _npy(f, np.ones((4, 64), np.int64)), r"its tensor holds int64 values"),
    "bool .npy": (lambda pt, pre, f: _npy(f, np.ones((4, 64), bool)), r"its tensor holds bool values"),
    "complex .npy": (lambda pt, pre, f: _npy(f, PROMPT.astype(np.complex128)), r"holds complex128 values"),
    "string .npy": (lambda pt, pre, f: _npy(f, np.array([["a", "b"]])), r"its tensor holds <U1 values"),
    "empty .npy prompt": (lambda pt, pre, f: _npy(f, PROMPT[:0]), r"holds no virtual tokens"),
    "integer .bin": (lambda pt, pre, f: _bin(pt, f, torch.int64), r"prompt_embeddings holds int64 values"),
    "peft_type as a list": (lambda pt, pre, f: _adapter(pt, f, config=_set("peft_type", ["PROMPT_TUNING"])),
                            r"adapter method \['PROMPT_TUNING'\] is not supported"),
    "num_virtual_tokens 0": (lambda pt, pre, f: _adapter(pt, f, config=_set("num_virtual_tokens", 0)),
                             r"num_virtual_tokens must be a whole number > 0, got 0"),
    "num_virtual_tokens as text": (lambda pt, pre, f: _adapter(pt, f, config=_set("num_virtual_tokens", "5")),
                                   r"num_virtual_tokens must be a whole number > 0, got '5'"),
    "num_layers as a float": (lambda pt, pre, f: _adapter(pre, f, config=_set("num_layers", 2.0)),
                              r"num_layers must be a whole number > 0, got 2.0"),
    "deeply nested adapter_config.json": (lambda pt, pre, f: _adapter(pt, f, text="[" * 100_000 + "]" * 100_000),
                                          r"adapter_config.json: unreadable adapter config"),
    "task_type SEQ_CLS": (lambda pt, pre, f: _adapter(pt, f, config=_set("task_type", "SEQ_CLS")),
                          r"trained with task_type SEQ_CLS; a decoder artifact takes adapters trained with task_type "
                          r"CAUSAL_LM"),
    "task_type SEQ_2_SEQ_LM": (lambda pt, pre, f: _adapter(pre, f, config=_set("task_type", "SEQ_2_SEQ_LM")),
                               r"trained with task_type SEQ_2_SEQ_LM; a decoder artifact"),
    "task_type as a list": (lambda pt, pre, f: _adapter(pre, f, config=_set("task_type", ["CAUSAL_LM"])),
                            r"task_type must be a string"),
}


@pytest.fixture(scope="module")
def bad_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-adapters")
    pt, prefix = tiny_llama["adapters"]["pt"], tiny_llama["adapters"]["prefix"]
    return {case: build(pt, prefix, root / re.sub(r"\W+", "-", case)) for case, (build, _) in BAD_ADAPTERS.items()}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_is_refused_in_one_line_before_the_model_loads(tiny_llama, bad_adapters, tmp_path,
                                                                   no_model_load, case):
    with pytest.raises(AdapterError, match=BAD_ADAPTERS[case][1]) as raised:
        convert(tiny_llama["model"], [("pt", tiny_llama["adapters"]["pt"]), ("x", bad_adapters[case])],
                tmp_path / "out")
    one_line(str(raised.value))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["peft_type as a list", "num_virtual_tokens 0", "deeply nested adapter_config.json",
                                  "string .npy", "NaN in a .npy prompt", "task_type SEQ_CLS"])
def test_cli_convert_of_a_bad_adapter_is_one_line(tiny_llama, bad_adapters, tmp_path, case):
    result = invoke("convert", "--model", tiny_llama["model"], "--adapter", f"x={bad_adapters[case]}",
                    "--output", tmp_path / "out")
    assert result.exit_code == AdapterError.exit_code
    ends_cleanly(result, BAD_ADAPTERS[case][1])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def overflowing_mpt(tiny_llama, tmp_path_factory):
    """A multitask adapter whose factors are finite but whose composed prompt for task 1 is not."""
    from builders import build_adapter

    adapter = build_adapter(tiny_llama["model"], "multitask", tmp_path_factory.mktemp("mpt") / "mpt", 3, seed=1)
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["prefix_task_cols"][1] = 1e30
    weights["prefix_task_rows"][1] = 1e30
    save_file(weights, adapter / "adapter_model.safetensors")
    return adapter


def test_a_multitask_prompt_that_overflows_once_composed_is_refused(tiny_llama, overflowing_mpt, tmp_path,
                                                                    no_model_load):
    with pytest.raises(AdapterError, match=r"adapter mpt: .*its prompt holds NaN or Inf once composed") as raised:
        convert(tiny_llama["model"], [("mpt", overflowing_mpt)], tmp_path / "out")
    one_line(str(raised.value))


@pytest.fixture(scope="module")
def integer_head(tmp_path_factory):
    """A BERT model and a SEQ_CLS adapter whose classifier head holds integers."""
    from test_encoders import TASKS, build_adapter, build_base

    root = tmp_path_factory.mktemp("integer-head")
    model = build_base("bert", root / "model")
    adapter = build_adapter(model, "bert", TASKS["bert"]["pt"], root / "adapter", seed=1)
    weights = load_file(adapter / "adapter_model.safetensors")
    head = next(name for name in weights if name.endswith("classifier.weight"))
    weights[head] = weights[head].astype(np.int64)
    save_file(weights, adapter / "adapter_model.safetensors")
    return model, adapter, head


def test_an_encoder_head_of_integers_is_refused_before_the_model_loads(integer_head, tmp_path, no_model_load):
    """A classifier head is a tensor of the adapter too, checked like its prompt."""
    model, adapter, head = integer_head
    with pytest.raises(AdapterError, match=rf"{re.escape(head)} holds int64 values"):
        convert(model, [("x", adapter)], tmp_path / "out")
