"""Move attention's scale from the keys to the queries: `q·(kᵀ·s)` becomes `(q·s)·kᵀ`.

torch exports scaled dot-product attention with sqrt(scale) applied to both sides, so each step
would transpose and multiply the whole key cache. With the key side left bare, ONNX Runtime folds
the transpose into the MatMul and no step copies the cache for it; the query is one row per
token. Only a scale of one element is moved (exact up to rounding).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.export.passes.tag import SCALED_QUERY, record_fusions
from spexport.export.passes.values import constant_numbers, ints, op, producer

_ELEMENTWISE = {"Sqrt", "Cast", "Reciprocal", "Neg", "Div", "Mul", "Add", "Sub", "Pow"}


class ScaleQueriesNotKeysPass(InPlacePass):
    """The attention products rewritten are counted in the graph's metadata (tag.py), as MatMulScaledQuery."""

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        moved = 0
        for matmul in [node for node in graph if node.op_type == "MatMul"]:
            keys = producer(matmul.inputs[1], "Mul")
            # a scaled key that anything else reads (a graph output included) must stay
            if keys is None or len(keys.outputs[0].uses()) != 1 or keys.outputs[0].is_graph_output():
                continue
            for transposed, scale in (keys.inputs, tuple(reversed(keys.inputs))):
                if _swaps_last_two_axes(transposed) and _one_element(scale):
                    name = f"{matmul.name or matmul.outputs[0].name}_spx_scaled_query"
                    query = op("Mul", [matmul.inputs[0], scale], name)
                    graph.insert_before(matmul, query)
                    matmul.replace_input_with(0, query.outputs[0])
                    matmul.replace_input_with(1, transposed)
                    graph.remove(keys, safe=True)
                    moved += 1
                    break
        record_fusions(model, {SCALED_QUERY: moved})
        return PassResult(model, modified=moved > 0)


def _swaps_last_two_axes(value: ir.Value) -> bool:
    node = producer(value, "Transpose")
    perm = ints(node, "perm") if node is not None else None
    rank = len(perm or [])
    return rank >= 2 and perm == [*range(rank - 2), rank - 1, rank - 2]


def _one_element(value: ir.Value) -> bool:
    """Whether `value` surely holds one number: a constant of size 1, the last entry of a shape, or
    element-wise arithmetic on such values (how torch computes 1/sqrt(head_dim))."""
    constant = constant_numbers(value)
    if constant is not None:
        return constant.size == 1
    node = value.producer()
    if node is None:
        return False
    if node.op_type in _ELEMENTWISE:
        return all(i is not None and _one_element(i) for i in node.inputs)
    if node.op_type == "Slice" and len(node.inputs) == 3:  # shape[-1:]
        starts, ends = (constant_numbers(i) for i in node.inputs[1:])
        return (producer(node.inputs[0], "Shape") is not None and starts is not None and ends is not None
                and starts.tolist() == [-1] and int(ends.ravel()[0]) >= 2**31 - 1)
    return False

