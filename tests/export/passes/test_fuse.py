import numpy as np
import onnx
import onnx_ir as ir
from graphs import run

from spexport.export.passes import FuseTransformerOpsPass
from spexport.export.passes.tag import FUSIONS_KEY


def _erf_gelu() -> ir.Model:
    """x · 0.5 · (1 + erf(x / √2)), as torch exports GELU."""
    h = onnx.helper
    consts = {"sqrt2": 1.4142135381698608, "one": 1.0, "half": 0.5}
    nodes = [h.make_node("Div", ["x", "sqrt2"], ["scaled"]), h.make_node("Erf", ["scaled"], ["erf"]),
             h.make_node("Add", ["erf", "one"], ["shifted"]), h.make_node("Mul", ["x", "shifted"], ["gated"]),
             h.make_node("Mul", ["gated", "half"], ["y"])]
    graph = h.make_graph(nodes, "gelu", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])],
                         [onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()])
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_gelu_becomes_one_operator_with_the_same_values():
    model = _erf_gelu()
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    before = run(model, {"x": x})["y"]
    fused = FuseTransformerOpsPass("gpt2", num_heads=2, hidden_size=8)(model).model
    assert [n.op_type for n in fused.graph] == ["Gelu"]
    np.testing.assert_allclose(run(ir.to_proto(fused), {"x": x})["y"], before, atol=1e-6)


def test_an_input_the_graph_does_not_read_stays():
    """BLOOM's graph takes position_ids without reading them (ALiBi positions come from the mask);
    the optimizer prunes unread inputs, but every decoder graph keeps the same ports."""
    proto = ir.to_proto(_erf_gelu())
    proto.graph.input.append(onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, [2, 8]))
    fused = FuseTransformerOpsPass("gpt2", num_heads=2, hidden_size=8)(ir.from_proto(proto)).model
    assert [value.name for value in fused.graph.inputs] == ["x", "position_ids"]
    x = np.ones((2, 8), np.float32)
    run(ir.to_proto(fused), {"x": x, "position_ids": np.zeros((2, 8), np.int64)})


def test_the_counts_are_recorded_in_the_result_beside_earlier_passes():
    model = _erf_gelu()
    model.metadata_props[FUSIONS_KEY] = "RotaryEmbedding:2"
    fused = FuseTransformerOpsPass("gpt2", num_heads=2, hidden_size=8)(model).model
    assert fused.metadata_props[FUSIONS_KEY] == "Gelu:1,RotaryEmbedding:2"
    assert fused.opset_imports["com.microsoft"] == 1


def test_a_workdir_keeps_large_weights_in_a_file(tmp_path):
    """With a workdir the weights stay in a file beside the fused graph, read when used."""
    weight = np.random.default_rng(0).random((8, 8 * 1024 * 5), np.float32)  # over LARGE_TENSOR
    h = onnx.helper
    proto = ir.to_proto(_erf_gelu())
    proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, "w"))
    proto.graph.node.append(h.make_node("MatMul", ["y", "w"], ["z"]))
    proto.graph.output[0].CopyFrom(h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, weight.shape[1]]))
    fused = FuseTransformerOpsPass("gpt2", num_heads=2, hidden_size=8, workdir=tmp_path)(ir.from_proto(proto)).model
    assert isinstance(fused.graph.initializers["w"].const_value, ir.ExternalTensor)
    ir.save(fused, tmp_path / "fused.onnx")  # reads the weight from the file
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_allclose(run(onnx.load(tmp_path / "fused.onnx"), {"x": x})["z"], run(proto, {"x": x})["z"],
                               rtol=1e-5)
