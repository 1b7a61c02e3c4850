"""PREFIX_TUNING (and P-tuning v2): per-layer keys and values.

With `prefix_projection` PEFT saves the projection's output, so both variants store
[n_virtual, layers * 2 * kv_heads * head_dim], laid out as PEFT's `get_prompt` reads it.
"""

from __future__ import annotations

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import PrefixConfig, SoftPrompt, check_fits, prompt_weights
from spexport.converters.registry import register_method
from spexport.errors import AdapterError
from spexport.families import DECODER, ENCODER


def convert(config: PrefixConfig, weights: dict[str, np.ndarray], model: ModelInfo) -> SoftPrompt:
    if config.submodules != 1:
        raise AdapterError("prefix tuning with two transformer submodules is for encoder-decoder models")
    flat = prompt_weights(config, weights)
    n_virtual = flat.shape[0]
    check_fits("number of layers", config.num_layers, model.num_layers)
    check_fits("number of key/value heads", config.num_attention_heads, model.num_kv_heads)
    check_fits("head size", config.token_dim // config.num_attention_heads, model.head_dim)
    check_fits("prefix width", flat.shape[1], model.num_layers * 2 * model.num_kv_heads * model.head_dim)
    # PEFT: view(n, layers*2, heads, head_dim).permute(2, 0, 3, 1, 4) -> [layers*2, heads, n, head_dim]
    kv = flat.reshape(n_virtual, model.num_layers * 2, model.num_kv_heads, model.head_dim).transpose(1, 2, 0, 3)
    kv = kv.reshape(model.num_layers, 2, model.num_kv_heads, n_virtual, model.head_dim)
    return SoftPrompt(config.peft_type, "kv", np.ascontiguousarray(kv, dtype=np.float32))


register_method("PREFIX_TUNING", PrefixConfig, convert, families=(DECODER, ENCODER))
