"""`genai_config.json`: the decoder artifact described for onnxruntime-genai, so `og.Model(folder)` opens it.

genai maps its logical inputs to graph names through this file (`past_key_names: "past_key_values.%d.key"`),
so it drives spexport's graph by the graph's own names. A task is one of the artifact's adapter files,
loaded with genai's Adapters API: it feeds `kv_prefix` and `prefix_mask` as the graph adds the prefix
itself. genai must not share past and present buffers: the graph's present holds the caller's tokens only.
"""

from __future__ import annotations

import json
from pathlib import Path

from spexport.artifact.manifest import ModelInfo
from spexport.artifact.ports import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

GENAI_CONFIG = "genai_config.json"
# genai's model types whose graphs have per-layer past_key_values.%d.key/.value; its "gpt2" type expects one
# combined past per layer, and every spexport decoder graph has the same ports, so the others run as "llama"
GENAI_TYPES = ("llama", "mistral", "qwen2")


def genai_config(info: ModelInfo, graph: str, bos_token_id: int | None) -> dict:
    eos, pad = info.eos_token_ids, info.padding_token
    return {
        "model": {
            "bos_token_id": bos_token_id if bos_token_id is not None else pad,
            "context_length": info.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph,
                "head_size": info.head_dim,
                "hidden_size": info.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_KEY.replace("{}", "%d"),
                           "past_value_names": PAST_VALUE.replace("{}", "%d")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY.replace("{}", "%d"),
                            "present_value_names": PRESENT_VALUE.replace("{}", "%d")},
                "num_attention_heads": info.hidden_size // info.head_dim,
                "num_hidden_layers": info.num_layers,
                "num_key_value_heads": info.num_kv_heads,
            },
            # genai stops at any of these; with none, generation runs to max_length
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "type": info.model_type if info.model_type in GENAI_TYPES else "llama",
            "vocab_size": info.vocab_size,
        },
        "search": {"do_sample": False, "max_length": info.max_positions, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai_config(folder: Path, info: ModelInfo, graph: str, model_config: Path) -> str:
    """Write GENAI_CONFIG into `folder`; the model's config.json (at `model_config`) gives its BOS token."""
    try:
        bos = json.loads(model_config.read_text()).get("bos_token_id")
    except (OSError, ValueError):
        bos = None
    bos = bos[0] if isinstance(bos, list) and bos else bos
    bos = bos if isinstance(bos, int) and 0 <= bos < info.vocab_size else None
    (folder / GENAI_CONFIG).write_text(json.dumps(genai_config(info, graph, bos), indent=2) + "\n")
    return GENAI_CONFIG
