"""Give a traced graph back an input its tracer pruned, so every decoder graph takes the same ports.

A model that reads positions off the mask (ALiBi: BLOOM) leaves `position_ids` unused and torch.onnx drops
it; it goes back in, unread."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult


class RestoreInputPass(InPlacePass):
    def __init__(self, name: str, dtype: ir.DataType, shape: Sequence[int | str], position: int):
        super().__init__()
        self.name, self.dtype, self.shape, self.position = name, dtype, list(shape), position

    def call(self, model: ir.Model) -> PassResult:
        if any(value.name == self.name for value in model.graph.inputs):
            return PassResult(model, modified=False)
        value = ir.Value(name=self.name, shape=ir.Shape(self.shape), type=ir.TensorType(self.dtype))
        model.graph.inputs.insert(self.position, value)
        return PassResult(model, modified=True)
