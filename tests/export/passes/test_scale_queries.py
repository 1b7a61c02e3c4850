import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import run

from spexport.export.passes import ScaleQueriesNotKeysPass
from spexport.export.passes.tag import SCALED_QUERY, fusions


def _attention(scale: np.ndarray) -> ir.Model:
    h = onnx.helper
    q = h.make_tensor_value_info("q", onnx.TensorProto.FLOAT, [1, 2, 3, 4])
    k = h.make_tensor_value_info("k", onnx.TensorProto.FLOAT, [1, 2, 5, 4])
    out = h.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, [1, 2, 3, 5])
    nodes = [h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), h.make_node("Mul", ["kt", "s"], ["ks"]),
             h.make_node("MatMul", ["q", "ks"], ["scores"])]
    graph = h.make_graph(nodes, "attention", [q, k], [out], [onnx.numpy_helper.from_array(scale, "s")])
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


@pytest.mark.parametrize("scale, moved", [(np.array([0.5], np.float32), 1), (np.full(5, 0.5, np.float32), 0)],
                         ids=["one number", "one per key"])
def test_only_a_one_number_scale_moves_and_the_scores_stay_the_same(scale, moved):
    model = _attention(scale)
    feeds = {"q": np.random.default_rng(0).random((1, 2, 3, 4), np.float32),
             "k": np.random.default_rng(1).random((1, 2, 5, 4), np.float32)}
    before = run(model, feeds)["scores"]
    scale_pass = ScaleQueriesNotKeysPass()
    assert scale_pass(model).modified == bool(moved) and fusions(model) == ({SCALED_QUERY: moved} if moved else {})
    np.testing.assert_allclose(run(model, feeds)["scores"], before, rtol=1e-6)
    key_side = next(n for n in model.graph if n.op_type == "MatMul").inputs[1].name
    assert (key_side == "kt") == bool(moved)
