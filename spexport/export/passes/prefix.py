"""Wrap a decoder-with-past graph so that callers never see the virtual tokens.

The frozen model is exported once by optimum-onnx. This module adds two inputs, `kv_prefix`
[batch, layers, 2, kv_heads, n_prefix, head_dim] and `prefix_mask` [batch, n_prefix], and rewires
the graph so that, inside it:
  past     = concat(prefix, caller's past)       per layer, along the sequence axis
  mask     = concat(prefix_mask, caller's mask)
  position = caller's position + the row's number of virtual tokens
  present  = everything after the prefix           (the caller's tokens only)
Where the frozen model only appends the new token's key/value to the past (Concat) and reads the
past's shape, the prefix joins that same Concat, so no step copies the whole past an extra time.
Rows with fewer virtual tokens than the batch's longest are left-padded with masked slots, so
tasks of different lengths share one batch and each row sees exactly its own prefix.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spexport.artifact.ports import KV_PREFIX, PAST_KEY, PAST_VALUE, PREFIX_MASK, PRESENT_KEY, PRESENT_VALUE, TASK_IDS


def _const(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    _rename_uses(graph, old, new)


def add_prefix_inputs(model: onnx.ModelProto, num_layers: int, kv_heads: int, head_dim: int,
                      bank: tuple[np.ndarray, np.ndarray] | None = None) -> onnx.ModelProto:
    """Return `model` rewired to take a KV prefix; see the module docstring.

    bank: (kv [tasks, layers, 2, kv_heads, n, head_dim], mask [tasks, n]) to bake into the graph as
    constants; the graph then takes `task_ids` [batch] instead of `kv_prefix` and `prefix_mask`.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    if "position_ids" not in inputs:
        raise ValueError("the decoder graph has no position_ids input; spexport needs it to offset positions")
    head, tail = [], []  # nodes run before the frozen model's, and after
    if bank is None:
        graph.input.extend([
            helper.make_tensor_value_info(KV_PREFIX, TensorProto.FLOAT,
                                          ["batch_size", num_layers, 2, kv_heads, "prefix_length", head_dim]),
            helper.make_tensor_value_info(PREFIX_MASK, TensorProto.INT64, ["batch_size", "prefix_length"]),
        ])
    else:
        graph.input.append(helper.make_tensor_value_info(TASK_IDS, TensorProto.INT64, ["batch_size"]))
        head += [
            helper.make_node("Gather", [_const(graph, "spx_kv_bank", bank[0]), TASK_IDS], [KV_PREFIX], axis=0),
            helper.make_node("Gather", [_const(graph, "spx_bank_mask", bank[1]), TASK_IDS], [PREFIX_MASK], axis=0),
        ]
    # The caller's tokens come after the row's own virtual tokens.
    _rename_uses(graph, "position_ids", "spx_position_ids")
    _rename_uses(graph, "attention_mask", "spx_attention_mask")
    head += [
        helper.make_node("ReduceSum", [PREFIX_MASK, _const(graph, "spx_axis1", np.array([1], np.int64))],
                         ["spx_n_virtual"], keepdims=1),
        helper.make_node("Add", ["position_ids", "spx_n_virtual"], ["spx_position_ids"]),
        helper.make_node("Concat", [PREFIX_MASK, "attention_mask"], ["spx_attention_mask"], axis=1),
        helper.make_node("Shape", [KV_PREFIX], ["spx_prefix_len"], start=4, end=5),
    ]
    max_end = _const(graph, "spx_max", np.array([np.iinfo(np.int64).max], np.int64))
    axis2 = _const(graph, "spx_axis2", np.array([2], np.int64))
    for layer in range(num_layers):
        layer_idx = _const(graph, f"spx_layer{layer}", np.array(layer, np.int64))
        head.append(helper.make_node("Gather", [KV_PREFIX, layer_idx], [f"spx_kv{layer}"], axis=1))
        for which, (past, present) in enumerate([(PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)]):
            past, present = past.format(layer), present.format(layer)
            if past not in inputs:
                raise ValueError(f"the decoder graph has no input {past}")
            which_idx = _const(graph, f"spx_which{layer}_{which}", np.array(which, np.int64))
            _rename_uses(graph, past, f"spx_{past}")
            _rename_output(graph, present, f"spx_{present}")
            head += [
                helper.make_node("Gather", [f"spx_kv{layer}", which_idx], [f"spx_prefix_{past}"], axis=1),
                helper.make_node("Concat", [f"spx_prefix_{past}", past], [f"spx_{past}"], axis=2),
            ]
            tail.append(helper.make_node("Slice", [f"spx_{present}", "spx_prefix_len", max_end, axis2], [present]))
    nodes = _merge_prefix_concats(head, list(graph.node) + tail, graph)
    del graph.node[:]
    graph.node.extend(nodes)
    if model.ByteSize() < 2_000_000_000:  # protobuf cannot serialise more for the checker
        onnx.checker.check_model(model)
    return model


def _merge_prefix_concats(head: list[onnx.NodeProto], body: list[onnx.NodeProto], graph: onnx.GraphProto
                          ) -> list[onnx.NodeProto]:
    """`head + body`, less each `spx_past = Concat(prefix, past)` whose readers can do without it.

    The frozen model reads a layer's past in a Concat along the sequence axis (past, new token) and,
    for one layer, in a Shape (the past's length). That Concat takes the prefix as one more input, and
    the Shape becomes the caller's past's shape plus the prefix length; the whole past is then copied
    once per step, as in the frozen model. A past with any other reader keeps its Concat.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in body:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kept, replaced = [], {}
    for node in head:
        uses = readers.get(node.output[0], []) if node.op_type == "Concat" else []
        if not (uses and node.output[0].startswith("spx_past_key_values.")
                and all(_mergeable(use, node.output[0]) for use in uses)):
            kept.append(node)
            continue
        prefix, past = node.input
        for use in uses:
            if use.op_type == "Concat":
                rest = use.input[1:]
                del use.input[:]
                use.input.extend([prefix, past, *rest])
            else:
                replaced[id(use)] = _shape_plus_prefix(use, past, graph)
    if replaced:  # [0, 0, prefix length, 0], added to a caller's past's shape
        kept.append(helper.make_node("Concat", [_const(graph, "spx_zeros2", np.zeros(2, np.int64)), "spx_prefix_len",
                                                _const(graph, "spx_zeros1", np.zeros(1, np.int64))],
                                     ["spx_shape_offset"], axis=0))
    return kept + [new for node in body for new in replaced.get(id(node), [node])]


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _mergeable(use: onnx.NodeProto, past_all: str) -> bool:
    """A reader of `past_all` (prefix + caller's past) that can take the two apart."""
    if use.op_type == "Shape":
        return True
    # the 4-D [batch, heads, sequence, head_dim] past, first, appended to along the sequence axis
    return use.op_type == "Concat" and _attributes(use).get("axis") in (2, -2) and use.input[0] == past_all \
        and past_all not in use.input[1:]


def _shape_plus_prefix(shape: onnx.NodeProto, past: str, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes giving what `shape` gave for concat(prefix, past), without that concat."""
    out = shape.output[0]
    attrs = _attributes(shape)
    full = f"spx_full_{out}" if attrs else out
    nodes = [helper.make_node("Shape", [past], [f"spx_own_{out}"]),
              helper.make_node("Add", [f"spx_own_{out}", "spx_shape_offset"], [full])]
    if attrs:  # Shape's start/end clamp as Slice's do
        bounds = [_const(graph, f"{full}_{k}", np.array([attrs.get(k, d)], np.int64))
                  for k, d in (("start", 0), ("end", np.iinfo(np.int64).max))]
        nodes.append(helper.make_node("Slice", [full, *bounds], [out]))
    return nodes
