import numpy as np
from graphs import D, H, decoder_like, feeds, run

from spexport.export.passes import AddPrefixInputsPass, MergePrefixIntoPastConcatPass


def _wired(sum_of_past: bool):
    model = decoder_like(layers=2)
    if not sum_of_past:  # drop the reader that needs the whole past as one tensor
        graph = model.graph
        for node in [n for n in graph if n.op_type == "ReduceSum"]:
            graph.outputs.remove(node.outputs[0])
            graph.remove(node, safe=True)
    AddPrefixInputsPass(2, H, D)(model)
    return model


def _prefix_feeds():
    kv = np.random.default_rng(5).random((2, 2, 2, H, 2, D), np.float32)
    return {**feeds(layers=2), "kv_prefix": kv, "prefix_mask": np.array([[1, 1], [0, 1]], np.int64)}


def _prefix_joins(model) -> int:
    """Concat(prefix, past) nodes: the whole past built as one tensor."""
    return sum(1 for n in model.graph if n.op_type == "Concat" and len(n.inputs) == 2
               and n.inputs[1].name.startswith("past_key_values"))


def test_the_prefix_joins_the_frozen_models_own_concat_with_the_same_outputs():
    model = _wired(sum_of_past=False)
    before = run(model, _prefix_feeds())
    assert _prefix_joins(model) == 4
    result = MergePrefixIntoPastConcatPass()(model)
    assert result.modified and _prefix_joins(model) == 0
    after = run(model, _prefix_feeds())
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)


def test_a_past_with_another_reader_keeps_its_concat():
    model = _wired(sum_of_past=True)
    before = run(model, _prefix_feeds())
    MergePrefixIntoPastConcatPass()(model)
    assert _prefix_joins(model) == 2  # each layer's key is summed whole; its value merges
    after = run(model, _prefix_feeds())
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
