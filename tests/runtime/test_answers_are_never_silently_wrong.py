"""No silent wrong answers at run time: a prompt bank or logits holding NaN or Inf raise, padding never
changes a row's answer, and bad arguments to load() or bad text end in one line."""

import numpy as np
import onnx
import pytest
from checks import copy, ends_cleanly, invoke, one_line, rehash
from onnx import numpy_helper

from spexport.artifact import tensorfile
from spexport.errors import ArtifactError, InputError
from spexport.runtime import load

IDS = np.array([[5, 9, 14, 22, 40, 7]], np.int64)


def test_load_refuses_a_prompt_bank_holding_nan_or_inf(tiny_llama, tmp_path):
    for value in (np.nan, np.inf):
        folder = copy(tiny_llama["artifact"], tmp_path / str(value))
        bank = tensorfile.load(folder / "prompts.safetensors")
        bank["prefix"][1, 0, 1, 2, 3] = value
        tensorfile.save(bank, folder / "prompts.safetensors")
        rehash(folder, "prompts.safetensors")
        for verify in (True, False):
            with pytest.raises(ArtifactError, match=r"prompt bank entry for task 'prefix' holds NaN or Inf") as e:
                load(folder, verify=verify)
            one_line(str(e.value))


@pytest.fixture(scope="module")
def nan_weights(tiny_llama, tmp_path_factory):
    """The tiny artifact with NaN token embeddings, rehashed: it loads, and every logit is NaN."""
    folder = copy(tiny_llama["artifact"], tmp_path_factory.mktemp("nan-weights") / "artifact")
    # the main graph, and those the Python runtime runs
    for name in ("model.onnx", "core_model.onnx", "core_inplace_model.onnx"):
        if not (folder / name).is_file():
            continue
        graph = onnx.load(folder / name)
        for tensor in graph.graph.initializer:
            if tensor.name.endswith("embed_tokens.weight"):
                nan = np.full_like(numpy_helper.to_array(tensor), np.nan)
                tensor.CopyFrom(numpy_helper.from_array(nan, tensor.name))
        onnx.save(graph, folder / name)
        rehash(folder, name)
    return load(folder)


@pytest.mark.parametrize("call", ["logits", "greedy", "sampling"])
def test_non_finite_logits_raise_instead_of_giving_tokens(nan_weights, call):
    """Before: greedy decoding gave token 0 forever, and sampling a numpy traceback."""
    with pytest.raises(ArtifactError, match=r"model.onnx: the model computed NaN or Inf logits") as raised:
        if call == "logits":
            nan_weights.logits(IDS, task="pt")
        else:
            nan_weights.generate(IDS, task="pt", max_new_tokens=3, do_sample=call == "sampling", seed=0)
    one_line(str(raised.value))


# -- padding -------------------------------------------------------------------------------------------

ROWS = [np.array([5, 9, 14, 22]), np.array([40, 7, 33]), np.array([11, 12, 13, 14, 15]), np.array([60, 61])]
SLOTS = {"left": lambda n, width: range(width - n, width), "right": lambda n, width: range(n),
         "gap": lambda n, width: [0, *range(2, n + 1)],  # a hole after the first token
         "all": lambda n, width: [*range(1, n), n + 1]}  # padding first, in the middle and last


def laid_out(rows: list[np.ndarray], layouts: list[str], width: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Rows in one batch [len(rows), width], each at the slots its layout names, the rest padding."""
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for i, (row, layout) in enumerate(zip(rows, layouts)):
        slots = list(SLOTS[layout](len(row), width))
        ids[i, slots], mask[i, slots] = row, 1
    return ids, mask


@pytest.mark.parametrize("layouts", [["right"] * 4, ["gap"] * 4, ["left", "right", "gap", "all"]])
def test_padding_anywhere_gives_each_row_its_answer_alone(runtime_model, layouts):
    """Before: a right-padded row's first new token came from its last slot, a pad token (and, in a model
    with sliding windows, padding inside a window hid a row's own tokens)."""
    tasks = ["pt", "prefix", "mlp", "proj"]
    ids, mask = laid_out(ROWS, layouts)
    generated = runtime_model.generate(ids, attention_mask=mask, task=tasks, max_new_tokens=6)
    logits = runtime_model.logits(ids, attention_mask=mask, task=tasks)
    for i, (row, task) in enumerate(zip(ROWS, tasks)):
        alone = runtime_model.generate(row[None], task=task, max_new_tokens=6)[0, len(row):]
        np.testing.assert_array_equal(generated[i, ids.shape[1]:ids.shape[1] + len(alone)], alone)
        np.testing.assert_allclose(logits[i, mask[i] == 1], runtime_model.logits(row[None], task=task)[0], atol=1e-5)


# -- arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, pattern", [
    ({"max_batch_size": "10"}, r"max_batch_size must be a whole number >= 1, got '10'"),
    ({"max_batch_size": 0}, r"max_batch_size must be a whole number >= 1, got 0"),
    ({"max_batch_size": True}, r"max_batch_size must be a whole number >= 1, got True"),
    ({"providers": "CPUExecutionProvider"}, r"providers must be a list of provider names"),
    ({"providers": [1]}, r"each provider must be a name such as .CUDAExecutionProvider. or a \(name, "),
    ({"folder": None}, r"folder must be the path of an artifact folder, got None"),
])
def test_load_checks_its_arguments(tiny_llama, kwargs, pattern):
    kwargs = {"folder": tiny_llama["artifact"], **kwargs}
    with pytest.raises(InputError, match=pattern) as raised:
        load(**kwargs)
    one_line(str(raised.value))


def test_text_that_is_not_utf8_is_refused(tiny_llama):
    model = load(tiny_llama["artifact"])
    with pytest.raises(InputError, match=r"texts\[1\] is not valid UTF-8"):
        model.generate_text(["fine", "abc\udcff"], task="pt", max_new_tokens=2)
    # Python hands a shell's undecodable bytes over as lone surrogates
    result = invoke("run", tiny_llama["artifact"], "--task", "pt", "abc\udcff", "--max-new-tokens", "2")
    assert result.exit_code == InputError.exit_code
    ends_cleanly(result, r"texts\[0\] is not valid UTF-8")
