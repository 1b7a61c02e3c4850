"""OPT's decoder-with-past graph, written directly from its modules' weights (direct.py dispatches here).

OPT's layer is GPT-2's (direct_gpt2.py: LayerNorm before attention and before the MLP, learned positions)
with separate q, k and v Linears, packed here into one MatMul, and a ReLU MLP. Its position table is
read from row 2 on, OPT's offset, as a view. Models with the norms after the blocks (OPT-350m) or with
projections in and out of the embedding width are traced.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.export.decoder.direct_gpt2 import Gpt2Writer
from spexport.export.decoder.writer import array

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset


def opt_builds(model, info: ModelInfo) -> bool:
    """Whether `model` is an OPT whose layer this module writes exactly (others are traced)."""
    config = model.config
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    return config.model_type == "opt" and decoder is not None and config.do_layer_norm_before and \
        decoder.final_layer_norm is not None and decoder.project_in is None and decoder.project_out is None and \
        config.activation_function == "relu" and getattr(config, "layer_norm_elementwise_affine", True) and \
        getattr(decoder.embed_positions, "offset", None) == POSITION_OFFSET


def opt_fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    return {"Attention": info.num_layers, "SkipLayerNormalization": 2 * info.num_layers}


class OptWriter(Gpt2Writer):
    """OPTForCausalLM's graph."""

    def write(self) -> ir.Model:
        decoder, heads = self.model.model.decoder, self.model.config.num_attention_heads
        bias = self.attention_biases([None] * self.info.num_layers)[None]
        tokens = self.node("Gather", [self.weight("decoder.embed_tokens.weight", array(decoder.embed_tokens.weight)),
                                      self.ids], "decoder.embed_tokens/Gather")
        table = array(decoder.embed_positions.weight)[POSITION_OFFSET:]
        places = self.node("Gather", [self.weight("decoder.embed_positions.weight", table), self.positions],
                           "decoder.embed_positions/Gather")
        x = self.node("Add", [tokens, places], "decoder/embeddings")
        first = decoder.layers[0].self_attn_layer_norm
        hidden = self.node("LayerNormalization", [x, *self.norm(first, "decoder.layers.0.self_attn_layer_norm")],
                           "decoder.layers.0.self_attn_layer_norm", axis=-1, epsilon=first.eps)
        for i, layer in enumerate(decoder.layers):
            name, attention = f"decoder.layers.{i}", layer.self_attn
            qkv = self.linear(hidden, [attention.q_proj, attention.k_proj, attention.v_proj], f"{name}.self_attn.qkv")
            q, k, v = self.node("Split", [qkv], f"{name}.self_attn/Split", outputs=3, axis=-1, num_outputs=3)
            out, key, value = self.node("Attention", [q, k, v, bias, *self.past(i)], f"{name}.self_attn/Attention",
                                        outputs=3, q_num_heads=heads, kv_num_heads=heads,
                                        scale=float(attention.scaling))
            self.present(i, key, value)
            attended = self.linear(out, [attention.out_proj], f"{name}.self_attn.out_proj", bias=False)
            hidden, x = self.skip_norm(x, attended, attention.out_proj, layer.final_layer_norm,
                                       f"{name}.final_layer_norm")
            up = self.node("Relu", [self.linear(hidden, [layer.fc1], f"{name}.fc1")], f"{name}/Relu")
            down = self.linear(up, [layer.fc2], f"{name}.fc2", bias=False)
            last = i + 1 == len(decoder.layers)
            norm, norm_name = (decoder.final_layer_norm, "decoder.final_layer_norm") if last else \
                (decoder.layers[i + 1].self_attn_layer_norm, f"decoder.layers.{i + 1}.self_attn_layer_norm")
            hidden, x = self.skip_norm(x, down, layer.fc2, norm, norm_name)
        return self.model_of(self.head(hidden, "decoder.embed_tokens.weight", decoder.embed_tokens))

    def linear(self, x: ir.Value, modules, name: str, bias: bool = True) -> ir.Value:
        """x @ W.T (+ b) for Linears packed along their outputs; `bias=False` leaves the bias to the next node."""
        weight = array(modules[0].weight).T if len(modules) == 1 else np.concatenate([array(m.weight)
                                                                                       for m in modules]).T
        y = self.node("MatMul", [x, self.weight(f"{name}.weight", weight)], f"{name}/MatMul")
        if not bias:
            return y
        values = np.concatenate([array(m.bias) for m in modules])
        return self.node("Add", [y, self.weight(f"{name}.bias", values)], f"{name}/Add")
