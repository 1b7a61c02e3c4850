"""Bake the prompt bank into a prefixed decoder graph: every task's KV prefix becomes a constant, and a
`task_ids` [batch] input picks each row's, so a client needs no bank file and sends one id per row."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.artifact.ports import KV_PREFIX, PREFIX_MASK, TASK_IDS
from spexport.export.passes.values import constant, graph_input, op

BANK_CONSTANTS = ("spx_kv_bank", "spx_bank_mask")  # the bank's initializers (float32 in every graph)


class BakePromptBankPass(InPlacePass):
    """`kv_bank` [tasks, layers, 2, kv_heads, n, head_dim] and `mask_bank` [tasks, n] replace the graph's
    kv_prefix and prefix_mask inputs (AddPrefixInputsPass's)."""

    def __init__(self, kv_bank: np.ndarray, mask_bank: np.ndarray):
        super().__init__()
        self.kv_bank, self.mask_bank = kv_bank, mask_bank

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        task_ids = graph_input(graph, TASK_IDS, ir.DataType.INT64, ["batch_size"])
        picks = []
        for port, bank, name in [(KV_PREFIX, self.kv_bank, BANK_CONSTANTS[0]),
                                 (PREFIX_MASK, self.mask_bank, BANK_CONSTANTS[1])]:
            prefix = next(value for value in graph.inputs if value.name == port)
            graph.inputs.remove(prefix)
            prefix.name = f"spx_unbaked_{port}"
            pick = op("Gather", [constant(graph, name, bank), task_ids], port, axis=0)
            prefix.replace_all_uses_with(pick.outputs[0])
            picks.append(pick)
        graph.insert_before(graph[0], picks)
        return PassResult(model, modified=True)
