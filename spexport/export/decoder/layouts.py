"""The decoder layers direct.py writes, described as data: one Layout per model type.

Every layout is the Llama layer (rotary attention with grouped KV heads, a gated MLP, RMS norms)
with some of its known variations switched on; the numbers they carry (multipliers, soft caps,
windows) are read from the model's config when the graph is written. A model type without a layout
here, or a model whose config asks for something its layout does not describe (rope tables that
change with the length, partial rotary, another activation), is traced instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from spexport.artifact.manifest import ModelInfo

STATIC_ROPE = ("default", "linear", "llama3")  # rope types whose tables do not change with the length
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclass(frozen=True)
class Layout:
    """How one model type's layer differs from Llama's."""

    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (offset + weight)
    qk_norm: str | None = None  # "head": RMSNorm over each head of q and k (Qwen3); "projection": over all (OLMo 2)
    pre_norms: bool = True  # OLMo 2 has none: its norms follow attention and the MLP
    post_norms: bool = False  # Gemma 2, OLMo 2: a norm on attention's and the MLP's outputs before the residual
    packed: bool = False  # Phi-3: qkv_proj and gate_up_proj hold the projections already packed
    windows: bool = False  # Gemma 2: its config's layer_types name the sliding-window layers


LAYOUTS = {
    "llama": Layout(), "mistral": Layout(), "qwen2": Layout(),
    "qwen3": Layout(qk_norm="head"),
    "granite": Layout(),  # its multipliers are read from the config (Writer.multipliers)
    "phi3": Layout(packed=True),
    "gemma": Layout(norm_offset=1.0),
    "gemma2": Layout(norm_offset=1.0, post_norms=True, windows=True),
    "olmo2": Layout(qk_norm="projection", pre_norms=False, post_norms=True),
}


def activation(config) -> str | None:
    """The MLP's gate activation as the writer names it; None when it writes no such activation."""
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    return ACTIVATIONS.get(name)


def windows(config, layout: Layout) -> list[int | None]:
    """Each layer's sliding window (None: full attention)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [config.sliding_window if layout.windows and kind == "sliding_attention" else None for kind in types]


def layout_for(model, info: ModelInfo) -> Layout | None:
    """The layout direct.py writes `model` with, or None when it is traced."""
    config, layout = model.config, LAYOUTS.get(model.config.model_type)
    if layout is None or activation(config) is None or (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return None
    if info.sliding_window is not None and not layout.windows:
        return None
    if layout.windows and set(getattr(config, "layer_types", None) or ()) - {"sliding_attention", "full_attention"}:
        return None
    body = getattr(model, "model", None)
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE or \
            2 * rotary.inv_freq.numel() != info.head_dim:  # partial rotary
        return None
    attention, mlp = body.layers[0].self_attn, body.layers[0].mlp
    projections = ("qkv_proj",) if layout.packed else ("q_proj", "k_proj", "v_proj")
    mlp_parts = ("gate_up_proj", "down_proj") if layout.packed else ("gate_proj", "up_proj", "down_proj")
    if not all(hasattr(attention, name) for name in (*projections, "o_proj", "scaling")) or \
            not all(hasattr(mlp, name) for name in mlp_parts):
        return None
    return layout if (layout.qk_norm is not None) == hasattr(attention, "q_norm") else None


def fused_counts(info: ModelInfo) -> dict[str, int]:
    """The ONNX Runtime operators a written graph of `info`'s model type holds, as build.py's fusion
    counts name them (a layer without pre-norms joins its attention's residual with a plain Add)."""
    layers, layout = info.num_layers, LAYOUTS[info.model_type]
    return {"Attention": layers, "RotaryEmbedding": 2 * layers,
            "SkipSimplifiedLayerNormalization": (2 if layout.pre_norms else 1) * layers}
