"""fp16 weights and compute, for GPU providers; the graph's inputs and outputs stay float32, so the artifact's
interface does not change (the prompt bank, wired in after this pass by build.py, stays float32 too)."""

from __future__ import annotations

from unittest import mock

import onnx_ir as ir
from onnx import TensorProto, ValueInfoProto
from onnx_ir.passes import FunctionalPass, PassResult

PROTOBUF_LIMIT = 1_800_000_000  # shape inference serialises the model: protobuf's 2 GB limit, with room


class ConvertToFloat16Pass(FunctionalPass):
    """Weights still in a file are not read into memory: the converter only retypes their references,
    and each becomes a lazily cast fp16 tensor, read and converted one at a time as the graph is saved
    (at a 1B model, converting in memory held the float32 weights three times over)."""

    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers import float16

        in_files = {name: tensor for name, value in model.graph.initializers.items()
                    if isinstance(tensor := value.const_value, ir.ExternalTensor) and tensor.dtype == ir.DataType.FLOAT}
        proto = ir.to_proto(model)
        # the converter reads a converted weight back only for its shape, which its dims give without the data
        with mock.patch.object(float16, "make_value_info_from_tensor", _value_info_from_dims):
            converted = float16.convert_float_to_float16(proto, keep_io_types=True,
                                                         disable_shape_infer=proto.ByteSize() > PROTOBUF_LIMIT)
        model = ir.from_proto(converted)
        for name, source in in_files.items():  # retyped, but their references still point at float32 data
            weight = model.graph.initializers[name]
            if weight.const_value.dtype == ir.DataType.FLOAT16:
                weight.const_value = ir.LazyTensor(
                    lambda source=source: ir.Tensor(float16.convert_np_to_float16(source.numpy())),
                    dtype=ir.DataType.FLOAT16, shape=source.shape, name=name)
        model.graph.sort()  # the converter appends the casts of float32 inputs after their readers
        return PassResult(model, modified=True)


def _value_info_from_dims(tensor: TensorProto) -> ValueInfoProto:
    value = ir.Value(name=tensor.name, type=ir.TensorType(ir.DataType(tensor.data_type)), shape=ir.Shape(tensor.dims))
    return ir.serde.serialize_value(value)
