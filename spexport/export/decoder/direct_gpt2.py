"""GPT-2's decoder-with-past graph, written directly from its modules' weights (direct.py dispatches here).

GPT-2's layer differs from Llama's in its norms (LayerNorm with a bias), its positions (a learned table
indexed by position_ids, added to the token embedding) and its weights (Conv1D: stored [in, out], so
they reach the file as they are, and c_attn packs q, k and v already). Per layer: the QKV MatMul and
its bias, a Split, one ONNX Attention (the past joined inside it), the output MatMul, two
SkipLayerNormalization (which also add the output projections' biases), and the MLP's two MatMuls
around one FastGelu (GeLU-tanh with the first projection's bias).
"""

from __future__ import annotations

import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.export.decoder.writer import MS, GraphWriter, array

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def gpt2_builds(model, info: ModelInfo) -> bool:
    """Whether `model` is a GPT-2 whose layer this module writes exactly (others are traced)."""
    config = model.config
    return config.model_type == "gpt2" and config.activation_function in ACTIVATIONS and \
        not getattr(config, "add_cross_attention", False) and not config.scale_attn_by_inverse_layer_idx and \
        not config.reorder_and_upcast_attn and hasattr(model, "transformer") and hasattr(model, "lm_head")


def gpt2_fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators the graph holds, as build.py's fusion counts name them."""
    return {"Attention": info.num_layers, "SkipLayerNormalization": 2 * info.num_layers, "FastGelu": info.num_layers}


class Gpt2Writer(GraphWriter):
    """GPT2LMHeadModel's graph."""

    def write(self) -> ir.Model:
        body = self.model.transformer
        bias = self.attention_biases([None] * self.info.num_layers)[None]
        tokens = self.node("Gather", [self.weight("transformer.wte.weight", array(body.wte.weight)), self.ids],
                           "transformer.wte/Gather")
        places = self.node("Gather", [self.weight("transformer.wpe.weight", array(body.wpe.weight)), self.positions],
                           "transformer.wpe/Gather")
        x = self.node("Add", [tokens, places], "transformer/embeddings")
        first = body.h[0].ln_1
        hidden = self.node("LayerNormalization", [x, *self.norm(first, "transformer.h.0.ln_1")], "transformer.h.0.ln_1",
                           axis=-1, epsilon=first.eps)
        for i, block in enumerate(body.h):
            name = f"transformer.h.{i}"
            attention, mlp = block.attn, block.mlp
            qkv = self.node("Add", [self.conv1d(hidden, attention.c_attn, f"{name}.attn.c_attn"),
                                    self.weight(f"{name}.attn.c_attn.bias", array(attention.c_attn.bias))],
                            f"{name}.attn.c_attn/Add")
            q, k, v = self.node("Split", [qkv], f"{name}.attn/Split", outputs=3, axis=-1, num_outputs=3)
            heads = self.model.config.n_head
            out, key, value = self.node("Attention", [q, k, v, bias, *self.past(i)], f"{name}.attn/Attention",
                                        outputs=3, q_num_heads=heads, kv_num_heads=heads,
                                        scale=float(attention.scaling))
            self.present(i, key, value)
            attended = self.conv1d(out, attention.c_proj, f"{name}.attn.c_proj")
            hidden, x = self.skip_norm(x, attended, attention.c_proj, block.ln_2, f"{name}.ln_2")
            up = self.node("FastGelu", [self.conv1d(hidden, mlp.c_fc, f"{name}.mlp.c_fc"),
                                        self.weight(f"{name}.mlp.c_fc.bias", array(mlp.c_fc.bias))],
                           f"{name}.mlp/FastGelu", domain=MS)
            down = self.conv1d(up, mlp.c_proj, f"{name}.mlp.c_proj")
            last = i + 1 == len(body.h)
            norm, norm_name = (body.ln_f, "transformer.ln_f") if last else (body.h[i + 1].ln_1,
                                                                            f"transformer.h.{i + 1}.ln_1")
            hidden, x = self.skip_norm(x, down, mlp.c_proj, norm, norm_name)
        return self.model_of(self.head(hidden, "transformer.wte.weight", body.wte))

    def conv1d(self, x: ir.Value, conv, name: str) -> ir.Value:
        """x @ W for a Conv1D, whose weight is stored [in, out] (its bias is added by the node after)."""
        return self.node("MatMul", [x, self.weight(f"{name}.weight", array(conv.weight))], f"{name}/MatMul")

    def norm(self, norm, name: str) -> tuple[ir.Value, ir.Value]:
        return self.weight(f"{name}.weight", array(norm.weight)), self.weight(f"{name}.bias", array(norm.bias))

    def skip_norm(self, x: ir.Value, delta: ir.Value, conv, norm, name: str) -> tuple[ir.Value, ir.Value]:
        """(LayerNorm(x + delta + conv's bias), x + delta + conv's bias) in one kernel."""
        outputs = self.node("SkipLayerNormalization", [x, delta, *self.norm(norm, name),
                                                       self.weight(f"{name}.skip_bias", array(conv.bias))],
                            name, outputs=4, domain=MS, epsilon=norm.eps)
        return outputs[0], outputs[3]

    def head(self, hidden: ir.Value, table_name: str, embedding) -> ir.Value:
        """The LM head. Tied to the token embedding (`embedding`, written as `table_name`), it reads that table
        through a Transpose (as a traced graph does, which quantize.py recognises), so the file holds it once."""
        head, table = self.model.lm_head, self.initializers[table_name]
        if head.weight.data_ptr() == embedding.weight.data_ptr():
            weight = self.node("Transpose", [table], "lm_head/Transpose", perm=[1, 0])
        else:
            weight = self.weight("lm_head.weight", array(head.weight).T)
        return self.node("MatMul", [hidden, weight], "lm_head/MatMul")
