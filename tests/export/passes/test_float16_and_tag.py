import numpy as np
import onnx
import onnx_ir as ir
from graphs import run

from spexport.export.passes import ConvertToFloat16Pass, TagGraphPass
from spexport.export.passes.tag import FUSIONS_KEY, WEIGHTS_KEY


def _matmul(weight: np.ndarray) -> ir.Model:
    h = onnx.helper
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                         [onnx.numpy_helper.from_array(weight, "w")])
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def test_float16_weights_behind_float32_ports():
    weight = np.random.default_rng(0).random((4, 3), np.float32)
    x = np.random.default_rng(1).random((2, 4), np.float32)
    half = ConvertToFloat16Pass()(_matmul(weight)).model
    proto = ir.to_proto(half)
    assert {i.name: i.data_type for i in proto.graph.initializer}["w"] == onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    np.testing.assert_allclose(run(proto, {"x": x})["y"], x @ weight, atol=1e-2)


def test_tag_records_the_weights_and_fusions():
    model = TagGraphPass("int8", {"Gelu": 2, "SkipLayerNormalization": 3})(_matmul(np.eye(4, 3, dtype=np.float32)))
    meta = {p.key: p.value for p in ir.to_proto(model.model).metadata_props}
    assert meta[WEIGHTS_KEY] == "int8" and meta[FUSIONS_KEY] == "Gelu:2,SkipLayerNormalization:3"


def test_weights_in_a_file_are_cast_lazily_and_the_bank_stays_float32(tmp_path):
    """A weight still in a file becomes a lazily cast fp16 tensor; the bank's Gather is kept out of the
    conversion, so the bank stays float32; the input model is left as it was."""
    weight = np.random.default_rng(0).random((4, 3), np.float32)
    bank = np.random.default_rng(1).random((2, 4), np.float32)
    h = onnx.helper
    graph = h.make_graph([h.make_node("Gather", ["spx_kv_bank", "task_ids"], ["x"], axis=0),
                          h.make_node("MatMul", ["x", "w"], ["y"])], "bank",
                         [h.make_tensor_value_info("task_ids", onnx.TensorProto.INT64, [2])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
                         [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bank, "spx_kv_bank")])
    ir.save(ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])), tmp_path / "m.onnx",
            external_data="m.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    half = ConvertToFloat16Pass()(model).model
    assert [node.name for node in model.graph] == ["", ""]
    assert isinstance(half.graph.initializers["w"].const_value, ir.LazyTensor)
    assert half.graph.initializers["w"].const_value.dtype == ir.DataType.FLOAT16
    assert half.graph.initializers["spx_kv_bank"].const_value.dtype == ir.DataType.FLOAT
    ir.save(half, tmp_path / "half.onnx")
    task_ids = np.array([1, 0], np.int64)
    np.testing.assert_allclose(run(onnx.load(tmp_path / "half.onnx"), {"task_ids": task_ids})["y"],
                               bank[task_ids] @ weight, atol=1e-2)
