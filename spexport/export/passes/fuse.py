"""Fuse norms, activations, skip connections and rotary embeddings into ONNX Runtime's contrib
operators, with onnxruntime.transformers' optimizer (which works on ONNX protobufs).

Attention itself is not fused: the optimizer's GPT-2 attention patterns predate the graphs torch
exports today, so they never match. The fused graph needs ONNX Runtime to run.
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

        # opt_level 0: only the pattern fusions, no provider-specific rewriting baked into the file.
        optimized = optimize_model(ir.to_proto(model), model_type=self.fusion_type, num_heads=self.num_heads,
                                   hidden_size=self.hidden_size, optimization_options=FusionOptions(self.fusion_type),
                                   opt_level=0)
        self.counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
        proto = optimized.model
        domains = {node.domain for node in proto.graph.node} - {"", "ai.onnx"}
        known = {opset.domain for opset in proto.opset_import}
        proto.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - known))
        return PassResult(ir.from_proto(proto), modified=bool(self.counts))
