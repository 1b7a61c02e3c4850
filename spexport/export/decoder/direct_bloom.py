"""BLOOM's decoder-with-past graph, written directly from its weights (direct.py dispatches here).

BLOOM has no position embedding: ALiBi adds slope_h * (position of key j) to every attention logit of
head h, the position counted over the attention mask (cumsum - 1, 0 where masked), as transformers'
build_alibi_tensor does. That term joins the mask and causal bias once per step, as one
[batch, heads, seq, past + seq] bias shared by the layers; position_ids stays an input, unread, as in the
traced graph. The layer is GPT-2's (LayerNorm before attention and the MLP, GeLU-tanh) with a LayerNorm
after the word embeddings and GPT-NeoX's per-head packed query_key_value.
"""

from __future__ import annotations

import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.export.decoder.direct_neox import NeoxWriter, bias_of
from spexport.export.decoder.writer import MS, array


def bloom_builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a BLOOM whose layer this module writes exactly (others are traced)."""
    config = model.config
    return config.model_type == "bloom" and hasattr(model, "transformer") and hasattr(model, "lm_head") and \
        not config.apply_residual_connection_post_layernorm and \
        ((config.pretraining_tp or 1) == 1 or not config.slow_but_exact)


def bloom_fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    return {"Attention": info.num_layers, "SkipLayerNormalization": 2 * info.num_layers, "FastGelu": info.num_layers}


class BloomWriter(NeoxWriter):
    """BloomForCausalLM's graph."""

    def write(self) -> ir.Model:
        body, heads = self.model.transformer, self.info.num_kv_heads
        bias = self.alibi_bias(self.attention_biases([None])[None])
        x = self.node("Gather", [self.weight("transformer.word_embeddings.weight",
                                             array(body.word_embeddings.weight)), self.ids],
                      "transformer.word_embeddings/Gather")
        x = self.layer_norm(x, body.word_embeddings_layernorm, "transformer.word_embeddings_layernorm")
        hidden = self.layer_norm(x, body.h[0].input_layernorm, "transformer.h.0.input_layernorm")
        for i, block in enumerate(body.h):
            name, attention, mlp = f"transformer.h.{i}", block.self_attention, block.mlp
            qkv = self.packed_qkv(hidden, attention.query_key_value, f"{name}.self_attention.qkv")
            q, k, v = self.node("Split", [qkv], f"{name}.self_attention/Split", outputs=3, axis=-1, num_outputs=3)
            out, key, value = self.node("Attention", [q, k, v, bias, *self.past(i)],
                                        f"{name}.self_attention/Attention", outputs=3, q_num_heads=heads,
                                        kv_num_heads=heads, scale=float(attention.inv_norm_factor))
            self.present(i, key, value)
            attended = self.conv1d_of(out, attention.dense, f"{name}.self_attention.dense")
            hidden, x = self.skip_norm(x, attended, attention.dense, block.post_attention_layernorm,
                                       f"{name}.post_attention_layernorm")
            up = self.node("FastGelu", [self.conv1d_of(hidden, mlp.dense_h_to_4h, f"{name}.mlp.dense_h_to_4h"),
                                        self.weight(f"{name}.mlp.dense_h_to_4h.bias", bias_of(mlp.dense_h_to_4h))],
                           f"{name}.mlp/FastGelu", domain=MS)
            down = self.conv1d_of(up, mlp.dense_4h_to_h, f"{name}.mlp.dense_4h_to_h")
            last = i + 1 == len(body.h)
            norm, norm_name = (body.ln_f, "transformer.ln_f") if last else (body.h[i + 1].input_layernorm,
                                                                            f"transformer.h.{i + 1}.input_layernorm")
            hidden, x = self.skip_norm(x, down, mlp.dense_4h_to_h, norm, norm_name)
        return self.model_of(self.head(hidden, "transformer.word_embeddings.weight", body.word_embeddings))

    def alibi_bias(self, bias: ir.Value) -> ir.Value:
        """`bias` [batch, 1, seq, total] plus slope_h * position_j: [batch, heads, seq, total]."""
        import torch
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        heads = self.info.num_kv_heads
        slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.int64), heads, torch.float32).reshape(heads, 2)[:, 1]
        counted = self.node("CumSum", [self.mask, self.ints("spx_alibi/axis", [1])], "spx_alibi/counted")
        held = self.node("Mul", [self.node("Sub", [counted, self.ints("spx_alibi/one", [1])], "spx_alibi/from_0"),
                                 self.mask], "spx_alibi/held_positions")
        positions = self.node("Unsqueeze", [self.node("Cast", [held], "spx_alibi/positions", to=ir.DataType.FLOAT),
                                            self.ints("spx_axes_1_2", [1, 2])], "spx_alibi/positions_4d")
        alibi = self.node("Mul", [positions, self.weight("spx_alibi/slopes", slopes.numpy().reshape(heads, 1, 1))],
                          "spx_alibi")
        return self.node("Add", [bias, alibi], "spx_attention_bias_alibi")
