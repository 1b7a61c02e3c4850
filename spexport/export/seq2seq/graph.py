"""Export an encoder-decoder model (T5, mT5, BART, mBART) as optimum-onnx lays it out, with spexport's prompt inputs.

Two graphs, named as optimum-onnx names them:
  encoder_model.onnx          input_ids, attention_mask                  -> last_hidden_state
  decoder_model_merged.onnx   input_ids, encoder_attention_mask, encoder_hidden_states,
                              past_key_values.{i}.{decoder,encoder}.{key,value}, use_cache_branch
                              -> logits, present.{i}.{decoder,encoder}.{key,value}
The merged decoder joins a decoder without past (first step: it computes the cross-attention keys
and values) and one with past (later steps) under one If node (merge.py), weights stored once.

spexport adds, so that a client never sees virtual tokens:
  encoder  prompt_embeds [batch, P, hidden], prompt_mask [batch, P]: each row's virtual-token
           embeddings (prompt tuning, P-tuning), left-padded to the batch's longest. Inside the graph
           a row becomes [its prompt, its tokens, padding] whatever the padding it came with, so
           learned absolute positions (BART) count as PEFT counts them for the row alone. The
           encoder also returns that layout's mask, `encoder_attention_mask`, which the decoder's
           cross-attention takes.
  decoder  kv_prefix [batch, layers, 2, heads, P, head_dim], prefix_mask [batch, P]: each row's
           self-attention prefix (prefix tuning), left-padded; `present.*.decoder.*` hold the
           caller's tokens only. A row's decoder positions start after its own prefix.
The wrappers below call the Hugging Face model itself, so the graph computes exactly what it does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from spexport.artifact.files import DECODER_GRAPH, ENCODER_GRAPH
from spexport.artifact.ports import (
    CACHE_PAST,
    CACHE_PRESENT,
    ENCODER_MASK,
    ENCODER_STATES,
    KV_PREFIX,
    PREFIX_MASK,
    PROMPT_EMBEDS,
    PROMPT_MASK,
    USE_CACHE_BRANCH,
    cache_names,
)
from spexport.export.passes.float16 import PROTOBUF_LIMIT
from spexport.export.seq2seq.merge import merge_decoders
from spexport.export.transformers_api import cache_argument

OPSET = 17


class RowPositions(torch.nn.Module):
    """A learned position embedding that takes each row's positions from `self.positions`.

    The decoder's own embedding counts from the cache length, the same for every row; a row with
    a shorter prefix than the batch's longest must count from its own prefix length instead."""

    def __init__(self, original: torch.nn.Embedding):
        super().__init__()
        self.weight = original.weight
        self.offset = getattr(original, "offset", 0)
        self.positions: torch.Tensor | None = None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.nn.functional.embedding(self.positions + self.offset, self.weight)


class EncoderWithPrompt(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.encoder = model.get_encoder()
        # what PEFT takes as word_embeddings (BART's includes embed_scale); the encoder's own for tied models
        self.embed_tokens = model.get_input_embeddings()

    def forward(self, input_ids, attention_mask, prompt_embeds, prompt_mask):
        tokens = self.embed_tokens(input_ids)
        embeds = torch.cat([prompt_embeds, tokens], dim=1)
        mask = torch.cat([prompt_mask, attention_mask], dim=1)
        # compaction: each row's real slots (virtual tokens, then its tokens) to the front in order,
        # padding behind them, so positions count as they do for the row alone
        n_real = mask.sum(dim=1, keepdim=True)
        order = torch.where(mask == 1, mask.cumsum(dim=1) - 1, n_real + (1 - mask).cumsum(dim=1) - 1)
        hidden_size = embeds.shape[2]
        compact = torch.zeros_like(embeds).scatter(1, order.unsqueeze(2).expand(-1, -1, hidden_size), embeds)
        slots = torch.arange(embeds.shape[1], dtype=torch.int64).unsqueeze(0)
        mask = (slots < n_real).to(torch.int64)
        hidden = self.encoder(inputs_embeds=compact, attention_mask=mask, return_dict=True).last_hidden_state
        return hidden, mask


class DecoderWithPrefix(torch.nn.Module):
    """One decoder step; with_past: the caller's self-attention cache and the cross-attention cache
    come in as inputs, else the cross-attention keys and values are computed and returned."""

    def __init__(self, model, layers: int, row_positions: RowPositions | None, with_past: bool):
        super().__init__()
        self.model, self.layers, self.row_positions, self.with_past = model, layers, row_positions, with_past

    def forward(self, input_ids, encoder_attention_mask, encoder_hidden_states, kv_prefix, prefix_mask, *past):
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        batch, steps = input_ids.shape
        n_prefix = kv_prefix.shape[4]
        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i in range(self.layers):
            key, value = kv_prefix[:, i, 0], kv_prefix[:, i, 1]
            if self.with_past:
                key = torch.cat([key, past[4 * i]], dim=2)
                value = torch.cat([value, past[4 * i + 1]], dim=2)
                cross_cache.update(past[4 * i + 2], past[4 * i + 3], i)
            self_cache.update(key, value, i)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        past_len = past[0].shape[2] if self.with_past else 0
        caller = torch.ones(batch, past_len + steps, dtype=prefix_mask.dtype, device=prefix_mask.device)
        if self.row_positions is not None:
            start = prefix_mask.sum(dim=1, keepdim=True) + past_len
            self.row_positions.positions = start + torch.arange(steps, device=input_ids.device)[None]
        out = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=input_ids, decoder_attention_mask=torch.cat([prefix_mask, caller], dim=1),
                         use_cache=True, return_dict=True, **{cache_argument(self.model): cache})
        presents = []
        for i in range(self.layers):
            layer = cache.self_attention_cache.layers[i]
            presents += [layer.keys[:, :, n_prefix:], layer.values[:, :, n_prefix:]]
            if not self.with_past:
                cross = cache.cross_attention_cache.layers[i]
                presents += [cross.keys, cross.values]
        return (out.logits, *presents)


def _dummy(model, layers: int, heads: int, head_dim: int, hidden: int) -> dict[str, torch.Tensor]:
    """Trace inputs whose every dynamic axis has its own size above 1, so no size gets baked in."""
    batch, prompt, enc, prefix, past, steps = 2, 3, 7, 4, 5, 6
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    prefix_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    return {
        "input_ids": torch.randint(4, model.config.vocab_size, (batch, enc - prompt)),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        PROMPT_EMBEDS: torch.randn(batch, prompt, hidden), PROMPT_MASK: prompt_mask,
        "decoder_input_ids": torch.randint(4, model.config.vocab_size, (batch, steps)),
        ENCODER_MASK: torch.tensor([[1] * (enc - 1) + [0], [1] * enc]),
        ENCODER_STATES: torch.randn(batch, enc, hidden),
        KV_PREFIX: torch.randn(batch, layers, 2, heads, prefix, head_dim), PREFIX_MASK: prefix_mask,
        "self_past": torch.randn(batch, heads, past, head_dim), "cross_past": torch.randn(batch, heads, enc, head_dim),
    }


def export_graphs(model, layers: int, heads: int, head_dim: int, decoder_positions: str | None, out: Path) -> None:
    """Write ENCODER_GRAPH and DECODER_GRAPH for `model` (eager attention, eval mode) into `out`.

    decoder_positions: the path of the decoder's learned position embedding, if it has one; it is
    replaced by RowPositions while the decoder is traced."""
    if decoder_positions is None:
        _export(model, layers, heads, head_dim, None, out)
        return
    owner_path, _, attr = decoder_positions.rpartition(".")
    owner = model.get_submodule(owner_path)
    original = getattr(owner, attr)
    setattr(owner, attr, RowPositions(original))
    try:
        _export(model, layers, heads, head_dim, getattr(owner, attr), out)
    finally:
        setattr(owner, attr, original)


def _export(model, layers: int, heads: int, head_dim: int, positions: RowPositions | None, out: Path) -> None:
    d = _dummy(model, layers, heads, head_dim, model.config.d_model)
    batch = {0: "batch_size"}
    with torch.no_grad():
        torch.onnx.export(
            EncoderWithPrompt(model).eval(), (d["input_ids"], d["attention_mask"], d[PROMPT_EMBEDS], d[PROMPT_MASK]),
            str(out / ENCODER_GRAPH), dynamo=False, opset_version=OPSET,
            input_names=["input_ids", "attention_mask", PROMPT_EMBEDS, PROMPT_MASK],
            output_names=["last_hidden_state", ENCODER_MASK],
            dynamic_axes={"input_ids": {**batch, 1: "encoder_sequence_length"},
                          "attention_mask": {**batch, 1: "encoder_sequence_length"},
                          PROMPT_EMBEDS: {**batch, 1: "prompt_length"}, PROMPT_MASK: {**batch, 1: "prompt_length"},
                          "last_hidden_state": {**batch, 1: "encoder_prompt_sequence_length"},
                          ENCODER_MASK: {**batch, 1: "encoder_prompt_sequence_length"}})
        decoder_inputs = ["input_ids", ENCODER_MASK, ENCODER_STATES, KV_PREFIX, PREFIX_MASK]
        shared_axes = {"input_ids": {**batch, 1: "decoder_sequence_length"},
                       ENCODER_MASK: {**batch, 1: "encoder_sequence_length"},
                       ENCODER_STATES: {**batch, 1: "encoder_sequence_length"},
                       KV_PREFIX: {**batch, 4: "prefix_length"}, PREFIX_MASK: {**batch, 1: "prefix_length"},
                       "logits": {**batch, 1: "decoder_sequence_length"}}
        args = (d["decoder_input_ids"], d[ENCODER_MASK], d[ENCODER_STATES], d[KV_PREFIX], d[PREFIX_MASK])
        with tempfile.TemporaryDirectory() as raw:
            raw = Path(raw)
            presents = cache_names(CACHE_PRESENT, layers)
            torch.onnx.export(
                DecoderWithPrefix(model, layers, positions, with_past=False).eval(), args, str(raw / "decoder.onnx"),
                dynamo=False, opset_version=OPSET, input_names=decoder_inputs, output_names=["logits", *presents],
                dynamic_axes={**shared_axes, **{n: {**batch, 2: "decoder_sequence_length" if ".decoder." in n
                                                    else "encoder_sequence_length"} for n in presents}})
            pasts = cache_names(CACHE_PAST, layers)
            self_presents = cache_names(CACHE_PRESENT, layers, parts=("decoder",))
            past_args = [d["self_past"] if ".decoder." in n else d["cross_past"] for n in pasts]
            torch.onnx.export(
                DecoderWithPrefix(model, layers, positions, with_past=True).eval(), (*args, *past_args),
                str(raw / "decoder_with_past.onnx"), dynamo=False, opset_version=OPSET,
                input_names=decoder_inputs + pasts, output_names=["logits", *self_presents],
                dynamic_axes={**shared_axes,
                              **{n: {**batch, 2: "past_decoder_sequence_length" if ".decoder." in n
                                     else "encoder_sequence_length"} for n in pasts},
                              **{n: {**batch, 2: "past_decoder_sequence_length + decoder_sequence_length"}
                                 for n in self_presents}})
            # the cross-attention cache is computed on the first step; later steps pass it back unchanged
            cross = {present: past for past, present in zip(pasts, presents) if ".encoder." in present}
            # with their weights (onnx.load reads external data too): the traced files go with the temporary folder
            no_past, with_past = (ir.from_proto(onnx.load(raw / name)) for name in ("decoder.onnx",
                                                                                   "decoder_with_past.onnx"))
            merged = ir.to_proto(merge_decoders(no_past, with_past, USE_CACHE_BRANCH, cross))
            large = merged.ByteSize() > PROTOBUF_LIMIT
            if not large:
                onnx.checker.check_model(merged)
            onnx.save(merged, out / DECODER_GRAPH, save_as_external_data=large, location=DECODER_GRAPH + ".data")
