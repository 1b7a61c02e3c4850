"""The prefix graph: the frozen decoder over virtual-token embeddings, so tasks can be added without torch.

It is the finished main graph with its token-embedding lookup cut off: `inputs_embeds` [batch, n, hidden]
goes where `Gather(embeddings, input_ids)` went, and the outputs are the `present.*` keys and values.
Run over a task's embeddings with empty past and prefix inputs, it gives exactly the KV prefix that
`spexport convert` stores (runtime/prefix.py). Both graphs read one weights file, `model.onnx.data`
(ONNX external data), so the artifact does not grow by a second copy of the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from spexport.artifact.files import WEIGHTS_SUFFIX
from spexport.artifact.ports import INPUTS_EMBEDS, PREFIX_GRAPH

RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast")  # keep each id where it was


def export_prefix_graph(folder: Path, graph: str) -> str | None:
    """Write PREFIX_GRAPH beside `folder/graph`, moving the main graph's weights into shared external data."""
    path = folder / graph
    if not (folder / (graph + WEIGHTS_SUFFIX)).is_file():  # build.py writes its weights there; int8 is inline
        model = onnx.load(path)
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=graph + WEIGHTS_SUFFIX, size_threshold=1024)
        (folder / (graph + WEIGHTS_SUFFIX)).chmod(path.stat().st_mode & 0o777)  # onnx writes it private
    model = onnx.load(path, load_external_data=False)  # the weights stay in the shared file
    nodes = model.graph.node
    lookup, hidden, dtype = _embedding_lookup(model.graph)
    if lookup is None:  # the artifact serves as ever; `spexport add` then refuses tasks that hold embeddings
        warnings.warn(f"{path}: no Gather of a [vocab, hidden] initializer by input_ids, so the artifact gets no "
                      "prefix graph", stacklevel=2)
        return None
    embedded = lookup.output[0]
    nodes.remove(lookup)
    if dtype != onnx.TensorProto.FLOAT:  # fp16 weights: the graph goes on in their type
        nodes.insert(0, onnx.helper.make_node("Cast", [INPUTS_EMBEDS], [embedded], to=dtype))
    else:
        for node in nodes:
            node.input[:] = [INPUTS_EMBEDS if name == embedded else name for name in node.input]
    inputs = list(model.graph.input)
    embeds = onnx.helper.make_tensor_value_info(INPUTS_EMBEDS, onnx.TensorProto.FLOAT,
                                                ["batch_size", "sequence_length", hidden])
    del model.graph.input[:]
    model.graph.input.extend([embeds, *inputs])
    presents = [o for o in model.graph.output if o.name.startswith("present.")]
    del model.graph.output[:]
    model.graph.output.extend(presents)
    drop_unused(model.graph)
    if not any("input_ids" in node.input for node in nodes):  # GPT-2's unfused graph still reads its shape
        model.graph.input.remove(next(i for i in model.graph.input if i.name == "input_ids"))
    onnx.save(model, folder / PREFIX_GRAPH)
    return PREFIX_GRAPH


def _embedding_lookup(graph: onnx.GraphProto):
    """The lookup of the token embeddings by `input_ids` (perhaps reshaped first), the hidden size and the
    embeddings' type: a Gather of a [vocab, hidden] initializer, or (--quantize) the GatherBlockQuantized
    that reads the head's codes, whose scales are [vocab, hidden / block_size]."""
    initializers = {t.name: t for t in graph.initializer}
    derived, found = {"input_ids"}, []
    for node in graph.node:
        if node.op_type in RESHAPES and node.input and node.input[0] in derived:
            derived.update(node.output)
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in derived:
            table = initializers.get(node.input[0])
            if table is not None and len(table.dims) == 2:
                found.append((node, table.dims[1], table.data_type))
        elif node.op_type == "GatherBlockQuantized" and node.input[1] in derived:
            scales = initializers.get(node.input[2])
            block = next(a.i for a in node.attribute if a.name == "block_size")
            if scales is not None and len(scales.dims) == 2:
                found.append((node, scales.dims[1] * block, onnx.TensorProto.FLOAT))
    return found[0] if len(found) == 1 else (None, None, None)


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove the nodes no output needs (the LM head: the logits are not an output) and the initializers
    only they read, so a session of the prefix graph loads less of the shared weights."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # ONNX nodes are in topological order
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # names a subgraph reads from the outer scope
                for sub in [attr.g, *attr.graphs]:
                    needed.update(name for n in sub.node for name in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
