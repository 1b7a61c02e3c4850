"""Tiny graphs built in a few lines, for testing one pass at a time against NumPy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

H, D = 2, 3  # kv heads, head dim


def decoder_like(layers: int = 1) -> ir.Model:
    """What the frozen decoder does with the ports AddPrefixInputsPass rewires: per layer,
    present = concat(past, new) along the sequence, plus outputs that read positions, the mask and the
    whole past (its sum, and its length through Shape as a decoder reads it)."""
    inputs = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("new", TensorProto.FLOAT, ["b", H, "s", D])]
    outputs = [helper.make_tensor_value_info("positions", TensorProto.INT64, ["b", "s"]),
               helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "t"])]
    nodes = [helper.make_node("Identity", ["position_ids"], ["positions"]),
             helper.make_node("Identity", ["attention_mask"], ["mask"])]
    for layer in range(layers):
        for part in ("key", "value"):
            past, present = f"past_key_values.{layer}.{part}", f"present.{layer}.{part}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["b", H, "p", D]))
            nodes.append(helper.make_node("Concat", [past, "new"], [present], axis=2))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["b", H, "t", D]))
        nodes += [helper.make_node("ReduceSum", [f"past_key_values.{layer}.key"], [f"past_sum{layer}"], keepdims=0),
                  helper.make_node("Shape", [f"past_key_values.{layer}.value"], [f"past_len{layer}"], start=2, end=3)]
        outputs += [helper.make_tensor_value_info(f"past_sum{layer}", TensorProto.FLOAT, []),
                    helper.make_tensor_value_info(f"past_len{layer}", TensorProto.INT64, [1])]
    graph = helper.make_graph(nodes, "decoder-like", inputs, outputs)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def feeds(batch: int = 2, past: int = 1, new: int = 2, layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    found = {"position_ids": np.tile(np.arange(past, past + new), (batch, 1)),
             "attention_mask": np.ones((batch, past + new), np.int64),
             "new": rng.random((batch, H, new, D), np.float32)}
    for layer in range(layers):
        for part in ("key", "value"):
            found[f"past_key_values.{layer}.{part}"] = rng.random((batch, H, past, D), np.float32)
    return found
