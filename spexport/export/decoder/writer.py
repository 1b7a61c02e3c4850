"""What every directly written decoder graph shares: its ports, its weights and the attention bias.

The ports are graph.py's (the decoder-with-past contract that the prefix passes, the runtime and every
client read). The caller's mask (prefix slots and left padding included), causality and any sliding
window become one additive bias per window, shared by the layers, so padded rows and rows of different
prefix lengths compute what the model computes. Weights are added as the loaded model's own arrays
(views where possible) and reach the file one tensor at a time.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.artifact.ports import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

MS = "com.microsoft"
OPSET = 23  # ONNX Attention with grouped KV heads and a past, RMSNormalization (ONNX Runtime 1.23+)
IR_VERSION = 10
FLOAT = ir.DataType.FLOAT
ROWS, STEPS, TOTAL = "batch_size", "sequence_length", "past_sequence_length + sequence_length"


def array(tensor) -> np.ndarray:
    """A torch tensor's data as a numpy array (no copy)."""
    return tensor.detach().numpy()


def _contiguous(values: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(values).contiguous().numpy()


class GraphWriter:
    """Nodes and initializers of one decoder graph, and its ports."""

    def __init__(self, model, info: ModelInfo):
        self.model, self.info = model, info
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        int64 = ir.TensorType(ir.DataType.INT64)
        self.ids = ir.Value(name="input_ids", shape=ir.Shape([ROWS, STEPS]), type=int64)
        self.mask = ir.Value(name="attention_mask", shape=ir.Shape([ROWS, TOTAL]), type=int64)
        self.positions = ir.Value(name="position_ids", shape=ir.Shape([ROWS, STEPS]), type=int64)
        kv_shape = ir.Shape([ROWS, info.num_kv_heads, "past_sequence_length", info.head_dim])
        self.pasts = [ir.Value(name=name.format(i), shape=kv_shape, type=ir.TensorType(FLOAT))
                      for i in range(info.num_layers) for name in (PAST_KEY, PAST_VALUE)]
        self.presents: list[ir.Value] = []

    def weight(self, name: str, values: np.ndarray) -> ir.Value:
        """An initializer holding `values`. A view that is not C-contiguous (a transposed weight) is made
        contiguous only as it is written, one tensor at a time, by torch's blocked copy: numpy writes a
        strided array one element per call and transposes without blocking (each minutes for a 1B model),
        and copying every one up front would double the memory."""
        dtype, shape = ir.DataType.from_numpy(values.dtype), ir.Shape(values.shape)
        tensor = ir.Tensor(values, name=name) if values.flags.c_contiguous else \
            ir.LazyTensor(lambda: ir.Tensor(_contiguous(values)), dtype=dtype, shape=shape, name=name)
        value = ir.Value(name=name, shape=shape, type=ir.TensorType(dtype), const_value=tensor)
        self.initializers[name] = value
        return value

    def ints(self, name: str, values: list[int]) -> ir.Value:
        return self.initializers.get(name) or self.weight(name, np.array(values, np.int64))

    def scalar(self, name: str, value: float) -> ir.Value:
        return self.initializers.get(name) or self.weight(name, np.array(value, np.float32))

    def node(self, op_type: str, inputs, name: str, outputs: int = 1, domain: str = "", **attributes):
        node = ir.node(op_type, list(inputs), attributes or None, domain=domain, name=name,
                       outputs=[ir.Value(name=f"{name}/output_{i}" if i else name) for i in range(outputs)])
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def past(self, layer: int) -> list[ir.Value]:
        return self.pasts[2 * layer:2 * layer + 2]

    def present(self, layer: int, key: ir.Value, value: ir.Value) -> None:
        """Name layer `layer`'s whole key and value cache as the graph's present outputs."""
        for tensor, port in ((key, PRESENT_KEY), (value, PRESENT_VALUE)):
            tensor.name, tensor.type = port.format(layer), ir.TensorType(FLOAT)
            tensor.shape = ir.Shape([ROWS, self.info.num_kv_heads, TOTAL, self.info.head_dim])
            self.presents.append(tensor)

    def model_of(self, logits: ir.Value) -> ir.Model:
        logits.name, logits.type = "logits", ir.TensorType(FLOAT)
        logits.shape = ir.Shape([ROWS, STEPS, self.info.vocab_size])
        graph = ir.Graph([self.ids, self.mask, self.positions, *self.pasts], [logits, *self.presents],
                         nodes=self.nodes, initializers=list(self.initializers.values()),
                         opset_imports={"": OPSET, MS: 1}, name="spexport_decoder")
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="spexport")

    def attention_biases(self, windows: list[int | None]) -> dict[int | None, ir.Value]:
        """Per sliding window of `windows` (None: full attention), [batch, 1, seq, past + seq]: 0 where query
        i (of seq) may see key j (of past + seq) — the mask holds j, j <= past + i, and past + i - j < window,
        counted in slots as the model counts them — else float32's lowest."""
        total = self.node("Squeeze", [self.node("Shape", [self.mask], "spx_bias/total", start=1, end=2)],
                          "spx_bias/T")
        steps = self.node("Squeeze", [self.node("Shape", [self.ids], "spx_bias/steps", start=1, end=2)], "spx_bias/S")
        zero = self.weight("spx_zero_i64", np.array(0, np.int64))
        one = self.weight("spx_one_i64", np.array(1, np.int64))
        keys = self.node("Range", [zero, total, one], "spx_bias/keys")
        first = self.node("Sub", [total, steps], "spx_bias/first_query")
        queries = self.node("Unsqueeze", [self.node("Range", [first, total, one], "spx_bias/queries"),
                                          self.ints("spx_axis_1", [1])], "spx_bias/queries_column")
        causal = self.node("LessOrEqual", [keys, queries], "spx_bias/causal")  # [seq, total]
        held = self.node("Unsqueeze", [self.node("Cast", [self.mask], "spx_bias/held", to=ir.DataType.BOOL),
                                       self.ints("spx_axes_1_2", [1, 2])], "spx_bias/held_4d")  # [batch, 1, 1, total]
        zero_f, lowest = self.scalar("spx_zero_f32", 0.0), self.scalar("spx_lowest_f32", np.finfo(np.float32).min)
        biases = {}
        for window in dict.fromkeys(windows):
            seen, name = causal, "spx_attention_bias"
            if window is not None:
                name = f"spx_attention_bias_window_{window}"
                start = self.node("Sub", [queries, self.weight(f"{name}.size", np.array(window, np.int64))],
                                  f"{name}/start")
                seen = self.node("And", [causal, self.node("Greater", [keys, start], f"{name}/inside")],
                                 f"{name}/causal")
            biases[window] = self.node("Where", [self.node("And", [held, seen], f"{name}/seen"), zero_f, lowest], name)
        return biases
