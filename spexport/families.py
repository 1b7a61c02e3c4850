"""Model families described as data: how to read a config, which task to export, what is tested.

The runtime never branches on model_type; everything it needs is written into the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from spexport.errors import ModelError
from spexport.manifest import ModelInfo


@dataclass(frozen=True)
class Family:
    name: str
    optimum_task: str | None  # None: spexport traces the graph itself
    model_types: frozenset[str]  # verified against PEFT in tests/
    positions_after_pad: frozenset[str] = frozenset()  # model types counting positions from pad_token_id + 1


DECODER = Family("decoder", "text-generation-with-past", frozenset({"gpt2", "llama", "qwen2", "mistral"}))
# SEQ_CLS / TOKEN_CLS classifiers whose transformers class takes inputs_embeds (export_encoder.py).
ENCODER = Family("encoder", None, frozenset({"bert", "roberta", "distilbert"}),
                 positions_after_pad=frozenset({"roberta"}))
# SEQ_2_SEQ_LM encoder-decoder models (export_seq2seq.py describes each model type's layout).
SEQ2SEQ = Family("seq2seq", None, frozenset({"t5", "bart"}))
FAMILIES = [DECODER, ENCODER, SEQ2SEQ]


def family_for(config) -> Family:
    for family in FAMILIES:
        if config.model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise ModelError(f"model type {config.model_type!r} is not supported; spexport exports {supported}")


def model_info(config, generation_config) -> ModelInfo:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = config.eos_token_id if eos is None else eos
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = getattr(generation_config, "pad_token_id", None)
    pad = getattr(config, "pad_token_id", None) if pad is None else pad
    return ModelInfo(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        eos_token_ids=eos,
        pad_token_id=pad,
    )
