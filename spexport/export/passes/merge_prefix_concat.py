"""Let the prefix join the frozen model's own concat(past, new token), so a step copies the past once.

AddPrefixInputsPass gives each layer `all = Concat(prefix, past)`. The frozen model reads a layer's
past in a Concat along the sequence axis (past, new token) and, for one layer, in a Shape (the
past's length). That Concat can take the prefix as one more input, and the Shape can become the
caller's past's shape plus the prefix length; `all` is then never built. A past with any other
reader keeps its Concat.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.export.passes.values import constant, integer, op, producer


class MergePrefixIntoPastConcatPass(InPlacePass):
    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        merged = 0
        for join in [node for node in graph if _joins_prefix_to_past(node)]:
            joined = join.outputs[0]
            uses = [use.node for use in joined.uses()]
            if joined.is_graph_output() or not uses or not all(_mergeable(use, joined) for use in uses):
                continue
            prefix, past = join.inputs
            for use in uses:
                if use.op_type == "Concat":
                    rest = list(use.inputs[1:])
                    use.resize_inputs(len(rest) + 2)
                    for i, value in enumerate([prefix, past, *rest]):
                        use.replace_input_with(i, value)
                else:
                    graph.insert_before(use, _shape_plus_prefix(graph, use, prefix, past))
                    graph.remove(use, safe=True)
            graph.remove(join, safe=True)
            merged += 1
        return PassResult(model, modified=merged > 0)


def _joins_prefix_to_past(node: ir.Node) -> bool:
    """`Concat(prefix, past)` along the sequence axis, the prefix split from kv_prefix and past being a
    graph input: AddPrefixInputsPass's join."""
    return node.op_type == "Concat" and len(node.inputs) == 2 and integer(node, "axis") == 2 \
        and producer(node.inputs[0], "Split") is not None \
        and node.inputs[1] is not None and node.inputs[1].is_graph_input()


def _mergeable(use: ir.Node, joined: ir.Value) -> bool:
    """A reader of `joined` (prefix + caller's past) that can take the two apart."""
    if use.op_type == "Shape":
        return True
    # the 4-D [batch, heads, sequence, head_dim] past, first, appended to along the sequence axis
    return use.op_type == "Concat" and integer(use, "axis") in (2, -2) and use.inputs[0] is joined \
        and joined not in use.inputs[1:]


def _shape_plus_prefix(graph: ir.Graph, shape: ir.Node, prefix: ir.Value, past: ir.Value) -> list[ir.Node]:
    """Nodes giving what `shape` gave for concat(prefix, past), without that concat: the caller's past's
    shape plus [0, 0, prefix length, 0], clamped as Shape's start/end clamp (as Slice's do)."""
    out = shape.outputs[0]
    tag = out.name or f"spx_shape{id(shape)}"
    prefix_len = op("Shape", [prefix], f"{tag}_spx_prefix_len", start=2, end=3)
    offset = op("Concat", [constant(graph, f"{tag}_spx_zeros2", np.zeros(2, np.int64)), prefix_len.outputs[0],
                           constant(graph, f"{tag}_spx_zeros1", np.zeros(1, np.int64))], f"{tag}_spx_offset", axis=0)
    own = op("Shape", [past], f"{tag}_spx_own")
    full = op("Add", [own.outputs[0], offset.outputs[0]], f"{tag}_spx_full")
    nodes = [prefix_len, offset, own, full]
    start, end = integer(shape, "start"), integer(shape, "end")
    if start is not None or end is not None:
        bounds = [constant(graph, f"{tag}_spx_{k}", np.array([v], np.int64))
                  for k, v in (("start", start or 0), ("end", np.iinfo(np.int64).max if end is None else end))]
        nodes.append(op("Slice", [full.outputs[0], *bounds], f"{tag}_spx_sliced"))
    out.replace_all_uses_with(nodes[-1].outputs[0], replace_graph_outputs=True)
    result = nodes[-1].outputs[0]
    name, out.name = out.name, f"{tag}_spx_unused"
    result.name, result.type, result.shape = name, out.type, out.shape
    return nodes
