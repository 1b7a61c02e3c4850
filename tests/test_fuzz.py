"""Property-based fuzzing: mutated manifests and arbitrary runtime inputs.

Every case either works or raises spexport's own error (a SpexportError subclass) with a one-line
message; never a raw ONNX Runtime, numpy, KeyError or TypeError traceback. Examples are
derandomized, so the suite runs the same cases every time; raise FUZZ_EXAMPLES to search longer.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from spexport.artifact.manifest import MANIFEST, seal
from spexport.errors import SpexportError
from spexport.runtime import load

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """Modest example counts for the suite; FUZZ_EXAMPLES=N searches N random examples instead."""
    return settings(max_examples=EXAMPLES or examples, deadline=None, derandomize=not EXAMPLES, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VOCAB = 160


def works_or_says_why(call):
    """The result of `call`, or None when it raised a SpexportError with a one-line message."""
    try:
        return call()
    except SpexportError as e:
        assert str(e).strip() and "\n" not in str(e), repr(e)
        return None


# -- manifests ---------------------------------------------------------------------------------------

HOSTILE_TEXT = ["../../etc/passwd", "/etc/passwd", "..", ".", "", "a\x00b", "adapters/../../x", "model.onnx",
                "prompts.safetensors", "tokenizer.json", "spexport.json", "float16", "decoder", "encoder", "pt",
                "x" * 5000]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, 1, -1, 2, 63, 64, 160]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(HOSTILE_TEXT)),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def json_paths(value, prefix=()) -> list[tuple]:
    """Every path (of keys and indices) into a JSON value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += json_paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += json_paths(child, prefix + (i,))
    return found


@st.composite
def mutated_manifests(draw, manifest: dict) -> dict:
    """The manifest with one to three fields deleted, replaced, renamed or duplicated."""
    manifest = json.loads(json.dumps(manifest))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(json_paths(manifest)))
        if not path:
            continue
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["delete", "replace", "rename", "duplicate"]))
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(HOSTILE_TEXT) | st.text(max_size=8))] = parent.pop(key)
        elif action == "duplicate" and isinstance(parent, list):
            parent.append(json.loads(json.dumps(parent[key])))
    return manifest


@pytest.fixture(scope="module")
def fuzzed_folder(tiny_llama, tmp_path_factory):
    """A copy of the tiny artifact whose manifest the fuzz rewrites, and the manifest as exported."""
    folder = Path(shutil.copytree(tiny_llama["artifact"], tmp_path_factory.mktemp("fuzz") / "artifact"))
    return folder, json.loads((folder / MANIFEST).read_text())


def test_mutated_manifests_load_or_are_refused(fuzzed_folder):
    folder, original = fuzzed_folder

    @fuzz(60)
    @given(st.data())
    def check(data):
        manifest = data.draw(mutated_manifests(original))
        (folder / MANIFEST).write_text(json.dumps(seal(manifest)))
        model = works_or_says_why(lambda: load(folder))
        if model is not None:
            logits = works_or_says_why(lambda: model.logits(np.array([[5, 6, 7]]), task=model.tasks[0]))
            assert logits is None or logits.shape == (1, 3, model.info.vocab_size)

    try:
        check()
    finally:
        (folder / MANIFEST).write_text(json.dumps(original))


# -- runtime inputs ----------------------------------------------------------------------------------

DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64, np.float32, np.float64, np.bool_, "U3"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
TASK_NAMES = st.sampled_from(["pt", "prefix", "nope", "", "PT"])


def _arrays(shape=SHAPES):
    return st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(dtype, shape))


VALID_IDS = st.tuples(st.integers(1, 3), st.integers(1, 6)).flatmap(
    lambda shape: hnp.arrays(np.int64, shape, elements=st.integers(0, VOCAB - 1)))
OTHER_IDS = st.one_of(
    hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=4),
               elements=st.integers(-2, VOCAB + 2)),  # some ids outside the vocabulary
    _arrays(),  # any dtype, any shape
    st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=4), max_size=3),  # ragged python lists
    st.sampled_from([None, 5, "the cat", [[1.5, 2]], [["a", "b"]], [[True, False]], {"ids": [1]}]),
)
MASKS = st.one_of(
    st.none(),
    st.sampled_from([[[1, 1, 1]], [[0, 0, 0]], [[2, 1, 1]], [[1, 1]], [[1], [1, 1]], "ones", [[1.0, 0.5, 1.0]]]),
    _arrays(),
)
TASKS = st.one_of(TASK_NAMES, st.lists(TASK_NAMES, max_size=4), st.sampled_from([None, 0, [0, 1], b"pt", [["pt"]]]))
NUMBERS = st.one_of(st.integers(-3, 8), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.sampled_from(["5", True]))


GENERATION = {"max_new_tokens": st.integers(0, 3), "do_sample": st.booleans(), "temperature": st.floats(0.05, 5),
              "top_k": st.integers(0, 200), "top_p": st.floats(0.01, 1), "seed": st.none() | st.integers(0, 2 ** 32)}


@st.composite
def requests(draw) -> dict:
    """A logits or generate call. Masks, tasks and settings are drawn valid more often than not, and at
    most one generation setting is broken, so that many calls get past the first check."""
    ids = draw(st.sampled_from([VALID_IDS, VALID_IDS, OTHER_IDS]).flatmap(lambda ids: ids))
    mask = draw(MASKS)
    shape = np.shape(ids) if isinstance(ids, np.ndarray) else None
    if shape and len(shape) == 2 and draw(st.booleans()):
        mask = draw(hnp.arrays(np.int64, shape, elements=st.sampled_from([0, 1, 1, 1, 2])))
    rows = shape[0] if shape and len(shape) == 2 else 1
    task = draw(st.sampled_from(["pt", "prefix"]) | st.lists(st.sampled_from(["pt", "prefix"]), min_size=rows,
                                                             max_size=rows) | TASKS)
    call = {"verb": draw(st.sampled_from(["logits", "generate"])), "input_ids": ids, "attention_mask": mask,
            "task": task}
    if call["verb"] == "generate":
        call |= {name: draw(valid) for name, valid in GENERATION.items()}
        broken = draw(st.sampled_from([None] * len(GENERATION) + list(GENERATION)))
        if broken:
            call[broken] = draw(NUMBERS)
    return call


@pytest.fixture(scope="module")
def served(tiny_llama):
    return load(tiny_llama["artifact"])


@fuzz(400)
@given(call=requests())
def test_runtime_inputs_work_or_are_refused(served, call):
    call = dict(call)
    verb = call.pop("verb")
    out = works_or_says_why(lambda: getattr(served, verb)(**call))
    if out is None:
        return
    ids = np.atleast_2d(np.asarray(call["input_ids"]))
    if verb == "logits":
        assert out.shape == (*ids.shape, VOCAB) and np.isfinite(out).all()
    else:
        assert out.shape[0] == ids.shape[0] and ids.shape[1] <= out.shape[1] <= ids.shape[1] + call["max_new_tokens"]
        np.testing.assert_array_equal(out[:, :ids.shape[1]], ids)
        assert out.min() >= 0 and out.max() < VOCAB


# lone surrogates are how Python hands over bytes that are not UTF-8 (a shell's argv, say)
TEXTS = st.sampled_from(["the cat sat", "abc\udcff", "\udc80 x"]) | st.text(
    st.characters() | st.characters(categories=["Cs"]), max_size=20)


@fuzz(40)
@given(texts=st.one_of(TEXTS, st.lists(TEXTS, max_size=3), st.sampled_from([None, 5])), task=TASKS)
def test_text_generation_works_or_is_refused(served, texts, task):
    out = works_or_says_why(lambda: served.generate_text(texts, task=task, max_new_tokens=2))
    assert out is None or (isinstance(out, list) and all(isinstance(t, str) for t in out))


ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True), st.text(max_size=4),
                st.sampled_from(["10", [1], ["CPUExecutionProvider"], "CPUExecutionProvider", [None], (), 2 ** 70]))


@fuzz(40)
@given(folder=st.sampled_from(["artifact"] * 3) | ANY, providers=ANY, verify=ANY, max_batch_size=ANY)
def test_load_arguments_work_or_are_refused(tiny_llama, folder, providers, verify, max_batch_size):
    folder = tiny_llama["artifact"] if folder == "artifact" else folder
    model = works_or_says_why(lambda: load(folder, providers=providers, verify=verify, max_batch_size=max_batch_size))
    if model is not None:
        works_or_says_why(lambda: model.logits(np.array([[5, 6, 7]] * 3), task="pt"))
