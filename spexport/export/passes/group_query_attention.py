"""Attend with ONNX Runtime's GroupQueryAttention, so that a step can write its keys and values into the cache
in place.

ONNX Attention joins the past and the step's keys into a new present: every layer copies its whole cache once
per token. GroupQueryAttention takes a past of any capacity and, when the caller binds one buffer as a layer's
past and present, writes the step's slots into it and reads the rest where they lie (the in-place graph,
docs/artifact-format.md). Queries and keys stay rotated by their RotaryEmbedding kernels: the operator's own
rotation would bound the cache by the rotary tables' length, but the engine's rows hold padding slots besides
their positions (and was no faster). A Split of a packed QKV product straight into the attention goes in whole.

Slots follow from the attention mask: after a step of S tokens every row holds the mask's T slots (padding
included: the bias masks it, as before), so each row gets seqlens_k = T - 1 and query_seqlens = S. query_seqlens
is what lets a batch of prompts behind a past run in one call (ONNX Runtime 1.32 and later). The bias carries
the padding, the prefix and any sliding window unchanged.

A layer converts when its Attention reads the graph's past inputs and writes its present outputs directly (an
fp16 graph casts them, so no buffer could be shared) and its heads are a multiple of 16 wide. The pass
converts every layer or none.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spexport.export.passes.tag import record_fusions
from spexport.export.passes.values import constant, constant_numbers, integer, op, producer

GQA = "GroupQueryAttention"
MS = "com.microsoft"
HEAD_DIM_MULTIPLE = 16  # ONNX Runtime's CPU kernel refuses other head sizes


class _Plan(NamedTuple):
    """What one layer's GroupQueryAttention reads."""

    query: ir.Value  # packed QKV when key and value are None
    key: ir.Value | None
    value: ir.Value | None


class UseGroupQueryAttentionPass(InPlacePass):
    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        attentions = [node for node in graph if node.op_type == "Attention" and node.domain == ""]
        plans = [_plan(node) for node in attentions]
        if not attentions or any(plan is None for plan in plans):
            return PassResult(model, modified=False)
        seqlens, total, query_seqlens = _slot_counts(graph)
        for node, plan in zip(attentions, plans):
            attributes = {"num_heads": integer(node, "q_num_heads"), "kv_num_heads": integer(node, "kv_num_heads")}
            attributes.update({name: node.attributes[name].as_float() for name in ("scale", "softcap")
                               if name in node.attributes})
            inputs = [plan.query, plan.key, plan.value, *node.inputs[4:6], seqlens, total, None, None, None,
                      node.inputs[3], None, None, None, None, None, query_seqlens]
            attend = ir.node(GQA, inputs, attributes, domain=MS, name=node.name, num_outputs=3)
            graph.insert_before(node, attend)
            for old, new in zip(node.outputs, attend.outputs):
                old.replace_all_uses_with(new, replace_graph_outputs=True)
                new.name, new.shape, new.type = old.name, old.shape, old.type
        # the Attentions, a packed QKV's Split and its sizes (ONNX Runtime warns of an initializer nothing reads)
        RemoveUnusedNodesPass()(model)
        model.opset_imports.setdefault(MS, 1)
        record_fusions(model, {GQA: len(attentions)})
        return PassResult(model, modified=True)


def _plan(node: ir.Node) -> _Plan | None:
    """How a GroupQueryAttention stands in for the Attention `node`, or None where it cannot."""
    if len(node.inputs) != 6 or any(value is None for value in node.inputs) or len(node.outputs) != 3 or \
            integer(node, "is_causal", 0) or integer(node, "qk_matmul_output_mode", 0):
        return None
    q, k, v, _, past_key, past_value = node.inputs
    if not (past_key.is_graph_input() and past_value.is_graph_input() and
            all(output.is_graph_output() for output in node.outputs[1:])):
        return None
    head_dim = past_key.shape[3] if past_key.shape is not None and len(past_key.shape) == 4 else None
    if not isinstance(head_dim, int) or head_dim % HEAD_DIM_MULTIPLE:
        return None
    split = producer(q, "Split")
    if split is not None and list(split.outputs) == [q, k, v] and _packed(split, node) and \
            all(len(value.uses()) == 1 for value in (q, k, v)):
        return _Plan(split.inputs[0], None, None)
    return _Plan(q, k, v)


def _packed(split: ir.Node, attention: ir.Node) -> bool:
    """Whether `split` cuts the last axis into the query heads' and the two KV heads' widths, as a packed QKV
    input is read (sizes given, or three equal parts where queries and keys have as many heads)."""
    heads, kv_heads = integer(attention, "q_num_heads"), integer(attention, "kv_num_heads")
    if integer(split, "axis", 0) not in (-1, 2):
        return False
    if len(split.inputs) < 2 or split.inputs[1] is None:
        return integer(split, "num_outputs") == 3 and heads == kv_heads
    sizes = constant_numbers(split.inputs[1])
    return sizes is not None and len(sizes) == 3 and sizes[1] == sizes[2] and sizes[0] * kv_heads == sizes[1] * heads


def _slot_counts(graph: ir.Graph) -> tuple[ir.Value, ir.Value, ir.Value]:
    """seqlens_k [batch] (T - 1), total_sequence_length (T) and query_seqlens [batch] (S), int32, from the
    attention mask's width T and input_ids' S, computed once for every layer."""
    inputs = {value.name: value for value in graph.inputs}
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    int32 = ir.DataType.INT32
    width = op("Shape", [mask], "spx_gqa/mask_width", start=1, end=2)
    rows = op("Shape", [ids], "spx_gqa/rows", start=0, end=1)
    steps = op("Shape", [ids], "spx_gqa/steps", start=1, end=2)
    total = op("Cast", [width.outputs[0]], "spx_gqa/total_i32", to=int32)
    scalar = op("Squeeze", [total.outputs[0]], "spx_gqa/total_sequence_length")
    before = op("Sub", [total.outputs[0], constant(graph, "spx_gqa/one", np.array([1], np.int32))], "spx_gqa/before")
    seqlens = op("Expand", [before.outputs[0], rows.outputs[0]], "spx_gqa/seqlens_k")
    steps32 = op("Cast", [steps.outputs[0]], "spx_gqa/steps_i32", to=int32)
    query = op("Expand", [steps32.outputs[0], rows.outputs[0]], "spx_gqa/query_seqlens")
    graph.insert_before(graph.node(0), [width, rows, steps, total, scalar, before, seqlens, steps32, query])
    return seqlens.outputs[0], scalar.outputs[0], query.outputs[0]
