"""One decoder graph from two: a decoder without past and one with past, under an If node.

The first decoder step runs without a cache (it computes the cross-attention keys and values), later
steps with one. Both graphs are traced from the same model, so their weights are equal; each is
stored once, in the outer graph, whatever name the tracer gave it in either graph. This is the layout
of optimum-onnx's `decoder_model_merged.onnx`, which spexport used before it traced these itself.
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import TensorProto, helper, numpy_helper


def merge_decoders(no_past: onnx.ModelProto, with_past: onnx.ModelProto, condition: str,
                   pass_through: dict[str, str]) -> onnx.ModelProto:
    """A model running `with_past` where its bool input `condition` [1] is true, else `no_past`.

    Its inputs are both graphs' inputs and `condition`; its outputs are `no_past`'s. pass_through
    names, for each output that `with_past` lacks, the input of `with_past` to return unchanged in
    its place (the cross-attention cache, which later steps do not recompute).
    """
    shared: dict[tuple, onnx.TensorProto] = {}
    branches = {}
    for tag, model in (("no_past", no_past), ("with_past", with_past)):
        kept, renamed = [], {}
        for weight in model.graph.initializer:
            if _small(weight):  # beside their readers, where ONNX Runtime folds constants
                kept.append(weight)
                continue
            content = _content(weight)
            if content not in shared:
                shared[content] = _renamed(weight, shared.values(), tag)
            renamed[weight.name] = shared[content].name
        nodes = []
        for node in model.graph.node:
            node = _copy(node)
            node.input[:] = [renamed.get(name, name) for name in node.input]
            nodes.append(node)
        branches[tag] = (nodes, kept)

    nodes, kept = branches["no_past"]
    else_branch = helper.make_graph(nodes, "no_past", [], list(no_past.graph.output), kept)
    nodes, kept = branches["with_past"]
    produced = {output.name: output for output in with_past.graph.output}
    outputs = []
    for output in no_past.graph.output:
        if output.name not in produced:
            nodes.append(helper.make_node("Identity", [pass_through[output.name]], [output.name]))
        outputs.append(produced.get(output.name, output))
    then_branch = helper.make_graph(nodes, "with_past", [], outputs, kept)
    choose = helper.make_node("If", [condition], [output.name for output in no_past.graph.output],
                              name="spx_use_cache_branch", then_branch=then_branch, else_branch=else_branch)
    known = {value.name for value in no_past.graph.input}
    inputs = [*no_past.graph.input, *(value for value in with_past.graph.input if value.name not in known),
              helper.make_tensor_value_info(condition, TensorProto.BOOL, [1])]
    graph = helper.make_graph([choose], "merged", inputs,
                              [_either(output, produced.get(output.name)) for output in no_past.graph.output],
                              list(shared.values()))
    return helper.make_model(graph, opset_imports=list(no_past.opset_import), ir_version=no_past.ir_version)


def _small(weight: onnx.TensorProto) -> bool:
    """A scalar or a 1-D integer tensor (a shape, an axis): a constant, not a weight."""
    return len(weight.dims) == 0 or (len(weight.dims) == 1 and weight.data_type in (TensorProto.INT32,
                                                                                    TensorProto.INT64))


def _content(weight: onnx.TensorProto) -> tuple:
    data = numpy_helper.to_array(weight)
    return weight.data_type, tuple(weight.dims), hashlib.sha256(data.tobytes()).hexdigest()


def _renamed(weight: onnx.TensorProto, stored, tag: str) -> onnx.TensorProto:
    """A copy of `weight` for the outer graph, renamed if another stored weight has its name."""
    copy = onnx.TensorProto()
    copy.CopyFrom(weight)
    if weight.name in {other.name for other in stored}:
        copy.name = f"{weight.name}.{tag}"
    return copy


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _either(output: onnx.ValueInfoProto, other: onnx.ValueInfoProto | None) -> onnx.ValueInfoProto:
    """The If node's output type: `output`'s, with each axis the branches size differently left unnamed."""
    merged = onnx.ValueInfoProto()
    merged.CopyFrom(output)
    if other is not None:
        for dim, theirs in zip(merged.type.tensor_type.shape.dim, other.type.tensor_type.shape.dim):
            if dim != theirs:
                dim.Clear()
    return merged
