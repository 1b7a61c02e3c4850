"""fp16 weights and compute, for GPU providers; the graph's inputs and outputs stay float32, so the artifact's
interface does not change (the prompt bank, wired in after this pass by build.py, stays float32 too)."""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, ValueInfoProto
from onnx_ir.passes import FunctionalPass, PassResult

CHUNK = 1 << 22  # float32 values converted at a time (16 MB)
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
                weight.const_value = ir.LazyTensor(functools.partial(_halved, source, float16.convert_np_to_float16),
                                                   dtype=ir.DataType.FLOAT16, shape=source.shape, name=name)
        model.graph.sort()  # the converter appends the casts of float32 inputs after their readers
        return PassResult(model, modified=True)


def _halved(source: ir.ExternalTensor, convert) -> ir.Tensor:
    """`source` in fp16, read from its file a chunk at a time into the fp16 array: memory holds the fp16 copy and
    one chunk, not the float32 tensor and the converter's temporaries (3 GB at a 1B model's embedding table)."""
    halves = np.empty(source.shape.numpy(), np.float16)
    flat = halves.reshape(-1)
    with open(source.path, "rb") as file:
        file.seek(source.offset or 0)
        for start in range(0, flat.size, CHUNK):
            chunk = np.fromfile(file, np.float32, count=min(CHUNK, flat.size - start))
            flat[start:start + chunk.size] = convert(chunk)  # elementwise: clamps to fp16's range, as whole
    return ir.Tensor(halves, name=source.name)


def _value_info_from_dims(tensor: TensorProto) -> ValueInfoProto:
    value = ir.Value(name=tensor.name, type=ir.TensorType(ir.DataType(tensor.data_type)), shape=ir.Shape(tensor.dims))
    return ir.serde.serialize_value(value)
