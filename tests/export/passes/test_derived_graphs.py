"""The passes that derive the core and prefix graphs from the core graph, and restore a pruned input."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import run
from onnx import TensorProto, helper
from onnx_ir.passes import PreconditionError

from spexport.errors import ModelError
from spexport.export.passes import GatherLogitsPositionsPass, RestoreInputPass, TakeEmbeddingsInputPass

VOCAB, HIDDEN = 7, 4
RNG = np.random.default_rng(0)
EMBEDDINGS = RNG.random((VOCAB, HIDDEN), np.float32)
HEAD, BIAS = RNG.random((HIDDEN, VOCAB), np.float32), RNG.random(VOCAB, np.float32)


def _lm() -> ir.Model:
    """input_ids -> embeddings -> (head, bias) -> logits; present = concat(past, embedded token) per part."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", VOCAB])]
    nodes = [helper.make_node("Gather", ["embeddings", "input_ids"], ["hidden"]),
             helper.make_node("MatMul", ["hidden", "head"], ["scores"]),
             helper.make_node("Add", ["scores", "bias"], ["logits"]),
             helper.make_node("Unsqueeze", ["hidden", "one"], ["token_kv"])]
    for part in ("key", "value"):
        past, present = f"past_key_values.0.{part}", f"present.0.{part}"
        inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["b", 1, "p", HIDDEN]))
        nodes.append(helper.make_node("Concat", [past, "token_kv"], [present], axis=2))
        outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["b", 1, "t", HIDDEN]))
    weights = [onnx.numpy_helper.from_array(array, name) for array, name in
               [(EMBEDDINGS, "embeddings"), (HEAD, "head"), (BIAS, "bias"), (np.array([1], np.int64), "one")]]
    graph = helper.make_graph(nodes, "lm", inputs, outputs, weights)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    empty = np.zeros((len(ids), 1, 0, HIDDEN), np.float32)
    return {"input_ids": ids, "position_ids": np.zeros_like(ids),
            "past_key_values.0.key": empty, "past_key_values.0.value": empty}


def test_logits_are_computed_at_the_positions_asked_for_only():
    ids = np.array([[1, 2, 3], [4, 5, 6]])
    every = run(_lm(), _feeds(ids))["logits"]
    model = GatherLogitsPositionsPass()(_lm()).model
    positions = np.array([[2], [0]])
    picked = run(model, {**_feeds(ids), "logits_positions": positions})["logits"]
    np.testing.assert_allclose(picked, every[[[0], [1]], positions], rtol=1e-6)
    assert [d if isinstance(d, int) else str(d) for d in model.graph.outputs[0].shape] == ["b", "logits_length", VOCAB]


def test_a_head_it_does_not_know_is_left_computing_every_position():
    model = _lm()
    next(node for node in model.graph if node.op_type == "MatMul").op_type = "Einsum"
    assert not GatherLogitsPositionsPass()(model).modified
    assert "logits_positions" not in [value.name for value in model.graph.inputs]


def test_the_prefix_graph_takes_embeddings_and_gives_the_same_keys_and_values():
    ids = np.array([[1, 2, 3]])
    want = run(_lm(), _feeds(ids))
    model = TakeEmbeddingsInputPass()(_lm()).model
    assert [value.name for value in model.graph.outputs] == ["present.0.key", "present.0.value"]
    assert {"head", "bias"}.isdisjoint(model.graph.initializers)  # the LM head is not loaded at all
    assert "input_ids" not in [value.name for value in model.graph.inputs]
    feeds = {k: v for k, v in _feeds(ids).items() if k != "input_ids"}
    got = run(model, {**feeds, "inputs_embeds": EMBEDDINGS[ids]})
    np.testing.assert_array_equal(got["present.0.key"], want["present.0.key"])


def test_a_pruned_input_comes_back_unread_and_a_present_one_stays():
    model = _lm()
    model.graph.inputs.remove(next(v for v in model.graph.inputs if v.name == "position_ids"))
    assert RestoreInputPass("position_ids", ir.DataType.INT64, ["b", "s"], 1)(model).modified
    assert [value.name for value in model.graph.inputs][:2] == ["input_ids", "position_ids"]
    assert not RestoreInputPass("position_ids", ir.DataType.INT64, ["b", "s"], 1)(model).modified


def test_a_graph_without_a_token_lookup_cannot_take_embeddings():
    model = _lm()
    next(node for node in model.graph if node.op_type == "Gather").op_type = "GatherElements"
    with pytest.raises(PreconditionError) as raised:
        TakeEmbeddingsInputPass()(model)
    assert isinstance(raised.value.__cause__, ModelError)
    assert str(raised.value.__cause__).startswith("no Gather of a [vocab, hidden] initializer by input_ids")
