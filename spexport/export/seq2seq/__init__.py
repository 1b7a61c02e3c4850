"""`spexport convert` for encoder-decoder models: a frozen T5, mT5, BART or mBART + SEQ_2_SEQ_LM adapters.

The artifact holds two graphs in optimum-onnx's layout (graph.py) that every task shares, and a
prompt bank with each task's virtual-token embeddings (prompt tuning, P-tuning: fed to the
encoder) or decoder self-attention prefix (prefix tuning). Needs the `[export]` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spexport.artifact import tensorfile
from spexport.artifact.files import DECODER_GRAPH, ENCODER_GRAPH
from spexport.artifact.manifest import Manifest, ModelInfo
from spexport.converters.bank import bank_entry
from spexport.errors import ModelError
from spexport.export.common import (
    BANK,
    ExportOptions,
    building,
    convert_adapters,
    finish,
    pretrained,
    quiet_tracing,
    read_configs,
    read_model_type,
)
from spexport.export.seq2seq.graph import export_graphs
from spexport.families import NO_POSITION_LIMIT, SEQ2SEQ


@dataclass(frozen=True)
class Layout:
    """Where a model type keeps what the export needs, as config attribute names."""

    decoder_layers: str
    decoder_heads: str
    head_dim: str | None  # None: d_model // decoder_heads
    max_positions: str | None  # None: relative positions, no limit
    # the decoder's learned position embedding, which each row must index from its own prefix length
    decoder_positions: str | None


T5_LAYOUT = Layout("num_decoder_layers", "num_heads", "d_kv", None, None)
BART_LAYOUT = Layout("decoder_layers", "decoder_attention_heads", None, "max_position_embeddings",
                     "model.decoder.embed_positions")
LAYOUTS = {"t5": T5_LAYOUT, "mt5": T5_LAYOUT, "bart": BART_LAYOUT, "mbart": BART_LAYOUT}
assert set(LAYOUTS) == SEQ2SEQ.model_types


def convert(model_dir: Path, adapters: list[tuple[str, Path]], output: Path, options: ExportOptions) -> Manifest:
    """Export an encoder-decoder model with every adapter into one artifact at `output`, atomically."""
    from transformers import AutoModelForSeq2SeqLM

    model_type, _ = read_model_type(model_dir)
    layout = LAYOUTS[model_type]
    info = seq2seq_info(model_dir, *read_configs(model_dir, options.trust_remote_code), layout)
    options.on_step("converting adapters")
    prompts = convert_adapters(adapters, info, SEQ2SEQ, model_dir)  # every check before the model loads
    with building(output) as staging:
        options.on_step("loading the frozen model")
        # eager attention: it traces without data-dependent shortcuts
        model = pretrained(AutoModelForSeq2SeqLM, model_dir, options.trust_remote_code, attn_implementation="eager")
        entries = [bank_entry(name, p) for name, p in prompts.items()]
        tasks = [task for task, _ in entries]
        tensorfile.save({task.tensor: tensor for task, tensor in entries}, staging / BANK)
        options.on_step("exporting the frozen model to ONNX")
        with quiet_tracing():
            export_graphs(model, info.num_layers, info.num_kv_heads, info.head_dim, layout.decoder_positions, staging)
        return finish(staging, output, model_dir, family=SEQ2SEQ.name, model=info, graph=DECODER_GRAPH,
                      encoder_graph=ENCODER_GRAPH, prompt_bank=BANK, tasks=tasks,
                      ensembles=options.ensembles)


def seq2seq_info(model_dir: Path, config, generation_config, layout: Layout) -> ModelInfo:
    """The decoder's shape and the special tokens that generation needs, as transformers resolves them:
    generation_config.json first, then config.json; the decoder starts with bos when it names no start."""

    def token(name: str):
        value = getattr(generation_config, name, None)
        value = getattr(config, name, None) if value is None else value
        return [value] if isinstance(value, int) else value

    def within_vocab(ids) -> list[int]:
        return [i for i in ids or [] if 0 <= i < config.vocab_size]

    start = within_vocab(token("decoder_start_token_id") or token("bos_token_id"))
    if not start:
        raise ModelError(f"{model_dir}: the config names no decoder_start_token_id (nor bos_token_id) in the "
                         "vocabulary, so generation cannot start; set decoder_start_token_id in config.json")
    heads = getattr(config, layout.decoder_heads)
    pad, forced_bos = within_vocab(token("pad_token_id")), within_vocab(token("forced_bos_token_id"))
    # transformers forces every id of a forced_eos list; greedy decoding then picks the smallest
    forced_eos = sorted(within_vocab(token("forced_eos_token_id")))
    return ModelInfo(
        model_type=config.model_type,
        num_layers=getattr(config, layout.decoder_layers),
        num_kv_heads=heads,
        head_dim=getattr(config, layout.head_dim) if layout.head_dim else config.d_model // heads,
        hidden_size=config.d_model,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, layout.max_positions) if layout.max_positions else NO_POSITION_LIMIT,
        eos_token_ids=within_vocab(token("eos_token_id")),
        pad_token_id=pad[0] if pad else None,
        decoder_start_token_id=start[0],
        forced_bos_token_id=forced_bos[0] if forced_bos else None,
        forced_eos_token_id=forced_eos[0] if forced_eos else None,
    )
