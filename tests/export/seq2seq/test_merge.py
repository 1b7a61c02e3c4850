"""merge_decoders on two tiny decoders: the If picks the branch, equal weights are stored once, a weight
that only shares a name stays apart, and an output the with-past graph lacks is passed through."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from spexport.export.seq2seq.merge import merge_decoders

W = np.arange(6, dtype=np.float32).reshape(2, 3)


def _decoder(weight_name: str, scale: float, with_past: bool) -> ir.Model:
    """logits = (x @ W) * scale, where the tracer named W `weight_name`; without past it also returns
    `cross` = x @ W, which the with-past graph takes as an input instead."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2])]
    nodes = [helper.make_node("MatMul", ["x", weight_name], ["xw"]),
             helper.make_node("Mul", ["xw", "scale"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])]
    # same name in both graphs, different values: must not be taken for one weight
    weights = [numpy_helper.from_array(W, weight_name), numpy_helper.from_array(np.full((3,), scale, np.float32),
                                                                                "scale")]
    if with_past:
        inputs.append(helper.make_tensor_value_info("cross_past", TensorProto.FLOAT, ["b", 3]))
    else:
        nodes.append(helper.make_node("Identity", ["xw"], ["cross"]))
        outputs.append(helper.make_tensor_value_info("cross", TensorProto.FLOAT, ["b", 3]))
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, weights)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_the_condition_picks_the_branch_and_weights_are_stored_once():
    merged = ir.to_proto(merge_decoders(_decoder("onnx::MatMul_1", 1.0, False), _decoder("onnx::MatMul_9", 2.0, True),
                                        "use_cache_branch", {"cross": "cross_past"}))
    onnx.checker.check_model(merged)
    stored = [numpy_helper.to_array(w) for w in merged.graph.initializer]
    assert sum(w.shape == W.shape and (w == W).all() for w in stored) == 1
    assert sorted(w.name for w in merged.graph.initializer) == ["onnx::MatMul_1", "scale", "scale.with_past"]
    assert [i.name for i in merged.graph.input] == ["x", "cross_past", "use_cache_branch"]

    session = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"])
    x, past = np.array([[1.0, 2.0]], np.float32), np.full((1, 3), 7.0, np.float32)
    first = session.run(None, {"x": x, "cross_past": past, "use_cache_branch": np.array([False])})
    later = session.run(None, {"x": x, "cross_past": past, "use_cache_branch": np.array([True])})
    np.testing.assert_allclose(first[0], x @ W)
    np.testing.assert_allclose(first[1], x @ W)
    np.testing.assert_allclose(later[0], 2 * (x @ W))
    np.testing.assert_allclose(later[1], past)
