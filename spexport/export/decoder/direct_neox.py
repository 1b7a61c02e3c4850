"""GPT-NeoX's (Pythia's) decoder-with-past graph, written directly from its weights (direct.py dispatches here).

Its layer adds attention and the MLP to the residual in parallel: x + attn(ln1(x)) + mlp(ln2(x)). The
packed query_key_value Linear holds each head's q, k and v together; it is reordered (a copy of that one
weight per layer) into all heads' q, then k, then v, so one Split gives what ONNX Attention takes. Rotary
covers the first rotary_ndims of each head (RotaryEmbedding's rotary_embedding_dim). Per layer: the QKV
MatMul and its bias, a Split, two RotaryEmbedding, one Attention, the output MatMul, a LayerNorm for the
MLP, its two MatMuls around one BiasGelu, an Add of the two branches and one SkipLayerNormalization that
adds them to the residual with both branches' output biases and normalises for the next layer.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.export.decoder.direct_gpt2 import Gpt2Writer
from spexport.export.decoder.layouts import STATIC_ROPE
from spexport.export.decoder.writer import MS, array


def neox_builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a GPT-NeoX whose layer this module writes exactly (others are traced)."""
    config, body = model.config, getattr(model, "gpt_neox", None)
    rotary = getattr(body, "rotary_emb", None)
    return config.model_type == "gpt_neox" and body is not None and config.use_parallel_residual and \
        config.hidden_act == "gelu" and rotary is not None and getattr(rotary, "rope_type", "") in STATIC_ROPE and \
        hasattr(model, "lm_head")


def neox_fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    layers = info.num_layers
    return {"Attention": layers, "RotaryEmbedding": 2 * layers, "SkipLayerNormalization": layers, "BiasGelu": layers}


def bias_of(linear) -> np.ndarray:
    """A Linear's bias, or zeros."""
    return array(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, np.float32)


class NeoxWriter(Gpt2Writer):
    """GPTNeoXForCausalLM's graph."""

    def write(self) -> ir.Model:
        body, info = self.model.gpt_neox, self.info
        heads = self.model.config.num_attention_heads
        bias = self.attention_biases([None] * info.num_layers)[None]
        cos, sin = self.rotary_tables(body.rotary_emb)
        rotary = 2 * cos.shape[1]
        x = self.node("Gather", [self.weight("gpt_neox.embed_in.weight", array(body.embed_in.weight)), self.ids],
                      "gpt_neox.embed_in/Gather")
        hidden = self.layer_norm(x, body.layers[0].input_layernorm, "gpt_neox.layers.0.input_layernorm")
        for i, layer in enumerate(body.layers):
            name, attention, mlp = f"gpt_neox.layers.{i}", layer.attention, layer.mlp
            qkv = self.packed_qkv(hidden, attention.query_key_value, f"{name}.attention.qkv")
            q, k, v = self.node("Split", [qkv], f"{name}.attention/Split", outputs=3, axis=-1, num_outputs=3)
            q, k = (self.node("RotaryEmbedding", [t, self.positions, cos, sin], f"{name}.attention/Rotary{which}",
                              domain=MS, num_heads=heads, rotary_embedding_dim=rotary)
                    for t, which in ((q, "Q"), (k, "K")))
            out, key, value = self.node("Attention", [q, k, v, bias, *self.past(i)], f"{name}.attention/Attention",
                                        outputs=3, q_num_heads=heads, kv_num_heads=heads,
                                        scale=float(attention.scaling))
            self.present(i, key, value)
            attended = self.conv1d_of(out, attention.dense, f"{name}.attention.dense")
            normed = self.layer_norm(x, layer.post_attention_layernorm, f"{name}.post_attention_layernorm")
            up = self.node("BiasGelu", [self.conv1d_of(normed, mlp.dense_h_to_4h, f"{name}.mlp.dense_h_to_4h"),
                                        self.weight(f"{name}.mlp.dense_h_to_4h.bias", bias_of(mlp.dense_h_to_4h))],
                           f"{name}.mlp/BiasGelu", domain=MS)
            down = self.conv1d_of(up, mlp.dense_4h_to_h, f"{name}.mlp.dense_4h_to_h")
            branches = self.node("Add", [attended, down], f"{name}/Branches")
            last = i + 1 == len(body.layers)
            norm, norm_name = (body.final_layer_norm, "gpt_neox.final_layer_norm") if last else \
                (body.layers[i + 1].input_layernorm, f"gpt_neox.layers.{i + 1}.input_layernorm")
            both = bias_of(attention.dense) + bias_of(mlp.dense_4h_to_h)
            outputs = self.node("SkipLayerNormalization",
                                [x, branches, *self.norm(norm, norm_name), self.weight(f"{norm_name}.skip_bias", both)],
                                norm_name, outputs=4, domain=MS, epsilon=norm.eps)
            hidden, x = outputs[0], outputs[3]
        return self.model_of(self.head(hidden, "gpt_neox.embed_in.weight", body.embed_in))

    def layer_norm(self, x: ir.Value, norm, name: str) -> ir.Value:
        return self.node("LayerNormalization", [x, *self.norm(norm, name)], name, axis=-1, epsilon=norm.eps)

    def conv1d_of(self, x: ir.Value, linear, name: str) -> ir.Value:
        """x @ W.T for a Linear (its bias is added by the node after)."""
        return self.node("MatMul", [x, self.weight(f"{name}.weight", array(linear.weight).T)], f"{name}/MatMul")

    def packed_qkv(self, hidden: ir.Value, linear, name: str) -> ir.Value:
        """hidden @ W + b for a per-head packed query_key_value, its columns reordered for one Split."""
        product = self.node("MatMul", [hidden, self.weight(f"{name}.weight", self.qkv_weight(linear))],
                            f"{name}/MatMul")
        return self.node("Add", [product, self.weight(f"{name}.bias", self.qkv_bias(linear))], f"{name}/Add")

    def qkv_weight(self, linear) -> np.ndarray:
        """[hidden, 3 * hidden]: all heads' q columns, then k, then v (the Linear holds them per head)."""
        heads, size = self.info.num_kv_heads, self.info.head_dim
        weight = array(linear.weight).reshape(heads, 3, size, -1)
        return weight.transpose(1, 0, 2, 3).reshape(3 * heads * size, -1).T

    def qkv_bias(self, linear) -> np.ndarray:
        heads, size = self.info.num_kv_heads, self.info.head_dim
        return bias_of(linear).reshape(heads, 3, size).transpose(1, 0, 2).reshape(-1)

    def rotary_tables(self, rotary_emb) -> tuple[ir.Value, ir.Value]:
        """cos and sin [max_positions, rotary_ndims / 2], from the model's own rotary module."""
        import torch

        with torch.no_grad():
            cos, sin = rotary_emb(torch.zeros(1), torch.arange(self.info.max_positions)[None])
        half = cos.shape[-1] // 2
        return (self.weight("cos_cache", np.ascontiguousarray(cos[0, :, :half].float().numpy())),
                self.weight("sin_cache", np.ascontiguousarray(sin[0, :, :half].float().numpy())))
