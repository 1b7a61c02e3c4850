"""Everything a user can get wrong ends in one clear line, through the library and the CLI alike.

Each case in CASES is run twice: `convert` must raise spexport's own error with a useful one-line
message, and `spexport convert` must print that line on stderr and exit with code 2. Neither may
leave anything behind where the output would have gone.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import VOCAB, build_adapter, build_model
from click.testing import CliRunner
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, XGLMConfig, XGLMForCausalLM

import spexport.export
import spexport.export.decoder
from spexport.cli import main
from spexport.converters import convert_adapter, methods_for
from spexport.errors import AdapterError, InputError, ModelError, SpexportError
from spexport.export import convert
from spexport.export.decoder import read_info
from spexport.families import DECODER
from spexport.runtime import load

TINY_LLAMA = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
# Adapters "trained" for another base, one that differs from TINY_LLAMA in one way: name -> (method, change).
MISFITS = {"prompt_tuning-wider": ("prompt_tuning", {"hidden_size": 96}),
           "prefix_tuning-deeper": ("prefix_tuning", {"num_hidden_layers": 3}),
           "prefix_tuning-more_kv": ("prefix_tuning", {"num_key_value_heads": 4})}


class RunsCode:
    """Unpickling this runs a shell command, as a hostile checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _copy_adapter(source: Path, folder: Path, edit_config=None) -> Path:
    shutil.copytree(source, folder)
    if edit_config is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(edit_config(config)))
    return folder


def _without(key):
    return lambda config: {k: v for k, v in config.items() if k != key}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny Llama, good adapters for it, and every kind of bad model or adapter folder."""
    root = tmp_path_factory.mktemp("inputs")
    model = build_model("llama", root / "model")
    found = {"root": root, "model": model,
             "pt": build_adapter(model, "prompt_tuning", root / "pt"),
             "prefix": build_adapter(model, "prefix_tuning", root / "prefix", num_virtual_tokens=6),
             "long": build_adapter(model, "prompt_tuning", root / "long", num_virtual_tokens=64)}
    for name, (method, change) in MISFITS.items():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **change})).save_pretrained(root / f"base-{name}")
        found[name] = build_adapter(root / f"base-{name}", method, root / name)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                          LoraConfig(task_type=TaskType.CAUSAL_LM, r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(root / "lora")
    found["lora"] = root / "lora"
    XGLMForCausalLM(XGLMConfig(vocab_size=VOCAB, d_model=16, num_layers=1, attention_heads=2,
                               ffn_dim=32)).save_pretrained(root / "xglm")
    found["xglm"] = root / "xglm"
    for name, text in {"garbage-config": "{not json", "empty-config": "{}", "list-config": "[1, 2]"}.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        found[name] = root / name
    (root / "no-weights").mkdir()
    shutil.copy(model / "config.json", root / "no-weights")
    found["no-weights"] = root / "no-weights"
    (root / "empty").mkdir()
    found["empty"] = root / "empty"
    found["no-num-layers"] = _copy_adapter(found["prefix"], root / "no-num-layers", _without("num_layers"))
    found["no-virtual"] = _copy_adapter(found["pt"], root / "no-virtual", _without("num_virtual_tokens"))
    found["list-adapter-config"] = _copy_adapter(found["pt"], root / "list-adapter-config", lambda c: [c])
    found["pickled"] = _copy_adapter(found["pt"], root / "pickled")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(found["pt"] / "adapter_model.safetensors").items()},
               found["pickled"] / "adapter_model.bin")
    (found["pickled"] / "adapter_model.safetensors").unlink()
    return found


# id: (model folder key, [(task name, adapter folder key)], error, message pattern)
CASES = {
    "missing model": ("no-such-model", [("pt", "pt")], ModelError, r"no-such-model: no such model folder$"),
    "no config.json": ("empty", [("pt", "pt")], ModelError, r"not a Hugging Face model folder \(no config\.json\)"),
    "garbage config.json": ("garbage-config", [("pt", "pt")], ModelError, r"config\.json: not readable JSON"),
    "config.json without model_type": ("empty-config", [("pt", "pt")], ModelError, r"no model_type"),
    "config.json not an object": ("list-config", [("pt", "pt")], ModelError, r"no model_type"),
    "no weights": ("no-weights", [("pt", "pt")], ModelError, r"cannot load the model weights"),
    "unsupported model type": ("xglm", [("pt", "pt")], ModelError,
                               r"xglm: model type 'xglm' is not supported; spexport exports .*gpt2, .*llama, .*"),
    "LoRA adapter": ("model", [("x", "lora")], AdapterError,
                     rf"method LORA is not supported; spexport converts {', '.join(sorted(methods_for(DECODER)))}$"),
    "prompt tuning, other hidden size": ("model", [("x", "prompt_tuning-wider")], AdapterError,
                                         r"trained for another base model: hidden size is 96, the model has 64"),
    "prefix tuning, other layers": ("model", [("x", "prefix_tuning-deeper")], AdapterError,
                                    r"trained for another base model: number of layers is 3, the model has 2"),
    "prefix tuning, other heads": ("model", [("x", "prefix_tuning-more_kv")], AdapterError,
                                   r"trained for another base model: number of key/value heads is 4, the model has 2"),
    "duplicate task": ("model", [("x", "pt"), ("x", "prefix")], AdapterError, r"task name 'x' is given twice"),
    "bad task name": ("model", [("a b", "pt")], AdapterError, r"task name 'a b' is not allowed"),
    "adapter path missing": ("model", [("x", "no-such-adapter")], AdapterError, r"adapter x: .*no-such-adapter does"),
    "no adapter_config.json": ("model", [("x", "empty")], AdapterError, r"not a PEFT adapter folder"),
    "adapter config not an object": ("model", [("x", "list-adapter-config")], AdapterError, r"not a JSON object"),
    "adapter config lacks a field": ("model", [("x", "no-num-layers")], AdapterError,
                                     r"adapter_config\.json has no 'num_layers' for PREFIX_TUNING"),
    "adapter config lacks virtual tokens": ("model", [("x", "no-virtual")], AdapterError,
                                            r"adapter_config\.json has no 'num_virtual_tokens' for PROMPT_TUNING"),
    "too many virtual tokens": ("model", [("x", "long")], AdapterError,
                                r"64 virtual tokens leave no room for input in the model's 64 positions"),
}


def _case(inputs, case):
    model, adapters, error, pattern = CASES[case]
    return inputs["root"] / model, [(name, inputs["root"] / key) for name, key in adapters], error, pattern


def _assert_one_line(message: str) -> None:
    assert message.strip() and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", list(CASES))
def test_convert_raises_one_clear_line(inputs, tmp_path, case):
    model, adapters, error, pattern = _case(inputs, case)
    with pytest.raises(error, match=pattern) as raised:
        convert(model, adapters, tmp_path / "artifact")
    _assert_one_line(str(raised.value))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", list(CASES))
def test_cli_prints_one_line_and_exits_with_the_errors_code(inputs, tmp_path, case):
    model, adapters, error, pattern = _case(inputs, case)
    args = ["convert", "--model", str(model), "--output", str(tmp_path / "artifact")]
    for name, path in adapters:
        args += ["--adapter", f"{name}={path}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == error.exit_code, result.output
    assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.endswith("\n")
    _assert_one_line(result.stderr[:-1])
    assert re.search(pattern, result.stderr), result.stderr
    assert list(tmp_path.iterdir()) == []


# -- pickled adapters -------------------------------------------------------------------------------


def test_pickled_adapter_converts_like_safetensors(inputs):
    info = read_info(inputs["model"])
    from_bin, from_safetensors = (convert_adapter("t", inputs[key], info, DECODER)["t"] for key in ["pickled", "pt"])
    assert from_bin.method == from_safetensors.method and from_bin.kind == from_safetensors.kind
    np.testing.assert_array_equal(from_bin.tensor, from_safetensors.tensor)


@pytest.mark.parametrize("save", [torch.save, lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2))],
                         ids=["torch.save", "pickle"])
def test_pickle_that_runs_code_is_refused(inputs, tmp_path, save):
    marker = tmp_path / "MARKER"
    adapter = _copy_adapter(inputs["pt"], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    save({"prompt_embeddings": RunsCode(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: refused, .*save the adapter as .*safetensors") as e:
        convert(inputs["model"], [("x", adapter)], tmp_path / "artifact")
    _assert_one_line(str(e.value))
    assert not marker.exists()
    assert not (tmp_path / "artifact").exists()


def test_pickle_that_is_not_a_checkpoint_is_refused(inputs, tmp_path):
    adapter = _copy_adapter(inputs["pt"], tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(AdapterError, match=r"refused, not a plain tensor checkpoint"):
        convert(inputs["model"], [("x", adapter)], tmp_path / "artifact")


# -- the output folder -----------------------------------------------------------------------------


def _fill(folder: Path) -> dict[str, bytes]:
    (folder / "sub").mkdir(parents=True)
    (folder / "keep.txt").write_bytes(b"precious\n")
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_empty_output_is_refused_and_left_intact(inputs, tmp_path):
    before = _fill(tmp_path / "artifact")
    with pytest.raises(SpexportError, match=r"exists and is not empty; pass --overwrite to replace it") as e:
        convert(inputs["model"], [("pt", inputs["pt"])], tmp_path / "artifact")
    _assert_one_line(str(e.value))
    assert _snapshot(tmp_path / "artifact") == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_output_that_is_a_file_is_refused(inputs, tmp_path):
    (tmp_path / "artifact").write_text("a file")
    with pytest.raises(SpexportError, match=r"is a file; --output must be a folder"):
        convert(inputs["model"], [("pt", inputs["pt"])], tmp_path / "artifact", overwrite=True)
    assert (tmp_path / "artifact").read_text() == "a file"


def test_overwrite_never_removes_an_input(inputs, tmp_path):
    model = shutil.copytree(inputs["model"], tmp_path / "work" / "model")
    with pytest.raises(SpexportError, match=r"holds the input .*model; write the artifact to another folder"):
        convert(model, [("pt", inputs["pt"])], tmp_path / "work", overwrite=True)
    with pytest.raises(SpexportError, match=r"holds the input"):
        convert(model, [("pt", inputs["pt"])], model, overwrite=True)
    assert (model / "config.json").is_file()


def _old_artifact(folder: Path) -> dict[str, bytes]:
    """Files in a folder whose spexport.json says it is an artifact (a damaged one): what --overwrite replaces."""
    _fill(folder)
    (folder / "spexport.json").write_text('{"format": "spexport"}')
    return _snapshot(folder)


def test_overwrite_replaces_the_old_artifact(inputs, tmp_path):
    _old_artifact(tmp_path / "artifact")
    convert(inputs["model"], [("pt", inputs["pt"])], tmp_path / "artifact", overwrite=True)
    assert not (tmp_path / "artifact" / "keep.txt").exists()
    assert load(tmp_path / "artifact").tasks == ["pt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.mark.parametrize("failure, raised", [(RuntimeError("exporter crashed"), RuntimeError),
                                             (OSError(28, "No space left on device"), SpexportError)])
def test_failed_convert_leaves_the_old_output_as_it_was(inputs, tmp_path, monkeypatch, failure, raised):
    def export_fails(*args):
        raise failure

    monkeypatch.setattr(spexport.export.decoder, "export_graph", export_fails)
    before = _old_artifact(tmp_path / "artifact")
    with pytest.raises(raised) as e:
        convert(inputs["model"], [("pt", inputs["pt"])], tmp_path / "artifact", overwrite=True)
    _assert_one_line(str(e.value))
    assert _snapshot(tmp_path / "artifact") == before
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
    with pytest.raises(raised):
        convert(inputs["model"], [("pt", inputs["pt"])], tmp_path / "new" / "nested" / "artifact")
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"], "parent folders made for the output stay behind"


# -- the runtime -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(inputs, tmp_path_factory):
    artifact = tmp_path_factory.mktemp("served") / "artifact"
    convert(inputs["model"], [("pt", inputs["pt"]), ("prefix", inputs["prefix"])], artifact)
    return load(artifact)


@pytest.mark.parametrize("verb", ["logits", "generate"])
def test_unknown_task_names_it_and_the_known_ones(served, verb):
    with pytest.raises(InputError, match=r"unknown task 'nope'; this artifact has: pt, prefix$") as e:
        getattr(served, verb)(np.array([[5, 6, 7]]), task="nope")
    _assert_one_line(str(e.value))
    with pytest.raises(InputError, match=r"unknown task 'nope'"):
        getattr(served, verb)(np.array([[5, 6, 7], [8, 9, 10]]), task=["pt", "nope"])


@pytest.mark.parametrize("verb", ["logits", "generate"])
def test_input_longer_than_the_positions_allow(served, verb):
    # 64 positions: "pt" adds 5 virtual tokens, "prefix" 6; a batch is limited by its longest prefix.
    assert getattr(served, verb)(np.full((1, 59), 5), task="pt").shape[1] == 59
    with pytest.raises(InputError, match=r"input of 60 tokens is too long: .* allows 59 \(max positions 64\)") as e:
        getattr(served, verb)(np.full((1, 60), 5), task="pt")
    _assert_one_line(str(e.value))
    with pytest.raises(InputError, match=r"allows 58 \(max positions 64\)"):
        getattr(served, verb)(np.full((2, 59), 5), task=["pt", "prefix"])
