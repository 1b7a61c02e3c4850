"""The core graph: the finished main graph without its prefix wiring, for the Python runtime.

The Python runtime joins a row's prefix once, as the first step's past (runtime/decoder.py), so the
main graph's prefix inputs are empty there; yet every step still pays for the wiring: per layer a
Concat(empty prefix, past) and a Slice of the present, each a copy of the cache (16% of a decode
step at batch 8 on SmolLM2). The core graph is the main graph with AddPrefixInputsPass undone: the
caller's mask, positions and past go straight in, and `present.*` is the whole cache. It reads the
main graph's weights file, so the artifact grows by a few kilobytes; C++, C#, Node and
onnxruntime-genai clients keep using the main graph and its contract.

Only a graph whose prefix joins are AddPrefixInputsPass's own (export/decoder/direct.py's; a traced
graph has them merged into its own past concat) gets one.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from spexport.artifact.ports import (
    CORE_GRAPH,
    KV_PREFIX,
    LOGITS_POSITIONS,
    PAST_KEY,
    PAST_VALUE,
    PREFIX_MASK,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from spexport.export.decoder.prefix_graph import drop_unused

JOINED = "spx_{}"  # AddPrefixInputsPass's names: the wired value of an input or output port
HEADS = ("MatMul", "MatMulNBits", "Gemm")  # the LM head's product (float, quantized)
AFTER_HEAD = ("Add", "Cast", "Div", "Tanh", "Mul")  # what may follow it before `logits`, position by position: a bias,
# fp16's cast back, a final soft cap (Gemma 2: tanh(logits / cap) * cap)


def export_core_graph(folder: Path, graph: str, num_layers: int) -> str | None:
    """Write CORE_GRAPH beside `folder/graph` (which keeps its weights in external data); None when the
    graph's prefix joins are not AddPrefixInputsPass's own.

    The core graph also takes `logits_positions` [batch, K]: the positions whose logits it computes
    (`logits` is [batch, K, vocab]). Generation asks for the last one only, so a prompt does not pay
    for the LM head at every position (21% of SmolLM2's multiply-adds)."""
    model = onnx.load(folder / graph, load_external_data=False)
    nodes = {output: node for node in model.graph.node for output in node.output}
    pasts = [name.format(i) for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]
    presents = [name.format(i) for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    wired = {name: JOINED.format(name) for name in ["position_ids", "attention_mask", *pasts]}
    if not all(value in nodes for value in wired.values()) or \
            not all(name in nodes and nodes[name].op_type == "Slice" for name in presents):
        return None
    # readers of a wired input read the caller's own (the wiring goes unused), and each present is the
    # frozen model's whole one, which its Slice read
    ports = {joined: port for port, joined in wired.items()}
    wholes = {nodes[name].input[0]: name for name in presents}
    for name in presents:
        model.graph.node.remove(nodes[name])
    for node in model.graph.node:
        if not (node.output and node.output[0] in ports):
            node.input[:] = [ports.get(name, wholes.get(name, name)) for name in node.input]
        node.output[:] = [wholes.get(name, name) for name in node.output]
    inputs = [value for value in model.graph.input if value.name not in (KV_PREFIX, PREFIX_MASK)]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    _head_at_positions(model.graph)
    drop_unused(model.graph)
    del model.graph.value_info[:]  # optional; some named values it describes are gone or renamed
    onnx.save(model, folder / CORE_GRAPH)
    return CORE_GRAPH


def _head_at_positions(graph: onnx.GraphProto) -> None:
    """Gather the hidden states at `logits_positions` before the LM head's product (a head spexport does
    not recognise is left as it is: the graph then computes every position's logits, as the main one)."""
    producers = {output: node for node in graph.node for output in node.output}
    node = producers["logits"]
    while node.op_type in AFTER_HEAD:
        node = producers[node.input[0]]
    if node.op_type not in HEADS:
        return
    hidden, picked = node.input[0], "spx_hidden_at_logits_positions"
    axis = onnx.helper.make_tensor("spx_last_axis", onnx.TensorProto.INT64, [1], [-1])
    graph.initializer.append(axis)
    index = onnx.helper.make_node("Unsqueeze", [LOGITS_POSITIONS, axis.name], ["spx_logits_index"],
                                  name="spx_logits_index")
    gather = onnx.helper.make_node("GatherND", [hidden, "spx_logits_index"], [picked], name=picked, batch_dims=1)
    at = list(graph.node).index(node)
    graph.node.insert(at, gather)
    graph.node.insert(at, index)
    node.input[0] = picked
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_POSITIONS, onnx.TensorProto.INT64,
                                                          ["batch_size", "logits_length"]))
    logits = next(value for value in graph.output if value.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "logits_length"
