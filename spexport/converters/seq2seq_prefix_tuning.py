"""PREFIX_TUNING for encoder-decoder models (PEFT task type SEQ_2_SEQ_LM).

PEFT saves [n_virtual, num_layers * 2 * token_dim], one row per virtual token, and at run time
(`PeftModel.get_prompt` with num_transformer_submodules=2) views it as
(n, num_layers * 2, heads, head_dim), concatenates it with itself along the layer axis, permutes
to [num_layers * 4, heads, n, head_dim] and splits that into chunks of 4: chunk i is decoder layer
i's (self key, self value, cross key, cross value). It then empties the cross-attention cache, so
only the decoder's self-attention gets a prefix and the encoder none. Because of the
concatenation, chunk i holds the trained rows 4i..4i+3 modulo 2 * num_layers, not layer i's own
keys and values; the same tensor operations are replayed here rather than second-guessed.
"""

from __future__ import annotations

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import PrefixConfig, SoftPrompt, check_fits, float_tensor
from spexport.converters.registry import register_method
from spexport.errors import AdapterError
from spexport.families import SEQ2SEQ


def convert(config: PrefixConfig, weights: dict[str, np.ndarray], model: ModelInfo) -> SoftPrompt:
    if config.submodules != 2:
        raise AdapterError("this prefix-tuning adapter was trained for a decoder-only model "
                           "(num_transformer_submodules=1); train it with task_type SEQ_2_SEQ_LM")
    if "prompt_embeddings" not in weights:
        raise AdapterError(f"no 'prompt_embeddings' tensor (found {sorted(weights)[:5]})")
    flat = float_tensor("prompt_embeddings", weights["prompt_embeddings"])
    n_virtual, layers = config.num_virtual_tokens, config.num_layers
    heads, token_dim = config.num_attention_heads, config.token_dim
    if flat.ndim != 2 or flat.shape[0] != n_virtual:
        raise AdapterError(f"prompt_embeddings has shape {list(flat.shape)}, expected [{n_virtual}, ...] for "
                           f"num_virtual_tokens={n_virtual}")
    check_fits("number of attention heads", heads, model.num_kv_heads)
    head_dim = token_dim // heads
    if head_dim != model.head_dim:
        raise AdapterError(f"token_dim {token_dim} / num_attention_heads {heads} is not the model's head size "
                           f"{model.head_dim} (PEFT cannot run this adapter either); train with token_dim="
                           f"{heads * model.head_dim}")
    check_fits("prefix width", flat.shape[1], layers * 2 * heads * head_dim)
    if layers < model.num_layers:
        raise AdapterError(f"num_layers {layers} gives fewer prefix layers than the decoder's {model.num_layers} "
                           "(PEFT cannot run this adapter either)")
    kv = flat.reshape(n_virtual, layers * 2, heads, head_dim)
    kv = np.concatenate([kv, kv], axis=1).transpose(1, 2, 0, 3)  # [layers * 4, heads, n, head_dim]
    chunks = kv.reshape(layers, 4, heads, n_virtual, head_dim)
    return SoftPrompt(config.peft_type, "kv", np.ascontiguousarray(chunks[:model.num_layers, :2]))


register_method("PREFIX_TUNING", PrefixConfig, convert, families=(SEQ2SEQ,))
