"""Fuse rotary position embeddings into ONNX Runtime's RotaryEmbedding, one operator per query and key.

Hugging Face models compute `x·cos + rotate_half(x)·sin`, where cos and sin come from
`positions ⊗ inv_freq` (computed once per step, then broadcast into every layer) and
`rotate_half(x) = concat(-x[..., half:], x[..., :half])`. Traced, that is about a dozen small kernels
per query or key per layer; RotaryEmbedding reads cos and sin from caches of every position up to
`max_positions`, built here from the graph's own inv_freq and scaling constants (so the angles are
the ones the model computes). A rotation whose parts do not match this exactly (interleaved rotary,
anything computed differently) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spexport.export.passes.tag import record_fusions
from spexport.export.passes.values import constant, constant_numbers, producer

MS_DOMAIN = "com.microsoft"
ROTARY = "RotaryEmbedding"
_PASS_THROUGH = {"Cast", "Unsqueeze", "Expand", "Identity"}


class FuseRotaryEmbeddingPass(InPlacePass):
    """The rotations replaced are counted in the graph's metadata (tag.py), as RotaryEmbedding."""

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = max_positions

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        caches: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        count = 0
        for add in [node for node in graph if node.op_type == "Add"]:
            match = _rotation(add)
            if match is None:
                continue
            x, cos, sin = match
            angles = _angles(cos, "Cos"), _angles(sin, "Sin")
            if None in angles or angles[0][0] is not angles[1][0]:
                continue
            (freqs, cos_scale), (_, sin_scale) = angles
            source = _frequencies(freqs)
            if source is None:
                continue
            inv_freq, positions = source
            key = (positions.name, inv_freq.tobytes(), cos_scale, sin_scale)
            if key not in caches:
                caches[key] = self._caches(graph, inv_freq, cos_scale, sin_scale, len(caches))
            name = f"{add.name or add.outputs[0].name}_spx_rotary"
            rotary = ir.node(ROTARY, [x, positions, *caches[key]], {"interleaved": 0}, domain=MS_DOMAIN,
                             outputs=[ir.Value(name=name)], name=name)
            graph.insert_before(add, rotary)
            rotated, fused = add.outputs[0], rotary.outputs[0]
            fused.type, fused.shape = rotated.type, rotated.shape
            if rotated.is_graph_output():  # a port keeps its name
                rotated.name, fused.name = f"{rotated.name}_unfused", rotated.name
            rotated.replace_all_uses_with(fused, replace_graph_outputs=True)
            count += 1
        if count:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)
            record_fusions(model, {ROTARY: count})
        return PassResult(model, modified=count > 0)

    def _caches(self, graph: ir.Graph, inv_freq: np.ndarray, cos_scale: float, sin_scale: float,
                index: int) -> tuple[ir.Value, ir.Value]:
        # float32 throughout, as torch computes positions·inv_freq and its cos and sin
        freqs = np.arange(self.max_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        return (constant(graph, f"spx_cos_cache{index}", (np.cos(freqs) * np.float32(cos_scale)).astype(np.float32)),
                constant(graph, f"spx_sin_cache{index}", (np.sin(freqs) * np.float32(sin_scale)).astype(np.float32)))


def _rotation(add: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin) when `add` is x·cos + rotate_half(x)·sin, in either order of either product."""
    products = [producer(value, "Mul") for value in add.inputs]
    if None in products:
        return None
    for first, second in (products, products[::-1]):
        for x, cos in (first.inputs, first.inputs[::-1]):
            for rotated, sin in (second.inputs, second.inputs[::-1]):
                if _rotates_half(rotated, x):
                    return x, cos, sin
    return None


def _rotates_half(value: ir.Value, x: ir.Value) -> bool:
    """Whether `value` is concat(-x[..., half:], x[..., :half]) on the last axis."""
    concat = producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (-1, 3):
        return False
    neg = producer(concat.inputs[0], "Neg")
    high = producer(neg.inputs[0], "Slice") if neg is not None else None
    low = producer(concat.inputs[1], "Slice")
    return (high is not None and low is not None and high.inputs[0] is x and low.inputs[0] is x
            and _last_axis(high) and _last_axis(low) and _starts_at_zero(low))


def _last_axis(slice_node: ir.Node) -> bool:
    axes = constant_numbers(slice_node.inputs[3]) if len(slice_node.inputs) > 3 and slice_node.inputs[3] else None
    return axes is not None and axes.tolist() in ([-1], [3])


def _starts_at_zero(slice_node: ir.Node) -> bool:
    starts = constant_numbers(slice_node.inputs[1])
    return starts is not None and starts.tolist() == [0]


def _angles(value: ir.Value, trig: str) -> tuple[ir.Value, float] | None:
    """(the angles, a constant factor) when `value` is trig(angles)·factor, through casts and unsqueezes."""
    scale = 1.0
    node = value.producer()
    while node is not None and node.op_type != trig:
        if node.op_type in _PASS_THROUGH - {"Expand"}:
            node = node.inputs[0].producer()
        elif node.op_type == "Mul":
            factors = [constant_numbers(i) for i in node.inputs]
            known = [i for i, f in enumerate(factors) if f is not None and f.size == 1]
            if not known:
                return None
            scale *= float(factors[known[0]].ravel()[0])
            node = node.inputs[1 - known[0]].producer()
        else:
            return None
    return None if node is None else (node.inputs[0], scale)


def _frequencies(angles: ir.Value) -> tuple[np.ndarray, ir.Value] | None:
    """(inv_freq, the int64 positions) when `angles` is concat(f, f) with f = (inv_freq @ positions)ᵀ
    (transformers 4) or positions[..., None] · inv_freq (transformers 5)."""
    concat = producer(angles, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    transpose = producer(concat.inputs[0], "Transpose")
    matmul = producer(transpose.inputs[0], "MatMul") if transpose is not None else None
    if matmul is not None:
        inv_freq, positions = _behind(matmul.inputs[0]), _behind(matmul.inputs[1])
    else:
        product = producer(concat.inputs[0], "Mul")
        if product is None:
            return None
        positions, inv_freq = (_behind(i) for i in product.inputs)
        if constant_numbers(inv_freq) is None:
            positions, inv_freq = inv_freq, positions
        numbers = constant_numbers(inv_freq)
        if numbers is None or numbers.size != numbers.shape[-1]:  # one frequency per last-axis entry
            return None
    numbers = constant_numbers(inv_freq)
    if numbers is None or positions.dtype not in (None, ir.DataType.INT64):  # untyped: made by our own passes
        return None
    return numbers.ravel(), positions


def _behind(value: ir.Value) -> ir.Value:
    """`value` before casts, unsqueezes and expands."""
    node = value.producer()
    while node is not None and node.op_type in _PASS_THROUGH:
        value = node.inputs[0]
        node = value.producer()
    return value
