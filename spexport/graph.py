"""Wrap a decoder-with-past graph so that callers never see the virtual tokens.

The frozen model is exported once by optimum-onnx. This module adds two inputs, `kv_prefix`
[batch, layers, 2, kv_heads, n_prefix, head_dim] and `prefix_mask` [batch, n_prefix], and rewires
the graph so that, inside it:
  past     = concat(prefix, caller's past)       per layer, along the sequence axis
  mask     = concat(prefix_mask, caller's mask)
  position = caller's position + the row's number of virtual tokens
  present  = everything after the prefix           (the caller's tokens only)
Rows with fewer virtual tokens than the batch's longest are left-padded with masked slots, so
tasks of different lengths share one batch and each row sees exactly its own prefix.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spexport.manifest import KV_PREFIX, PAST_KEY, PAST_VALUE, PREFIX_MASK, PRESENT_KEY, PRESENT_VALUE, TASK_IDS


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
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    if model.ByteSize() < 2_000_000_000:  # protobuf cannot serialise more for the checker
        onnx.checker.check_model(model)
    return model
