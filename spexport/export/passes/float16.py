"""fp16 weights and compute, for GPU providers; the graph's inputs and outputs and a baked prompt bank
stay float32, so the artifact's interface does not change."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from spexport.export.passes.bake_prompt_bank import BANK_CONSTANTS

PROTOBUF_LIMIT = 1_800_000_000  # shape inference serialises the model: protobuf's 2 GB limit, with room


class ConvertToFloat16Pass(FunctionalPass):
    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # shape inference serialises the model, which protobuf refuses past 2 GB (ByteSize() too: it serialises)
        large = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None) \
            > PROTOBUF_LIMIT
        proto = ir.to_proto(ir.external_data.load_to_model(model))  # the converter reads every weight in memory
        bank_readers = []
        for i, node in enumerate(proto.graph.node):
            if node.op_type == "Gather" and node.input[0] in BANK_CONSTANTS:
                node.name = node.name or f"spx_bank_gather{i}"
                bank_readers.append(node.name)
        converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=bank_readers,
                                             disable_shape_infer=large)
        model = ir.from_proto(converted)
        model.graph.sort()  # the converter appends the casts of float32 inputs after their readers
        return PassResult(model, modified=True)
