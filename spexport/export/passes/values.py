"""Small builders the passes share: constants, inputs and nodes placed where a graph needs them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir


def constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """An initializer of `graph` holding `array`."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def graph_input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: Sequence[int | str],
                position: int | None = None) -> ir.Value:
    """A new input of `graph`, last or at `position`; string axes are symbolic."""
    value = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
    graph.inputs.insert(len(graph.inputs) if position is None else position, value)
    return value


def op(op_type: str, inputs: Sequence[ir.Value], name: str, **attributes) -> ir.Node:
    """A one-output node whose output is called `name`."""
    return ir.node(op_type, list(inputs), attributes or None, outputs=[ir.Value(name=name)], name=name)


def producer(value: ir.Value, op_type: str) -> ir.Node | None:
    """The node of type `op_type` that makes `value`, if one does."""
    node = value.producer()
    return node if node is not None and node.op_type == op_type else None


def ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def integer(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def intercept(value: ir.Value, node: ir.Node, index: int) -> None:
    """Every reader of `value` reads `node`'s output instead, except `node` itself, whose input `index`
    stays `value`."""
    value.replace_all_uses_with(node.outputs[0])
    node.replace_input_with(index, value)


def constant_numbers(value: ir.Value | None) -> np.ndarray | None:
    """`value`'s numbers when it is an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = producer(value, "Constant")
    attr = node.attributes.get("value") if node is not None else None
    return None if attr is None else attr.as_tensor().numpy()
