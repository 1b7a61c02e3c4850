"""Give a decoder-with-past graph a KV prefix that callers never see.

The frozen model is exported once with optimum-onnx's decoder-with-past ports. This pass adds two
inputs, `kv_prefix` [batch, layers, 2, kv_heads, n_prefix, head_dim] and `prefix_mask`
[batch, n_prefix], and rewires the graph so that, inside it:
  past     = concat(prefix, caller's past)       per layer, along the sequence axis
  mask     = concat(prefix_mask, caller's mask)
  position = caller's position + the row's number of virtual tokens
  present  = everything after the prefix           (the caller's tokens only)
Rows with fewer virtual tokens than the batch's longest are left-padded with masked slots, so
tasks of different lengths share one batch and each row sees exactly its own prefix.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.artifact.ports import KV_PREFIX, PAST_KEY, PAST_VALUE, PREFIX_MASK, PRESENT_KEY, PRESENT_VALUE
from spexport.errors import ModelError
from spexport.export.passes.values import constant, graph_input, intercept, op


class AddPrefixInputsPass(InPlacePass):
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim

    def requires(self, model: ir.Model) -> None:
        """The decoder-with-past ports (export/decoder/graph.py's), which the prefix is wired into."""
        inputs = {value.name for value in model.graph.inputs}
        outputs = {value.name for value in model.graph.outputs}
        for name in ["position_ids", "attention_mask"]:
            if name not in inputs:
                raise ModelError(f"the exported decoder graph has no {name} input, which spexport offsets for the "
                                 "prefix; this model's ONNX export is not supported")
        for layer in range(self.num_layers):
            for past_name, present_name in [(PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)]:
                past_name, present_name = past_name.format(layer), present_name.format(layer)
                if past_name not in inputs or present_name not in outputs:
                    raise ModelError(f"the exported decoder graph has no {past_name} input or {present_name} output; "
                                     "this model's ONNX export is not supported")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        inputs = {value.name: value for value in graph.inputs}
        outputs = {value.name: i for i, value in enumerate(graph.outputs)}
        kv_prefix = graph_input(graph, KV_PREFIX, ir.DataType.FLOAT,
                                ["batch_size", self.num_layers, 2, self.kv_heads, "prefix_length", self.head_dim])
        prefix_mask = graph_input(graph, PREFIX_MASK, ir.DataType.INT64, ["batch_size", "prefix_length"])
        head, tail = [], []  # nodes run before the frozen model's, and after

        # The caller's tokens come after the row's own virtual tokens.
        n_virtual = op("ReduceSum", [prefix_mask, constant(graph, "spx_axis1", np.array([1], np.int64))],
                       "spx_n_virtual", keepdims=1)
        positions = op("Add", [inputs["position_ids"], n_virtual.outputs[0]], "spx_position_ids")
        mask = op("Concat", [prefix_mask, inputs["attention_mask"]], "spx_attention_mask", axis=1)
        prefix_len = op("Shape", [kv_prefix], "spx_prefix_len", start=4, end=5)
        intercept(inputs["position_ids"], positions, 0)
        intercept(inputs["attention_mask"], mask, 1)
        head += [n_virtual, positions, mask, prefix_len]

        max_end = constant(graph, "spx_max", np.array([np.iinfo(np.int64).max], np.int64))
        axis2 = constant(graph, "spx_axis2", np.array([2], np.int64))
        # every layer's key and value prefix [batch, kv_heads, prefix, head_dim] in two kernels: kv_prefix
        # viewed as [batch, layers * 2 * kv_heads, prefix, head_dim], split along that axis
        pieces = 2 * self.num_layers
        flat = op("Reshape", [kv_prefix, constant(graph, "spx_prefix_flat_shape",
                                                  np.array([0, pieces * self.kv_heads, -1, self.head_dim], np.int64))],
                  "spx_kv_prefix_flat")
        names = [name.format(layer) for layer in range(self.num_layers) for name in (PAST_KEY, PAST_VALUE)]
        split = ir.node("Split", [flat.outputs[0], constant(graph, "spx_prefix_split",
                                                            np.full(pieces, self.kv_heads, np.int64))],
                        {"axis": 1}, outputs=[ir.Value(name=f"spx_prefix_{name}") for name in names],
                        name="spx_prefix_split")
        head += [flat, split]
        parts = dict(zip(names, split.outputs))
        for layer in range(self.num_layers):
            for past_name, present_name in [(PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)]:
                past_name, present_name = past_name.format(layer), present_name.format(layer)
                past = inputs[past_name]
                joined = op("Concat", [parts[past_name], past], f"spx_{past_name}", axis=2)
                intercept(past, joined, 1)
                head.append(joined)
                # the graph's present becomes the frozen model's present less the prefix
                present = graph.outputs[outputs[present_name]]
                caller_only = ir.node("Slice", [present, prefix_len.outputs[0], max_end, axis2],
                                      outputs=[ir.Value(name=present_name, type=present.type, shape=present.shape)],
                                      name=f"spx_slice_{present_name}")
                # the whole present is longer than the caller's by the prefix: its declared axes no longer hold
                present.name, present.shape = f"spx_{present_name}", None
                graph.outputs[outputs[present_name]] = caller_only.outputs[0]
                tail.append(caller_only)
        graph.insert_before(graph[0], head)
        graph.extend(tail)
        return PassResult(model, modified=True)
