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


def test_weights_in_a_file_are_cast_lazily(tmp_path):
    """A weight still in a file becomes a lazily cast fp16 tensor; the input model is left as it was."""
    weight = np.random.default_rng(0).random((4, 3), np.float32)
    ir.save(_matmul(weight), tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    half = ConvertToFloat16Pass()(model).model
    assert model.graph.initializers["w"].const_value.dtype == ir.DataType.FLOAT
    assert isinstance(half.graph.initializers["w"].const_value, ir.LazyTensor)
    assert half.graph.initializers["w"].const_value.dtype == ir.DataType.FLOAT16
    ir.save(half, tmp_path / "half.onnx")
    x = np.random.default_rng(1).random((2, 4), np.float32)
    np.testing.assert_allclose(run(onnx.load(tmp_path / "half.onnx"), {"x": x})["y"], x @ weight, atol=1e-2)
