"""The decoder-with-past graph of a Llama-style model, written directly from its modules' weights.

Tracing a 30-layer model gives ~2,500 kernels per decode step, a third of them shape arithmetic, and
ONNX Runtime's Python fusions over it take most of an export. For the model types whose layer is
the plain Llama layer (RMSNorm, rotary attention with grouped KV heads, SiLU-gated MLP), this module
writes the graph itself, in the operators ONNX Runtime runs fastest, as onnxruntime-genai's builder
does. Per layer: one packed QKV MatMul, a Split, two RotaryEmbedding, one ONNX Attention (opset 23:
grouped KV heads, the past joined inside it), the output MatMul, two SkipSimplifiedLayerNormalization
and the MLP's three MatMuls.

The ports are graph.py's, so the prefix passes, the runtime and every client read it unchanged.
The caller's mask (prefix slots and left padding included) and causality become one additive bias
shared by every layer, and position_ids index the rotary tables, so padded rows and rows of different
prefix lengths compute what the model computes. (ONNX Runtime's GroupQueryAttention would save the
Split and rotary kernels, but it refuses a batch of more than one row whose prompt has a past, and
with a prefix every prompt has one.) The weights are the loaded model's own tensors, not copies, and
reach the file one at a time; the rotary tables are the model's own rotary module's output, so any
static rope scaling is in them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.artifact.ports import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from spexport.export.decoder.prefix_graph import WEIGHTS_SUFFIX

MS = "com.microsoft"
OPSET = 23  # ONNX Attention with grouped KV heads and a past (ONNX Runtime 1.23+)
IR_VERSION = 10
MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3")  # rope types whose tables do not change with the length
FLOAT = ir.DataType.FLOAT


def builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a plain Llama layer stack that this module writes exactly (others are traced)."""
    config = model.config
    if config.model_type not in MODEL_TYPES or info.sliding_window is not None:
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return False
    body = getattr(model, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        return False
    layer = body.layers[0]
    return all(hasattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) \
        and not hasattr(layer.self_attn, "q_norm") and all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj",
                                                                                             "down_proj"))


def fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    return {"Attention": info.num_layers, "RotaryEmbedding": 2 * info.num_layers,
            "SkipSimplifiedLayerNormalization": 2 * info.num_layers}


def write_decoder(model, info: ModelInfo, path: Path) -> None:
    """Write `model`'s decoder-with-past graph (graph.py's ports) to `path`, its weights in external data."""
    graph = _Writer(model, info).graph()
    ir.save(ir.Model(graph, ir_version=IR_VERSION, producer_name="spexport"), path,
            external_data=path.name + WEIGHTS_SUFFIX, size_threshold_bytes=1024)


def _array(tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _epsilon(norm) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


class _Writer:
    def __init__(self, model, info: ModelInfo):
        self.model, self.info = model, info
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        kind = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=kind, const_value=ir.Tensor(array, name=name))
        self.initializers[name] = value
        return value

    def ints(self, name: str, values: list[int]) -> ir.Value:
        return self.initializers.get(name) or self.weight(name, np.array(values, np.int64))

    def node(self, op_type: str, inputs, name: str, outputs: int = 1, domain: str = "", **attributes):
        node = ir.node(op_type, list(inputs), attributes or None, domain=domain, name=name,
                       outputs=[ir.Value(name=f"{name}/output_{i}" if i else name) for i in range(outputs)])
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def linear(self, x: ir.Value, modules, name: str) -> ir.Value:
        """x @ W.T (+ b) for one Linear, or for several packed along their outputs."""
        if len(modules) == 1:
            weight = _array(modules[0].weight).T  # a view: the file gets it transposed, tensor by tensor
        else:
            weight = np.concatenate([_array(m.weight) for m in modules]).T
        y = self.node("MatMul", [x, self.weight(f"{name}.weight", weight)], f"{name}/MatMul")
        if all(getattr(m, "bias", None) is None for m in modules):
            return y
        bias = np.concatenate([np.zeros(m.out_features, np.float32) if m.bias is None else _array(m.bias)
                               for m in modules])
        return self.node("Add", [y, self.weight(f"{name}.bias", bias)], f"{name}/Add")

    def graph(self) -> ir.Graph:
        info, body = self.info, self.model.model
        rows, steps = "batch_size", "sequence_length"
        ids = ir.Value(name="input_ids", shape=ir.Shape([rows, steps]), type=ir.TensorType(ir.DataType.INT64))
        mask = ir.Value(name="attention_mask", shape=ir.Shape([rows, "past_sequence_length + sequence_length"]),
                        type=ir.TensorType(ir.DataType.INT64))
        positions = ir.Value(name="position_ids", shape=ir.Shape([rows, steps]), type=ir.TensorType(ir.DataType.INT64))
        kv_shape = ir.Shape([rows, info.num_kv_heads, "past_sequence_length", info.head_dim])
        pasts = [ir.Value(name=name.format(i), shape=kv_shape, type=ir.TensorType(FLOAT))
                 for i in range(info.num_layers) for name in (PAST_KEY, PAST_VALUE)]

        bias = self.attention_bias(mask, ids)
        cos, sin = self.rotary_tables()
        x = self.node("Gather", [self.weight("model.embed_tokens.weight", _array(body.embed_tokens.weight)), ids],
                      "model.embed_tokens/Gather")
        hidden = self.rms_norm(x, body.layers[0].input_layernorm, "model.layers.0.input_layernorm")
        presents = []
        for i, layer in enumerate(body.layers):
            name = f"model.layers.{i}"
            out, key, value = self.attention(hidden, layer.self_attn, bias, positions, cos, sin,
                                             pasts[2 * i:2 * i + 2], name)
            for present, port in ((key, PRESENT_KEY), (value, PRESENT_VALUE)):
                present.name, present.type = port.format(i), ir.TensorType(FLOAT)
                present.shape = ir.Shape([rows, info.num_kv_heads, "past_sequence_length + sequence_length",
                                          info.head_dim])
            presents += [key, value]
            attended = self.linear(out, [layer.self_attn.o_proj], f"{name}.self_attn.o_proj")
            hidden, x = self.skip_norm(x, attended, layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
            down = self.mlp(hidden, layer.mlp, f"{name}.mlp")
            last = i + 1 == len(body.layers)
            norm, norm_name = (body.norm, "model.norm") if last else \
                (body.layers[i + 1].input_layernorm, f"model.layers.{i + 1}.input_layernorm")
            hidden, x = self.skip_norm(x, down, norm, norm_name)
        logits = self.head(hidden)
        logits.name, logits.type = "logits", ir.TensorType(FLOAT)
        logits.shape = ir.Shape([rows, steps, info.vocab_size])
        return ir.Graph([ids, mask, positions, *pasts], [logits, *presents], nodes=self.nodes,
                        initializers=list(self.initializers.values()), opset_imports={"": OPSET, MS: 1},
                        name="spexport_decoder")

    def attention(self, hidden, attention, bias, positions, cos, sin, past, name):
        info, heads = self.info, attention.config.num_attention_heads
        qkv = self.linear(hidden, [attention.q_proj, attention.k_proj, attention.v_proj], f"{name}.self_attn.qkv_proj")
        sizes = [heads * info.head_dim, info.num_kv_heads * info.head_dim, info.num_kv_heads * info.head_dim]
        q, k, v = self.node("Split", [qkv, self.ints(f"spx_qkv_split_{sizes[0]}_{sizes[1]}", sizes)],
                            f"{name}.self_attn/Split", outputs=3, axis=-1)
        q = self.node("RotaryEmbedding", [q, positions, cos, sin], f"{name}.self_attn/RotaryQ", domain=MS,
                      num_heads=heads)
        k = self.node("RotaryEmbedding", [k, positions, cos, sin], f"{name}.self_attn/RotaryK", domain=MS,
                      num_heads=info.num_kv_heads)
        return self.node("Attention", [q, k, v, bias, *past], f"{name}.self_attn/Attention", outputs=3,
                         q_num_heads=heads, kv_num_heads=info.num_kv_heads, scale=float(attention.scaling))

    def mlp(self, hidden, mlp, name):
        gate = self.linear(hidden, [mlp.gate_proj], f"{name}.gate_proj")
        up = self.linear(hidden, [mlp.up_proj], f"{name}.up_proj")
        silu = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
        return self.linear(self.node("Mul", [silu, up], f"{name}/Mul"), [mlp.down_proj], f"{name}.down_proj")

    def attention_bias(self, mask: ir.Value, ids: ir.Value) -> ir.Value:
        """[batch, 1, seq, past + seq]: 0 where query i (of seq) may see key j (of past + seq) — the mask
        holds j, and j <= past + i — else float32's lowest."""
        total = self.node("Squeeze", [self.node("Shape", [mask], "spx_bias/total", start=1, end=2)], "spx_bias/T")
        steps = self.node("Squeeze", [self.node("Shape", [ids], "spx_bias/steps", start=1, end=2)], "spx_bias/S")
        zero = self.weight("spx_zero_i64", np.array(0, np.int64))
        one = self.weight("spx_one_i64", np.array(1, np.int64))
        keys = self.node("Range", [zero, total, one], "spx_bias/keys")
        first = self.node("Sub", [total, steps], "spx_bias/first_query")
        queries = self.node("Unsqueeze", [self.node("Range", [first, total, one], "spx_bias/queries"),
                                          self.ints("spx_axis_1", [1])], "spx_bias/queries_column")
        causal = self.node("LessOrEqual", [keys, queries], "spx_bias/causal")  # [seq, total]
        held = self.node("Unsqueeze", [self.node("Cast", [mask], "spx_bias/held", to=ir.DataType.BOOL),
                                       self.ints("spx_axes_1_2", [1, 2])], "spx_bias/held_4d")  # [batch, 1, 1, total]
        seen = self.node("And", [held, causal], "spx_bias/seen")
        return self.node("Where", [seen, self.weight("spx_zero_f32", np.array(0.0, np.float32)),
                                   self.weight("spx_lowest_f32", np.array(np.finfo(np.float32).min, np.float32))],
                         "spx_attention_bias")

    def rotary_tables(self) -> tuple[ir.Value, ir.Value]:
        """cos and sin [max_positions, head_dim / 2], from the model's own rotary module."""
        import torch

        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(torch.zeros(1), torch.arange(self.info.max_positions)[None])
        half = self.info.head_dim // 2
        return (self.weight("cos_cache", np.ascontiguousarray(cos[0, :, :half].float().numpy())),
                self.weight("sin_cache", np.ascontiguousarray(sin[0, :, :half].float().numpy())))

    def rms_norm(self, x: ir.Value, norm, name: str) -> ir.Value:
        """RMSNorm in standard operators, as the model computes it (once per step: the first layer's)."""
        mean = self.node("ReduceMean", [self.node("Mul", [x, x], f"{name}/Square"), self.ints("spx_axis_last", [-1])],
                         f"{name}/Mean", keepdims=1)
        root = self.node("Sqrt", [self.node("Add", [mean, self.weight(f"{name}.epsilon", np.array(_epsilon(norm),
                                                                                                  np.float32))],
                                            f"{name}/AddEpsilon")], f"{name}/Sqrt")
        normed = self.node("Div", [x, root], f"{name}/Normed")
        return self.node("Mul", [normed, self.weight(f"{name}.weight", _array(norm.weight))], f"{name}/Scaled")

    def skip_norm(self, x: ir.Value, delta: ir.Value, norm, name: str) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(x + delta), x + delta) in one kernel."""
        outputs = self.node("SkipSimplifiedLayerNormalization", [x, delta, self.weight(f"{name}.weight",
                                                                                          _array(norm.weight))],
                            name, outputs=4, domain=MS, epsilon=_epsilon(norm))
        return outputs[0], outputs[3]

    def head(self, hidden: ir.Value) -> ir.Value:
        """The LM head. Tied to the token embedding, it reads that table through a Transpose (as a traced
        graph does, which quantize.py recognises), so the file holds the table once."""
        head, table = self.model.lm_head, self.initializers["model.embed_tokens.weight"]
        if head.weight.data_ptr() == self.model.model.embed_tokens.weight.data_ptr():
            weight = self.node("Transpose", [table], "lm_head/Transpose", perm=[1, 0])
        else:
            weight = self.weight("lm_head.weight", _array(head.weight).T)
        logits = self.node("MatMul", [hidden, weight], "lm_head/MatMul")
        if getattr(head, "bias", None) is None:
            return logits
        return self.node("Add", [logits, self.weight("lm_head.bias", _array(head.bias))], "lm_head/Add")
