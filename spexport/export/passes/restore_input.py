"""Give a traced graph back an input its tracer pruned, so every decoder graph takes the same ports.

A model that reads positions off the mask (ALiBi: BLOOM) leaves `position_ids` unused and torch.onnx drops
it; it goes back in, unread."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.export.passes.values import graph_input


class RestoreInputPass(InPlacePass):
    def __init__(self, name: str, dtype: ir.DataType, shape: Sequence[int | str], position: int):
        super().__init__()
        self.name, self.dtype, self.shape, self.position = name, dtype, list(shape), position

    def call(self, model: ir.Model) -> PassResult:
        if any(value.name == self.name for value in model.graph.inputs):
            return PassResult(model, modified=False)
        graph_input(model.graph, self.name, self.dtype, self.shape, self.position)
        return PassResult(model, modified=True)
