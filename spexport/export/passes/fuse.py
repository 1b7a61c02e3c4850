"""Fuse norms, activations, skip connections and rotary embeddings into ONNX Runtime's contrib
operators, with onnxruntime.transformers' optimizer (which works on ONNX protobufs).

Attention itself is not fused: the optimizer's GPT-2 attention patterns predate the graphs torch
exports today, so they never match. The fused graph needs ONNX Runtime to run. Its inputs stay as
they were, read or not (BLOOM's position_ids: ALiBi takes positions from the mask).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult


class FuseTransformerOpsPass(FunctionalPass):
    """`counts` holds the fused operators and how many of each (recorded in the graph's metadata)."""

    def __init__(self, fusion_type: str, num_heads: int, hidden_size: int):
        super().__init__()
        self.fusion_type, self.num_heads, self.hidden_size = fusion_type, num_heads, hidden_size
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        proto = ir.to_proto(model)
        inputs = [onnx.ValueInfoProto.FromString(value.SerializeToString()) for value in proto.graph.input]
        # opt_level 0: only the pattern fusions, no provider-specific rewriting baked into the file.
        optimized = optimize_model(proto, model_type=self.fusion_type, num_heads=self.num_heads,
                                   hidden_size=self.hidden_size, optimization_options=FusionOptions(self.fusion_type),
                                   opt_level=0)
        self.counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
        proto = optimized.model
        kept = {value.name for value in proto.graph.input}
        for position, value in enumerate(inputs):  # the optimizer prunes unread inputs; the ports stay
            if value.name not in kept:
                proto.graph.input.insert(position, value)
        domains = {node.domain for node in proto.graph.node} - {"", "ai.onnx"}
        known = {opset.domain for opset in proto.opset_import}
        proto.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - known))
        return PassResult(ir.from_proto(proto), modified=bool(self.counts))
