"""Property-based fuzzing of what users hand `convert` and the command line: adapter configs, prompt
tensors, and whole command lines. Each case works or ends in spexport's own one-line error (see
test_fuzz.py for manifests and runtime calls)."""

import json
import re
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load_file, save_file
from test_fuzz import HOSTILE_TEXT, JSON_VALUES, TEXTS, fuzz, json_paths, works_or_says_why
from transformers import PreTrainedModel

from spexport.artifact.manifest import ModelInfo
from spexport.cli import main
from spexport.converters import convert_adapter
from spexport.errors import SpexportError
from spexport.families import DECODER
from spexport.runtime import load

# the tiny Llama of conftest's tiny_llama, as convert reads it from its config
TINY = ModelInfo(model_type="llama", num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=160,
                 max_positions=64, eos_token_ids=[3], pad_token_id=0)


def _converts_or_says_why(path: Path):
    prompts = works_or_says_why(lambda: convert_adapter("x", path, TINY, DECODER))
    for prompt in (prompts or {}).values():
        assert prompt.tensor.dtype == np.float32 and np.isfinite(prompt.tensor).all()
        assert 1 <= prompt.num_virtual_tokens < TINY.max_positions
        expected = [[prompt.num_virtual_tokens, TINY.hidden_size],
                    [TINY.num_layers, 2, TINY.num_kv_heads, prompt.num_virtual_tokens, TINY.head_dim]]
        assert list(prompt.tensor.shape) in expected
    return prompts


# -- adapter configs -----------------------------------------------------------------------------------


@st.composite
def mutated_configs(draw, config: dict) -> dict:
    """The config with one to three fields deleted or replaced by any JSON value, or a known field set."""
    config = json.loads(json.dumps(config))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["delete", "replace", "known"]))
        path = draw(st.sampled_from(json_paths(config)[1:]))
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        else:
            key = draw(st.sampled_from(["peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim",
                                        "num_attention_heads", "num_transformer_submodules", "num_tasks",
                                        "encoder_reparameterization_type", "base_model_name_or_path"]))
            config[key] = draw(JSON_VALUES | st.sampled_from(["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING",
                                                              "MULTITASK_PROMPT_TUNING", "CAUSAL_LM", "SEQ_CLS", 0, 5,
                                                              6, True, 2.0, "LSTM", None]))
    return config


NOT_CONFIGS = ["[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000, "{", "", "null", "[]", '"x"',
               "\udcff", "NaN", '{"peft_type": "PROMPT_TUNING"}']


@pytest.mark.parametrize("adapter", ["pt", "prefix"])
def test_mutated_adapter_configs_convert_or_are_refused(tiny_llama, tmp_path, adapter):
    folder = Path(shutil.copytree(tiny_llama["adapters"][adapter], tmp_path / adapter))
    original = json.loads((folder / "adapter_config.json").read_text())

    @fuzz(80)
    @given(config=mutated_configs(original) | st.sampled_from(NOT_CONFIGS))
    def check(config):
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        _converts_or_says_why(folder)

    check()


# -- tensors -------------------------------------------------------------------------------------------

TENSOR_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64,
                 np.complex128, "U2"]
# mostly shapes near a prompt [n, 64] or a KV prefix [2, 2, 2, n, 16], some anything
TENSOR_SHAPES = st.one_of(st.tuples(st.integers(0, 70), st.sampled_from([64, 63, 1])),
                          st.tuples(st.sampled_from([2, 1]), st.sampled_from([2, 3]), st.sampled_from([2, 4]),
                                    st.integers(0, 5), st.sampled_from([16, 8])),
                          hnp.array_shapes(min_dims=0, max_dims=6, min_side=0, max_side=3))


@st.composite
def tensors(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(TENSOR_DTYPES)))
    shape = draw(TENSOR_SHAPES)
    if dtype.kind == "f":
        special = st.sampled_from([np.nan, np.inf, -np.inf, 1e300, -1e39, 0.0])
        array = np.random.default_rng(draw(st.integers(0, 2 ** 32))).standard_normal(shape).astype(dtype)
        if array.size and draw(st.booleans()):
            array.flat[draw(st.integers(0, array.size - 1))] = draw(special)
        return array
    return draw(hnp.arrays(dtype, shape))


@fuzz(120)
@given(tensor=tensors(), container=st.sampled_from(["npy", "safetensors", "peft"]))
def test_any_tensor_converts_or_is_refused(tiny_llama, tmp_path_factory, tensor, container):
    folder = tmp_path_factory.mktemp("tensor")
    if container == "npy":
        path = folder / "prompt.npy"
        np.save(path, tensor)
    elif tensor.dtype.kind in "cU":  # safetensors cannot hold these
        return
    elif container == "safetensors":
        path = folder / "prompt.safetensors"
        save_file({"prompt_embeddings": tensor}, path)
    else:
        path = Path(shutil.copytree(tiny_llama["adapters"]["pt"], folder / "adapter"))
        weights = load_file(path / "adapter_model.safetensors")
        save_file({**weights, "prompt_embeddings": tensor}, path / "adapter_model.safetensors")
    _converts_or_says_why(path)




# -- CLI arguments -------------------------------------------------------------------------------------

# a shell's argv holds no NUL byte
HOSTILE_ARGS = ["", ".", "..", "/", "-5", "0", "nan", "inf", "1e-4", "=", "x=", "=y", "a b", "abc\udcff", "x" * 300,
                "--json", "int8", "float16", "a/" * 40, "Pt"] + [t for t in HOSTILE_TEXT if "\x00" not in t]
NUMBERS = ["-5", "-1", "0", "1", "3", "nan", "inf", "-inf", "1e-4", "1e309", "x", ""]


@st.composite
def command_lines(draw, places: dict[str, str]) -> list[str]:
    """A command with its arguments: mostly what it needs, real paths (the tiny model, adapters and
    artifact), with hostile values and stray flags mixed in."""
    def pick(good, *hostile):
        """Mostly `good` (one value or a list), else one of `hostile` or of the hostile arguments."""
        good = good if isinstance(good, list) else [good]
        if draw(st.integers(0, 3)):
            return draw(st.sampled_from(good))
        return draw(st.sampled_from([*hostile, *HOSTILE_ARGS]))

    paths = [places["model"], places["artifact"], places["pt"], places["new"]]
    adapters = [f"pt={places['pt']}", f"prefix={places['prefix']}"]
    command = draw(st.sampled_from(["convert", "validate", "run", "inspect", "reseal", "nope"]))
    args = [command]
    if command in ("validate", "run", "inspect", "reseal"):
        args.append(pick(places["artifact"], *paths))
    if command in ("convert", "validate"):
        args += ["--model", pick(places["model"], *paths)]
        args += [a for _ in range(draw(st.integers(1, 2))) for a in (
            "--adapter", pick(adapters, f"{'a/' * 40}a={places['pt']}", f"x={places['artifact']}",
                              f"Pt={places['pt']}", f"a b={places['pt']}", f"x={places['model']}"))]
    if command == "convert":
        args += ["--output", pick(places["new"], *paths)]
        args += draw(st.lists(st.sampled_from(["--overwrite", "--bake", "--no-optimize", "--json", "--quiet"]),
                              max_size=2))
        args += draw(st.sampled_from([[], ["--quantize", pick("int8")],
                                      ["--dtype", pick("float16")]]))
    if command == "validate":
        args += draw(st.sampled_from([[], ["--new-tokens", pick(NUMBERS)], ["--atol", pick(NUMBERS)]]))
    if command == "run":
        args += draw(st.lists(TEXTS, min_size=1, max_size=2))
        args += ["--task", pick(["pt", "prefix"])]
        args += draw(st.sampled_from([[], ["--max-new-tokens", pick("1", *NUMBERS)], ["--sample"],
                                      ["--sample", "--temperature", pick(NUMBERS)], ["--top-k", pick(NUMBERS)],
                                      ["--sample", "--top-p", pick(NUMBERS)], ["--seed", pick(NUMBERS)]]))
    if draw(st.integers(0, 4)) == 0:  # a stray flag or value anywhere
        args.insert(draw(st.integers(1, len(args))), pick(["--json", "--quiet", "--help", "--task"]))
    return args


def test_command_lines_end_cleanly(tiny_llama, tmp_path, monkeypatch):
    """No command line ends in a traceback. The frozen model never loads here: every check comes first,
    so a command line that passes them all stops where the model would load."""
    def stop(cls, *args, **kwargs):
        raise SpexportError("stopped where the frozen model would load")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(stop))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    artifact = shutil.copytree(tiny_llama["artifact"], tmp_path / "artifact")
    places = {"model": str(tiny_llama["model"]), "pt": str(tiny_llama["adapters"]["pt"]),
              "prefix": str(tiny_llama["adapters"]["prefix"]), "artifact": str(artifact), "new": str(tmp_path / "new")}

    @fuzz(200)
    @given(args=command_lines(places))
    def check(args):
        result = CliRunner().invoke(main, args)
        if result.exc_info is not None and result.exc_info[0] is not SystemExit:
            raise AssertionError("".join(traceback.format_exception(*result.exc_info)))
        usage = result.exit_code == 2 and re.search(r"(^|\n)Error: ", result.stderr)  # click's own message
        if result.exit_code not in (0, 1) and not usage:
            assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert not list(work.glob(".*.partial")) and not list(tmp_path.glob(".*.partial"))

    check()
    assert load(artifact).tasks == ["pt", "prefix"]
