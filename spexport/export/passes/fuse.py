"""Fuse norms, activations and skip connections into ONNX Runtime's contrib operators, and turn
shape arithmetic into constant reshapes, with onnxruntime.transformers' optimizer (which works on
ONNX protobufs; its result comes back into onnx-ir before this pass touches it).

Only the fusions that match the graphs torch exports today run: its attention patterns predate them
and never match, and rotary embeddings are FuseRotaryEmbeddingPass's (the optimizer's own search for
them took most of its time, growing with the square of the layers). The fused graph needs ONNX
Runtime to run. Its inputs stay as they were, read or not (BLOOM's position_ids: ALiBi takes
positions from the mask).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from spexport.export.passes.tag import record_fusions

LARGE_TENSOR = 1 << 20  # bytes: weight matrices; norms' weights, biases and constants stay in the graph


class FuseTransformerOpsPass(FunctionalPass):
    """The fused operators and how many of each are recorded in the result's metadata (tag.py)."""

    def __init__(self, fusion_type: str, num_heads: int, hidden_size: int, workdir: Path | None = None):
        """`workdir`: a folder that outlives the fused model, where its weight matrices stay (memory-mapped)
        while the optimizer works on the graph alone; without one, the optimizer gets them in memory."""
        super().__init__()
        self.fusion_type, self.num_heads, self.hidden_size = fusion_type, num_heads, hidden_size
        self.workdir = workdir

    def call(self, model: ir.Model) -> PassResult:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        if self.workdir is None:
            proto = ir.to_proto(model)
        else:  # written tensor by tensor; the optimizer reads shapes and small constants, never these
            path = self.workdir / "fuse_input.onnx"
            ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=LARGE_TENSOR)
            proto = onnx.load(path, load_external_data=False)
        fusions = FusionOptions(self.fusion_type)
        fusions.enable_attention = fusions.enable_rotary_embeddings = fusions.enable_qordered_matmul = False
        # opt_level 0: only the pattern fusions, no provider-specific rewriting baked into the file.
        optimized = optimize_model(proto, model_type=self.fusion_type, num_heads=self.num_heads,
                                   hidden_size=self.hidden_size, optimization_options=fusions, opt_level=0)
        counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
        if self.workdir is None:
            fused = ir.from_proto(optimized.model)
        else:
            onnx.save(optimized.model, path)  # its weights still refer to the file beside it
            fused = ir.load(path)
        _keep_inputs(fused.graph, model.graph.inputs)
        for domain in sorted({node.domain for node in fused.graph} - {"", "ai.onnx"} - set(fused.opset_imports)):
            fused.opset_imports[domain] = 1
        fused.metadata_props.update(model.metadata_props)  # other passes' records
        record_fusions(fused, counts)
        return PassResult(fused, modified=bool(counts))


def _keep_inputs(graph: ir.Graph, inputs: list[ir.Value]) -> None:
    """Put back, where they stood, the `inputs` the optimizer pruned for being unread: the ports stay."""
    kept = {value.name for value in graph.inputs}
    for position, value in enumerate(inputs):
        if value.name not in kept:
            shape = None if value.shape is None else value.shape.copy()
            graph.inputs.insert(position, ir.Value(name=value.name, type=value.type, shape=shape))
