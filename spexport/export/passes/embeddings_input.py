"""Make a decoder graph start from embeddings: the prefix graph, which turns a task's virtual-token embeddings
into its KV prefix without torch (runtime/prefix.py, `spexport add`).

`inputs_embeds` [batch, n, hidden] goes where the token-embedding lookup `Gather(embeddings, input_ids)` went,
and the outputs are the `present.*` keys and values only; nodes and weights that no output needs (the LM head)
go, so a session of it loads less of the weights file it shares with the other graphs.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from spexport.artifact.ports import INPUTS_EMBEDS
from spexport.errors import ModelError
from spexport.export.passes.values import graph_input, integer, op

RESHAPES = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast")  # keep each id where it was


class TakeEmbeddingsInputPass(InPlacePass):
    def requires(self, model: ir.Model) -> None:
        if embedding_lookup(model.graph) is None:
            raise ModelError("no Gather of a [vocab, hidden] initializer by input_ids (no token lookup to start from "
                             "embeddings instead)")

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        lookup, hidden, dtype = embedding_lookup(graph)
        embeds = graph_input(graph, INPUTS_EMBEDS, ir.DataType.FLOAT, ["batch_size", "sequence_length", hidden], 0)
        looked_up = lookup.outputs[0]
        if dtype != ir.DataType.FLOAT:  # fp16 weights: the graph goes on in their type
            cast = op("Cast", [embeds], "spx_inputs_embeds_cast", to=dtype)
            graph.insert_before(lookup, cast)
            looked_up.replace_all_uses_with(cast.outputs[0])
        else:
            looked_up.replace_all_uses_with(embeds)
        presents = [value for value in graph.outputs if value.name.startswith("present.")]
        graph.outputs.clear()
        graph.outputs.extend(presents)
        RemoveUnusedNodesPass()(model)
        ids = next(value for value in graph.inputs if value.name == "input_ids")
        if not ids.uses():  # GPT-2's unfused graph still reads its shape
            graph.inputs.remove(ids)
        return PassResult(model, modified=True)


def embedding_lookup(graph: ir.Graph) -> tuple[ir.Node, int, ir.DataType] | None:
    """The lookup of the token embeddings by `input_ids` (perhaps reshaped first), the hidden size and the
    embeddings' type: a Gather of a [vocab, hidden] initializer, or (--quantize) the GatherBlockQuantized that
    reads the head's codes, whose scales are [vocab, hidden / block_size]. None unless there is exactly one."""
    ids = next((value for value in graph.inputs if value.name == "input_ids"), None)
    derived, found = {ids}, []
    for node in graph:
        if node.op_type in RESHAPES and node.inputs and node.inputs[0] in derived:
            derived.update(node.outputs)
        elif node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] in derived:
            table = node.inputs[0].const_value if node.inputs[0] is not None else None
            if table is not None and len(table.shape) == 2:
                found.append((node, table.shape[1], table.dtype))
        elif node.op_type == "GatherBlockQuantized" and node.inputs[1] in derived:
            scales = node.inputs[2].const_value
            if scales is not None and len(scales.shape) == 2:
                found.append((node, scales.shape[1] * integer(node, "block_size"), ir.DataType.FLOAT))
    return found[0] if ids is not None and len(found) == 1 else None
