"""The decoder-with-past graph of a Llama-style model, written directly from its modules' weights.

Tracing a 30-layer model gives ~2,500 kernels per decode step, a third of them shape arithmetic, and
ONNX Runtime's Python fusions over it take most of an export. For the model types whose layer is
the Llama layer or one of its variations (layouts.py: Qwen3's and OLMo 2's q/k norms, Gemma's norm
offset and GeLU, Gemma 2's post-norms, soft caps and sliding windows, Phi-3's packed projections,
Granite's multipliers), this module writes the graph itself, in the operators ONNX Runtime runs
fastest, as onnxruntime-genai's builder does. Per layer: one packed QKV MatMul, a Split, two
RotaryEmbedding, one ONNX Attention (opset 23: grouped KV heads, the past joined inside it, a soft cap),
the output MatMul, two SkipSimplifiedLayerNormalization and the MLP's three MatMuls.

The ports and the attention bias are writer.py's, and position_ids index the rotary tables, so padded
rows and rows of different prefix lengths compute what the model computes. (ONNX Runtime's
GroupQueryAttention takes a batch of prompts behind a past only from 1.32, which PyPI's GPU build is not
yet: the in-place graph the Python runtime runs on the CPU is derived with it, by
passes/group_query_attention.py.) The rotary tables are the
model's own rotary module's output, so any static rope scaling is in them. A multiplier is folded into
the weights it follows (Granite's residual one into o_proj and down_proj, its logits scaling into the
final norm), which copies those weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
import transformers

from spexport.artifact.files import WEIGHTS_SUFFIX
from spexport.artifact.manifest import ModelInfo
from spexport.export.decoder.direct_bloom import BloomWriter, bloom_builds, bloom_fused_counts
from spexport.export.decoder.direct_gpt2 import Gpt2Writer, gpt2_builds, gpt2_fused_counts
from spexport.export.decoder.direct_neox import NeoxWriter, neox_builds, neox_fused_counts
from spexport.export.decoder.direct_opt import OptWriter, opt_builds, opt_fused_counts
from spexport.export.decoder.layouts import LAYOUTS, Layout, activation, layout_for, windows
from spexport.export.decoder.layouts import fused_counts as layout_counts
from spexport.export.decoder.writer import MS, GraphWriter, array


class OtherWriter(NamedTuple):
    """A LayerNorm family's own writer: whether it writes a model, the writer, its fused operators."""

    builds: Callable
    writer: type
    fused_counts: Callable


OTHER_WRITERS = {"gpt2": OtherWriter(gpt2_builds, Gpt2Writer, gpt2_fused_counts),
                 "opt": OtherWriter(opt_builds, OptWriter, opt_fused_counts),
                 "gpt_neox": OtherWriter(neox_builds, NeoxWriter, neox_fused_counts),
                 "bloom": OtherWriter(bloom_builds, BloomWriter, bloom_fused_counts)}
MODEL_TYPES = (*LAYOUTS, *OTHER_WRITERS)  # layouts.py's Llama-style layers, and the LayerNorm families
# Written from transformers 5's modules alone: transformers 4's differ where these writers read them (GPT-2's
# attention has no `scaling`; Gemma's and GPT-NeoX's layers compute otherwise), so under transformers 4 they are
# traced, as before these writers existed.
NEEDS_TRANSFORMERS_5 = frozenset({"gpt2", "gpt_neox", "gemma", "gemma2"})


def written_types() -> tuple[str, ...]:
    """The model types this module writes under the installed transformers (others are traced)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return MODEL_TYPES
    return tuple(t for t in MODEL_TYPES if t not in NEEDS_TRANSFORMERS_5)


def builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a layer stack that this module writes exactly (others are traced)."""
    if model.config.model_type not in written_types():
        return False
    other = OTHER_WRITERS.get(model.config.model_type)
    return other.builds(model, info) if other else layout_for(model, info) is not None


def fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    other = OTHER_WRITERS.get(info.model_type)
    return other.fused_counts(info) if other else layout_counts(info)


def write_decoder(model, info: ModelInfo, path: Path) -> None:
    """Write `model`'s decoder-with-past graph (graph.py's ports) to `path`, its weights in external data."""
    other = OTHER_WRITERS.get(model.config.model_type)
    writer = other.writer(model, info) if other else _Writer(model, info, layout_for(model, info))
    ir.save(writer.write(), path, external_data=path.name + WEIGHTS_SUFFIX,
            size_threshold_bytes=1024)


def _epsilon(norm) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


class _Writer(GraphWriter):
    def __init__(self, model, info: ModelInfo, layout: Layout):
        super().__init__(model, info)
        self.layout, config = layout, model.config
        # Granite's multipliers (1 elsewhere): the residual one is folded into the weights that feed the residual
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))
        self.residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))
        self.logits_scaling = float(getattr(config, "logits_scaling", 1.0))
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.windows = windows(config, layout)

    def linear(self, x: ir.Value, modules, name: str, scale: float = 1.0) -> ir.Value:
        """x @ W.T (+ b) for one Linear, or for several packed along their outputs, times `scale`."""
        if len(modules) == 1:
            weight = array(modules[0].weight).T  # a view: the file gets it transposed, tensor by tensor
        else:
            weight = np.concatenate([array(m.weight) for m in modules]).T
        if scale != 1.0:
            weight = weight * np.float32(scale)
        y = self.node("MatMul", [x, self.weight(f"{name}.weight", weight)], f"{name}/MatMul")
        if all(getattr(m, "bias", None) is None for m in modules):
            return y
        bias = np.concatenate([np.zeros(m.out_features, np.float32) if m.bias is None else array(m.bias)
                               for m in modules]) * np.float32(scale)
        return self.node("Add", [y, self.weight(f"{name}.bias", bias)], f"{name}/Add")

    def write(self) -> ir.Model:
        body, layout = self.model.model, self.layout
        biases = self.attention_biases(self.windows)
        cos, sin = self.rotary_tables()
        x = self.embed(self.ids)
        hidden = self.rms_norm(x, body.layers[0].input_layernorm, "model.layers.0.input_layernorm") \
            if layout.pre_norms else x
        for i, layer in enumerate(body.layers):
            name = f"model.layers.{i}"
            out, key, value = self.attention(hidden, layer.self_attn, biases[self.windows[i]], cos, sin, i, name)
            self.present(i, key, value)
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
        return self.model_of(self.head(hidden))

    def embed(self, ids: ir.Value) -> ir.Value:
        """The token embedding, times Gemma's sqrt(hidden) (its module's own float32 buffer) or Granite's
        multiplier."""
        table = self.model.model.embed_tokens
        x = self.node("Gather", [self.weight("model.embed_tokens.weight", array(table.weight)), ids],
                      "model.embed_tokens/Gather")
        scale = getattr(table, "embed_scale", None)
        scale = self.embedding_multiplier if scale is None else float(scale)
        return x if scale == 1.0 else self.node("Mul", [x, self.scalar("model.embed_tokens.scale", scale)],
                                                "model.embed_tokens/Scale")

    def attention(self, hidden, attention, bias, cos, sin, layer: int, name: str):
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
        q = self.node("RotaryEmbedding", [q, self.positions, cos, sin], f"{name}.self_attn/RotaryQ", domain=MS,
                      num_heads=heads)
        k = self.node("RotaryEmbedding", [k, self.positions, cos, sin], f"{name}.self_attn/RotaryK", domain=MS,
                      num_heads=info.num_kv_heads)
        capped = {} if self.softcap is None else {"softcap": float(self.softcap)}  # before the mask, as Gemma 2
        return self.node("Attention", [q, k, v, bias, *self.past(layer)], f"{name}.self_attn/Attention", outputs=3,
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
        weight = array(norm.weight)
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
            weight = self.weight("lm_head.weight", array(head.weight).T)
        logits = self.node("MatMul", [hidden, weight], "lm_head/MatMul")
        if getattr(head, "bias", None) is not None:
            logits = self.node("Add", [logits, self.weight("lm_head.bias", array(head.bias))], "lm_head/Add")
        if self.final_softcap is None:
            return logits
        cap = self.scalar("lm_head.softcap", float(self.final_softcap))
        capped = self.node("Tanh", [self.node("Div", [logits, cap], "lm_head/Capped")], "lm_head/Tanh")
        return self.node("Mul", [capped, cap], "lm_head/Softcap")
