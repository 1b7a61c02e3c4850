"""Compute the LM head at the positions a caller asks for, not at every position.

Generation needs the last position's logits only, so a prompt need not pay for the head at each of its
tokens (21% of SmolLM2's multiply-adds). The pass adds `logits_positions` [batch, K] and gathers those hidden
states before the head's product: `logits` becomes [batch, K, vocab]. A head it does not recognise is left as
it is, and the graph keeps computing every position's logits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.artifact.ports import LOGITS_POSITIONS
from spexport.export.passes.values import constant, graph_input, op

HEADS = ("MatMul", "MatMulNBits", "Gemm")  # the LM head's product (float, quantized)
AFTER_HEAD = ("Add", "Cast", "Div", "Tanh", "Mul")  # what may follow it before `logits`, position by position: a bias,
# fp16's cast back, a final soft cap (Gemma 2: tanh(logits / cap) * cap)


class GatherLogitsPositionsPass(InPlacePass):
    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        logits = next(value for value in graph.outputs if value.name == "logits")
        head = logits.producer()
        while head is not None and head.op_type in AFTER_HEAD:
            head = head.inputs[0].producer()
        if head is None or head.op_type not in HEADS:
            return PassResult(model, modified=False)
        positions = graph_input(graph, LOGITS_POSITIONS, ir.DataType.INT64, ["batch_size", "logits_length"])
        index = op("Unsqueeze", [positions, constant(graph, "spx_last_axis", np.array([-1], np.int64))],
                   "spx_logits_index")
        picked = op("GatherND", [head.inputs[0], index.outputs[0]], "spx_hidden_at_logits_positions", batch_dims=1)
        graph.insert_before(head, [index, picked])
        head.replace_input_with(0, picked.outputs[0])
        if logits.shape is not None and len(logits.shape) == 3:
            logits.shape = ir.Shape([logits.shape[0], "logits_length", logits.shape[2]])
        return PassResult(model, modified=True)
