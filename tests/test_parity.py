"""Every method on every family matches PeftModel: logits within 1e-4, greedy tokens identical."""

import copy
import dataclasses

import numpy as np
import pytest
from conftest import TASKS
from parity import max_abs_diff, peft_generate, peft_logits, peft_model

ATOL = 1e-4
NEW_TOKENS = 14


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(0).integers(4, 150, size=(2, 9)).astype(np.int64)


@pytest.mark.parametrize("task", list(TASKS))
def test_logits_and_greedy_match_peft(built, runtime_model, input_ids, task):
    reference = peft_model(built["model"], built["adapters"][task])
    assert max_abs_diff(runtime_model.logits(input_ids, task=task), peft_logits(reference, input_ids)) <= ATOL
    for row in input_ids:  # compared unpadded, one row at a time
        expected = peft_generate(reference, row[None], NEW_TOKENS)
        got = runtime_model.generate(row[None], task=task, max_new_tokens=NEW_TOKENS)
        assert got.shape[1] == row.size + NEW_TOKENS, "stopped early: pick inputs that do not hit EOS"
        np.testing.assert_array_equal(got, expected)


def test_tasks_differ(runtime_model, input_ids):
    """A guard on the guard: the adapters really change the model, so parity above means something."""
    first, second = (runtime_model.logits(input_ids, task=t) for t in ["pt", "prefix"])
    assert max_abs_diff(first, second) > 1e-2


def test_generation_stops_at_eos_like_transformers(built, runtime_model, input_ids):
    """Make the token row 0 generates second an EOS: row 0 stops and is padded, row 1 goes on."""
    eos = int(runtime_model.generate(input_ids[:1], task="pt", max_new_tokens=2)[0, -1])
    stopping = copy.copy(runtime_model)
    stopping.info = dataclasses.replace(runtime_model.info, eos_token_ids=[eos])
    got = stopping.generate(input_ids, task="pt", max_new_tokens=NEW_TOKENS)
    expected = peft_generate(peft_model(built["model"], built["adapters"]["pt"]), input_ids, NEW_TOKENS,
                             eos_token_ids=[eos], pad_token_id=runtime_model.info.pad_token_id)
    np.testing.assert_array_equal(got, expected)
    assert (got[0, input_ids.shape[1] + 2:] == runtime_model.info.pad_token_id).all()


def test_prefix_joins_the_models_own_past_concat(built, runtime_model):
    """No step copies the whole past an extra time for the prefix: in a traced graph each layer's key
    and value go through one Concat(prefix, caller's past, new token), as the frozen model's own concat
    did. A directly written graph (export/decoder/direct.py) joins the new token inside its Attention,
    which reads Concat(prefix, caller's past) as its past."""
    import onnx

    graph = onnx.load(built["artifact"] / "model.onnx", load_external_data=False).graph
    concats = [node for node in graph.node if node.op_type == "Concat"]
    attentions = [node for node in graph.node if node.op_type == "Attention"]
    if attentions:
        assert len(attentions) == runtime_model.info.num_layers
        for layer, attention in enumerate(attentions):
            assert list(attention.input[4:6]) == [f"spx_past_key_values.{layer}.{w}" for w in ("key", "value")]
            for which in ("key", "value"):
                (joined,) = [n for n in concats if n.output[0] == f"spx_past_key_values.{layer}.{which}"]
                assert list(joined.input) == [f"spx_prefix_past_key_values.{layer}.{which}",
                                              f"past_key_values.{layer}.{which}"]
        return
    assert not [n.name for n in concats if n.output[0].startswith("spx_past_key_values.")]
    layers = runtime_model.info.num_layers
    for layer in range(layers):
        for which in ("key", "value"):
            (joined,) = [n for n in concats if f"past_key_values.{layer}.{which}" in n.input]
            assert list(joined.input[:2]) == [f"spx_prefix_past_key_values.{layer}.{which}",
                                              f"past_key_values.{layer}.{which}"]
            assert len(joined.input) == 3 and joined.output[0] == f"spx_present.{layer}.{which}"
