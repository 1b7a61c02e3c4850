"""The prefix graph: the frozen decoder over virtual-token embeddings, so tasks can be added without torch.

It is the finished main graph with its token-embedding lookup cut off: `inputs_embeds` [batch, n, hidden]
goes where `Gather(embeddings, input_ids)` went, and the outputs are the `present.*` keys and values.
Run over a task's embeddings with empty past and prefix inputs, it gives exactly the KV prefix that
`spexport convert` stores (runtime/prefix.py). Both graphs read one weights file, `model.onnx.data`
(ONNX external data), so the artifact does not grow by a second copy of the model.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from spexport.artifact.ports import INPUTS_EMBEDS, PREFIX_GRAPH
from spexport.errors import ModelError

WEIGHTS_SUFFIX = ".data"


def export_prefix_graph(folder: Path, graph: str) -> str:
    """Write PREFIX_GRAPH beside `folder/graph`, moving the main graph's weights into shared external data."""
    path = folder / graph
    model = onnx.load(path)
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=graph + WEIGHTS_SUFFIX, size_threshold=1024)
    (folder / (graph + WEIGHTS_SUFFIX)).chmod(path.stat().st_mode & 0o777)  # onnx writes it private
    model = onnx.load(path, load_external_data=False)  # the weights stay in the shared file
    nodes = model.graph.node
    lookups = [n for n in nodes if "input_ids" in n.input]
    if len(lookups) != 1 or lookups[0].op_type != "Gather" or list(lookups[0].input).index("input_ids") != 1:
        raise ModelError(f"{path}: input_ids feeds {[n.op_type for n in lookups]}, not one embedding Gather; "
                         "this model cannot have a prefix graph")
    lookup = lookups[0]
    weights = next((t for t in model.graph.initializer if t.name == lookup.input[0]), None)
    if weights is None or len(weights.dims) != 2:
        raise ModelError(f"{path}: the embedding Gather reads no [vocab, hidden] initializer")
    embedded = lookup.output[0]
    nodes.remove(lookup)
    if weights.data_type != onnx.TensorProto.FLOAT:  # fp16 weights: the graph goes on in their type
        nodes.insert(0, onnx.helper.make_node("Cast", [INPUTS_EMBEDS], [embedded], to=weights.data_type))
    else:
        for node in nodes:
            node.input[:] = [INPUTS_EMBEDS if name == embedded else name for name in node.input]
    inputs = [i for i in model.graph.input if i.name != "input_ids"]
    embeds = onnx.helper.make_tensor_value_info(INPUTS_EMBEDS, onnx.TensorProto.FLOAT,
                                                ["batch_size", "sequence_length", weights.dims[1]])
    del model.graph.input[:]
    model.graph.input.extend([embeds, *inputs])
    presents = [o for o in model.graph.output if o.name.startswith("present.")]
    del model.graph.output[:]
    model.graph.output.extend(presents)
    _drop_unused(model.graph)
    onnx.save(model, folder / PREFIX_GRAPH)
    return PREFIX_GRAPH


def _drop_unused(graph: onnx.GraphProto) -> None:
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
