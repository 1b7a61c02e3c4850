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
from spexport.export.decoder.layouts import LAYOUTS, Layout, activation, layout_for, windows
from spexport.export.decoder.layouts import fused_counts as layout_counts
from spexport.export.decoder.prefix_graph import WEIGHTS_SUFFIX

MS = "com.microsoft"
OPSET = 23  # ONNX Attention with grouped KV heads and a past, RMSNormalization (ONNX Runtime 1.23+)
IR_VERSION = 10
MODEL_TYPES = tuple(LAYOUTS)  # each layout.py's Layout: Llama's layer and its variations
FLOAT = ir.DataType.FLOAT


def builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a layer stack that this module writes exactly (others are traced)."""
    return layout_for(model, info) is not None


def fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    return layout_counts(info)


def write_decoder(model, info: ModelInfo, path: Path) -> None:
    """Write `model`'s decoder-with-past graph (graph.py's ports) to `path`, its weights in external data."""
    graph = _Writer(model, info, layout_for(model, info)).graph()
    ir.save(ir.Model(graph, ir_version=IR_VERSION, producer_name="spexport"), path,
            external_data=path.name + WEIGHTS_SUFFIX, size_threshold_bytes=1024)


def _array(tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _epsilon(norm) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


class _Writer:
    def __init__(self, model, info: ModelInfo, layout: Layout):
        self.model, self.info, self.layout, config = model, info, layout, model.config
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        # Granite's multipliers (1 elsewhere): the residual one is folded into the weights that feed the residual
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))
        self.residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))
        self.logits_scaling = float(getattr(config, "logits_scaling", 1.0))
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.windows = windows(config, layout)

    def weight(self, name: str, array: np.ndarray) -> ir.Value:
        kind = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=kind, const_value=ir.Tensor(array, name=name))
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

    def linear(self, x: ir.Value, modules, name: str, scale: float = 1.0) -> ir.Value:
        """x @ W.T (+ b) for one Linear, or for several packed along their outputs, times `scale`."""
        if len(modules) == 1:
            weight = _array(modules[0].weight).T  # a view: the file gets it transposed, tensor by tensor
        else:
            weight = np.concatenate([_array(m.weight) for m in modules]).T
        if scale != 1.0:
            weight = weight * np.float32(scale)
        y = self.node("MatMul", [x, self.weight(f"{name}.weight", weight)], f"{name}/MatMul")
        if all(getattr(m, "bias", None) is None for m in modules):
            return y
        bias = np.concatenate([np.zeros(m.out_features, np.float32) if m.bias is None else _array(m.bias)
                               for m in modules]) * np.float32(scale)
        return self.node("Add", [y, self.weight(f"{name}.bias", bias)], f"{name}/Add")

    def graph(self) -> ir.Graph:
        info, body, layout = self.info, self.model.model, self.layout
        rows, steps = "batch_size", "sequence_length"
        ids = ir.Value(name="input_ids", shape=ir.Shape([rows, steps]), type=ir.TensorType(ir.DataType.INT64))
        mask = ir.Value(name="attention_mask", shape=ir.Shape([rows, "past_sequence_length + sequence_length"]),
                        type=ir.TensorType(ir.DataType.INT64))
        positions = ir.Value(name="position_ids", shape=ir.Shape([rows, steps]), type=ir.TensorType(ir.DataType.INT64))
        kv_shape = ir.Shape([rows, info.num_kv_heads, "past_sequence_length", info.head_dim])
        pasts = [ir.Value(name=name.format(i), shape=kv_shape, type=ir.TensorType(FLOAT))
                 for i in range(info.num_layers) for name in (PAST_KEY, PAST_VALUE)]

        biases = self.attention_biases(mask, ids)
        cos, sin = self.rotary_tables()
        x = self.embed(ids)
        hidden = self.rms_norm(x, body.layers[0].input_layernorm, "model.layers.0.input_layernorm") \
            if layout.pre_norms else x
        presents = []
        for i, layer in enumerate(body.layers):
            name = f"model.layers.{i}"
            out, key, value = self.attention(hidden, layer.self_attn, biases[self.windows[i]], positions, cos, sin,
                                             pasts[2 * i:2 * i + 2], name)
            for present, port in ((key, PRESENT_KEY), (value, PRESENT_VALUE)):
                present.name, present.type = port.format(i), ir.TensorType(FLOAT)
                present.shape = ir.Shape([rows, info.num_kv_heads, "past_sequence_length + sequence_length",
                                          info.head_dim])
            presents += [key, value]
            attended = self.linear(out, [layer.self_attn.o_proj], f"{name}.self_attn.o_proj", self.residual_multiplier)
            if layout.post_norms:
                attended = self.rms_norm(attended, layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
            pre_mlp = (layer.pre_feedforward_layernorm if layout.post_norms else layer.post_attention_layernorm) \
                if layout.pre_norms else None
            hidden, x = self.skip_norm(x, attended, pre_mlp, f"{name}.pre_mlp_layernorm")
            down = self.mlp(hidden, layer.mlp, f"{name}.mlp")
            if layout.post_norms:
                down = self.rms_norm(down, layer.post_feedforward_layernorm, f"{name}.post_feedforward_layernorm")
            last = i + 1 == len(body.layers)
            norm, norm_name = (body.norm, "model.norm") if last else \
                (body.layers[i + 1].input_layernorm if layout.pre_norms else None,
                 f"model.layers.{i + 1}.input_layernorm")
            hidden, x = self.skip_norm(x, down, norm, norm_name, 1 / self.logits_scaling if last else 1.0)
        logits = self.head(hidden)
        logits.name, logits.type = "logits", ir.TensorType(FLOAT)
        logits.shape = ir.Shape([rows, steps, info.vocab_size])
        return ir.Graph([ids, mask, positions, *pasts], [logits, *presents], nodes=self.nodes,
                        initializers=list(self.initializers.values()), opset_imports={"": OPSET, MS: 1},
                        name="spexport_decoder")

    def embed(self, ids: ir.Value) -> ir.Value:
        """The token embedding, times Gemma's sqrt(hidden) (its module's own float32 buffer) or Granite's
        multiplier."""
        table = self.model.model.embed_tokens
        x = self.node("Gather", [self.weight("model.embed_tokens.weight", _array(table.weight)), ids],
                      "model.embed_tokens/Gather")
        scale = getattr(table, "embed_scale", None)
        scale = self.embedding_multiplier if scale is None else float(scale)
        return x if scale == 1.0 else self.node("Mul", [x, self.scalar("model.embed_tokens.scale", scale)],
                                                "model.embed_tokens/Scale")

    def attention(self, hidden, attention, bias, positions, cos, sin, past, name):
        info, heads, layout = self.info, attention.config.num_attention_heads, self.layout
        projections = [attention.qkv_proj] if layout.packed else [attention.q_proj, attention.k_proj,
                                                                   attention.v_proj]
        qkv = self.linear(hidden, projections, f"{name}.self_attn.qkv_proj")
        sizes = [heads * info.head_dim, info.num_kv_heads * info.head_dim, info.num_kv_heads * info.head_dim]
        q, k, v = self.node("Split", [qkv, self.ints(f"spx_qkv_split_{sizes[0]}_{sizes[1]}", sizes)],
                            f"{name}.self_attn/Split", outputs=3, axis=-1)
        if layout.qk_norm is not None:
            q = self.qk_norm(q, attention.q_norm, f"{name}.self_attn.q_norm")
            k = self.qk_norm(k, attention.k_norm, f"{name}.self_attn.k_norm")
        q = self.node("RotaryEmbedding", [q, positions, cos, sin], f"{name}.self_attn/RotaryQ", domain=MS,
                      num_heads=heads)
        k = self.node("RotaryEmbedding", [k, positions, cos, sin], f"{name}.self_attn/RotaryK", domain=MS,
                      num_heads=info.num_kv_heads)
        capped = {} if self.softcap is None else {"softcap": float(self.softcap)}  # before the mask, as Gemma 2
        return self.node("Attention", [q, k, v, bias, *past], f"{name}.self_attn/Attention", outputs=3,
                         q_num_heads=heads, kv_num_heads=info.num_kv_heads, scale=float(attention.scaling), **capped)

    def qk_norm(self, x: ir.Value, norm, name: str) -> ir.Value:
        """Qwen3's RMSNorm over each head (x seen as [batch, seq, heads, head_dim]) or OLMo 2's over the
        whole projection."""
        if self.layout.qk_norm == "projection":
            return self.rms_norm(x, norm, name)
        heads = self.node("Reshape", [x, self.ints("spx_shape_heads", [0, 0, -1, self.info.head_dim])],
                          f"{name}/Heads")
        return self.node("Reshape", [self.rms_norm(heads, norm, name), self.ints("spx_shape_flat", [0, 0, -1])],
                         f"{name}/Flat")

    def mlp(self, hidden, mlp, name):
        if self.layout.packed:
            gate, up = self.node("Split", [self.linear(hidden, [mlp.gate_up_proj], f"{name}.gate_up_proj")],
                                 f"{name}/Split", outputs=2, axis=-1, num_outputs=2)
        else:
            gate = self.linear(hidden, [mlp.gate_proj], f"{name}.gate_proj")
            up = self.linear(hidden, [mlp.up_proj], f"{name}.up_proj")
        if activation(self.model.config) == "gelu_tanh":
            act = self.node("Gelu", [gate], f"{name}/Gelu", approximate="tanh")
        else:
            act = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
        return self.linear(self.node("Mul", [act, up], f"{name}/Mul"), [mlp.down_proj], f"{name}.down_proj",
                           self.residual_multiplier)

    def attention_biases(self, mask: ir.Value, ids: ir.Value) -> dict[int | None, ir.Value]:
        """Per sliding window (None: full attention), [batch, 1, seq, past + seq]: 0 where query i (of seq)
        may see key j (of past + seq) — the mask holds j, j <= past + i, and past + i - j < window, counted
        in slots as the model counts them — else float32's lowest."""
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
        zero_f, lowest = self.scalar("spx_zero_f32", 0.0), self.scalar("spx_lowest_f32", np.finfo(np.float32).min)
        biases = {}
        for window in dict.fromkeys(self.windows):
            seen, name = causal, "spx_attention_bias"
            if window is not None:
                name = f"spx_attention_bias_window_{window}"
                start = self.node("Sub", [queries, self.weight(f"{name}.size", np.array(window, np.int64))],
                                  f"{name}/start")
                seen = self.node("And", [causal, self.node("Greater", [keys, start], f"{name}/inside")],
                                 f"{name}/causal")
            biases[window] = self.node("Where", [self.node("And", [held, seen], f"{name}/seen"), zero_f, lowest], name)
        return biases

    def rotary_tables(self) -> tuple[ir.Value, ir.Value]:
        """cos and sin [max_positions, head_dim / 2], from the model's own rotary module."""
        import torch

        with torch.no_grad():
            cos, sin = self.model.model.rotary_emb(torch.zeros(1), torch.arange(self.info.max_positions)[None])
        half = self.info.head_dim // 2
        return (self.weight("cos_cache", np.ascontiguousarray(cos[0, :, :half].float().numpy())),
                self.weight("sin_cache", np.ascontiguousarray(sin[0, :, :half].float().numpy())))

    def norm_weight(self, norm, scale: float = 1.0) -> np.ndarray:
        """The RMSNorm's scale: its weight, plus Gemma's offset, times `scale` (Granite's 1 / logits_scaling on
        the final norm)."""
        weight = _array(norm.weight)
        if self.layout.norm_offset:
            weight = weight + np.float32(self.layout.norm_offset)
        return weight * np.float32(scale) if scale != 1.0 else weight

    def rms_norm(self, x: ir.Value, norm, name: str) -> ir.Value:
        """RMSNorm in one ONNX operator."""
        return self.node("RMSNormalization", [x, self.weight(f"{name}.weight", self.norm_weight(norm))], name,
                         axis=-1, epsilon=_epsilon(norm))

    def skip_norm(self, x: ir.Value, delta: ir.Value, norm, name: str, scale: float = 1.0) -> tuple[ir.Value, ir.Value]:
        """(RMSNorm(x + delta), x + delta) in one kernel; (x + delta, x + delta) without a norm."""
        if norm is None:
            total = self.node("Add", [x, delta], f"{name}/Residual")
            return total, total
        outputs = self.node("SkipSimplifiedLayerNormalization",
                            [x, delta, self.weight(f"{name}.weight", self.norm_weight(norm, scale))],
                            name, outputs=4, domain=MS, epsilon=_epsilon(norm))
        return outputs[0], outputs[3]

    def head(self, hidden: ir.Value) -> ir.Value:
        """The LM head (and Gemma 2's soft cap). Tied to the token embedding, it reads that table through a
        Transpose (as a traced graph does, which quantize.py recognises), so the file holds the table once."""
        head, table = self.model.lm_head, self.initializers["model.embed_tokens.weight"]
        if head.weight.data_ptr() == self.model.model.embed_tokens.weight.data_ptr():
            weight = self.node("Transpose", [table], "lm_head/Transpose", perm=[1, 0])
        else:
            weight = self.weight("lm_head.weight", _array(head.weight).T)
        logits = self.node("MatMul", [hidden, weight], "lm_head/MatMul")
        if getattr(head, "bias", None) is not None:
            logits = self.node("Add", [logits, self.weight("lm_head.bias", _array(head.bias))], "lm_head/Add")
        if self.final_softcap is None:
            return logits
        cap = self.scalar("lm_head.softcap", float(self.final_softcap))
        capped = self.node("Tanh", [self.node("Div", [logits, cap], "lm_head/Capped")], "lm_head/Tanh")
        return self.node("Mul", [capped, cap], "lm_head/Softcap")
