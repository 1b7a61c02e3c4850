"""The frozen decoder as a graph with a KV cache, with the decoder-with-past ports:

  input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq],
  past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
  -> logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

The layer stacks direct.py knows are written directly; any other is traced by torch.onnx. This is the
core graph: the frozen model with the ports clients see, from which build.py derives every other graph.
These are the names and shapes of optimum-onnx's text-generation-with-past export, which spexport
used before; the prefix passes and every client read them. The wrapper calls the Hugging Face model
itself with the past as its cache, so the graph computes exactly what the model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from spexport.artifact.manifest import ModelInfo
from spexport.artifact.ports import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE
from spexport.export.decoder.direct import fused_counts, write_decoder
from spexport.export.transformers_api import cache_argument, seeded_cache, traceable_masks

OPSET = 17
POSITION_IDS = "position_ids"


class DecoderWithPast(torch.nn.Module):
    """One forward step over the caller's tokens, given the caller's past, flattened per layer."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.cache = model, cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = seeded_cache(past)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **{self.cache: cache})
        presents = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *presents)


@dataclass(frozen=True)
class CoreGraph:
    """The frozen model's graph as first written, with the ports above (build.py derives the artifact's graphs
    from it): where it is, whether it was written directly or traced, and the ONNX Runtime operators a directly
    written graph holds already (build.py then runs no fusion pass over it)."""

    path: Path
    written: bool
    fused: dict[str, int] = field(default_factory=dict)


def export_decoder(model: torch.nn.Module, info: ModelInfo, path: Path, direct: bool) -> CoreGraph:
    """Write the decoder-with-past graph of `model` (eval mode, float32) to `path`: directly (direct.py, which
    writes ONNX Runtime's fused operators) or, without `direct`, traced by torch.onnx in plain ONNX operators."""
    if direct:
        write_decoder(model, info, path)
        return CoreGraph(path, written=True, fused=fused_counts(info))
    # every dynamic axis its own size above 1, and a padded row, so no size or branch gets baked in
    batch, steps, past_len = 2, 3, 5
    mask = torch.ones(batch, past_len + steps, dtype=torch.int64)
    mask[0, :2] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past_len:]
    past = [torch.randn(batch, info.num_kv_heads, past_len, info.head_dim) for _ in range(2 * info.num_layers)]
    pasts = [name.format(i) for i in range(info.num_layers) for name in (PAST_KEY, PAST_VALUE)]
    presents = [name.format(i) for i in range(info.num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    rows = {0: "batch_size"}
    axes = {"input_ids": {**rows, 1: "sequence_length"},
            "attention_mask": {**rows, 1: "past_sequence_length + sequence_length"},
            POSITION_IDS: {**rows, 1: "sequence_length"}, "logits": {**rows, 1: "sequence_length"},
            **{name: {**rows, 2: "past_sequence_length"} for name in pasts},
            **{name: {**rows, 2: "past_sequence_length + sequence_length"} for name in presents}}
    ids = torch.randint(0, info.vocab_size, (batch, steps))
    # eval() here too: the exporter restores the wrapper's training flag, recursively, when it is done
    wrapper = DecoderWithPast(model).eval()
    with torch.no_grad(), traceable_masks():
        torch.onnx.export(wrapper, (ids, mask, positions, *past), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask", POSITION_IDS, *pasts],
                          output_names=["logits", *presents], dynamic_axes=axes)
    return CoreGraph(path, written=False)
