"""One decoder graph from two: a decoder without past and one with past, under an If node.

The first decoder step runs without a cache (it computes the cross-attention keys and values), later
steps with one. Both graphs are traced from the same model, so their weights are equal; each is
stored once, in the outer graph, whatever name the tracer gave it in either graph. This is the layout
of optimum-onnx's `decoder_model_merged.onnx`, which spexport used before it traced these itself.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir


def merge_decoders(no_past: ir.Model, with_past: ir.Model, condition: str,
                   pass_through: dict[str, str]) -> ir.Model:
    """A model running `with_past` where its bool input `condition` [1] is true, else `no_past`.

    Its inputs are both graphs' inputs and `condition`; its outputs are `no_past`'s. pass_through
    names, for each output that `with_past` lacks, the input of `with_past` to return unchanged in
    its place (the cross-attention cache, which later steps do not recompute). The two graphs become
    the If node's branches: both models are taken apart.
    """
    inputs: dict[str, ir.Value] = {}
    shared: dict[tuple, ir.Value] = {}
    for tag, branch in (("no_past", no_past.graph), ("with_past", with_past.graph)):
        for value in branch.inputs:  # read from the outer graph
            if value.name not in inputs:
                inputs[value.name] = ir.Value(name=value.name, type=value.type, shape=_copy(value.shape))
            value.replace_all_uses_with(inputs[value.name])
        branch.inputs.clear()
        _share_weights(branch, shared, tag)
        branch.name = tag

    produced = {value.name: value for value in with_past.graph.outputs}
    returned = []
    for value in no_past.graph.outputs:
        if value.name in produced:
            returned.append(produced[value.name])
        else:
            passed = ir.Value(name=value.name, type=value.type, shape=_copy(value.shape))
            with_past.graph.append(ir.Node("", "Identity", [inputs[pass_through[value.name]]], outputs=[passed],
                                           name=""))
            returned.append(passed)
    with_past.graph.outputs.clear()
    with_past.graph.outputs.extend(returned)
    use_cache = inputs[condition] = ir.Value(name=condition, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([1]))
    results = [ir.Value(name=value.name, type=value.type, shape=_either(value.shape, produced.get(value.name)))
               for value in no_past.graph.outputs]
    choose = ir.Node("", "If", [use_cache], name="spx_use_cache_branch", outputs=results,
                     attributes=[ir.AttrGraph("else_branch", no_past.graph),
                                 ir.AttrGraph("then_branch", with_past.graph)])
    graph = ir.Graph(list(inputs.values()), results, nodes=[choose], initializers=list(shared.values()),
                     opset_imports=dict(no_past.opset_imports), name="merged")
    return ir.Model(graph, ir_version=no_past.ir_version)


def _share_weights(branch: ir.Graph, shared: dict[tuple, ir.Value], tag: str) -> None:
    """Moves `branch`'s weights to `shared` (by content), the first of equal ones kept and renamed if
    another stored weight has its name; the others' readers read it. Small constants stay in the branch,
    beside their readers, where ONNX Runtime folds them."""
    for value in list(branch.initializers.values()):
        weight = value.const_value
        if weight is None or _small(weight):
            continue
        del branch.initializers[value.name]
        content = weight.dtype, tuple(weight.shape), hashlib.sha256(weight.tobytes()).hexdigest()
        if content in shared:
            value.replace_all_uses_with(shared[content])
            continue
        if value.name in {other.name for other in shared.values()}:
            value.name = f"{value.name}.{tag}"
        shared[content] = value


def _small(weight: ir.TensorProtocol) -> bool:
    """A scalar or a 1-D integer tensor (a shape, an axis): a constant, not a weight."""
    return len(weight.shape) == 0 or (len(weight.shape) == 1 and weight.dtype in (ir.DataType.INT32,
                                                                                  ir.DataType.INT64))


def _copy(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None else shape.copy()


def _either(shape: ir.Shape | None, other: ir.Value | None) -> ir.Shape | None:
    """The If node's output shape: `shape`, with each axis the branches size differently left unnamed."""
    if shape is None or other is None or other.shape is None:
        return _copy(shape)
    dims = list(shape)
    for axis, theirs in enumerate(list(other.shape)[:len(dims)]):
        if dims[axis] != theirs:
            dims[axis] = None
    return ir.Shape(dims)
