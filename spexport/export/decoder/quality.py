"""What `--quantize` adds to a decoder export: calibration feeds for GPTQ, and the drift report of the
quantized graph against the float32 one (export/drift.py), both run on the staged artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spexport.artifact.manifest import Manifest, ModelInfo, Task
from spexport.artifact.ports import KV_PREFIX, PAST_KEY, PAST_VALUE, PREFIX_MASK, TASK_IDS
from spexport.export import calibration, drift
from spexport.export.drift import REFERENCE
from spexport.families import DECODER


def calibration_feeds(tokenizer, info: ModelInfo, bank: dict[str, np.ndarray], baked: bool) -> list[dict]:
    """One graph feed per calibration text, each with the next task's prompt, from position 0."""
    longest = info.max_positions - max(kv.shape[-2] for kv in bank.values())
    feeds = []
    names = list(bank)
    for i, ids in enumerate(calibration.token_rows(tokenizer, calibration.TEXTS, info.vocab_size, longest)):
        task = i % len(names)
        feed = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
        if baked:
            feed[TASK_IDS] = np.array([task], np.int64)
        else:
            kv = bank[names[task]]
            feed[KV_PREFIX] = kv[None].astype(np.float32)
            feed[PREFIX_MASK] = np.ones((1, kv.shape[-2]), np.int64)
        empty = np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32)
        for layer in range(info.num_layers):
            feed[PAST_KEY.format(layer)] = feed[PAST_VALUE.format(layer)] = empty
        feeds.append(feed)
    return feeds


def measure_drift(staging: Path, graph: str, info: ModelInfo, tasks: list[Task], bank: str | None,
                  tokenizer) -> dict:
    """The drift record of the quantized graph `graph` against the float32 one under REFERENCE."""
    from spexport.runtime import DecoderModel
    from spexport.runtime.session import pick_providers

    def served(path: str):
        manifest = Manifest(family=DECODER.name, model=info, graph=path, prompt_bank=bank, tasks=tasks,
                            baked=bank is None)
        return drift.Served(DecoderModel(staging, manifest, pick_providers(None)))

    longest = info.max_positions - max(t.num_virtual_tokens for t in tasks) - drift.NEW_TOKENS
    rows = drift.prompt_rows(tokenizer, info.vocab_size, max(1, longest))
    reference, candidate = served(f"{REFERENCE}/{graph}"), served(graph)
    report = drift.decoder_drift(reference, candidate, [t.name for t in tasks], rows, info.eos_token_ids)
    return drift.as_record(report, "float32 graph", len(rows), drift.NEW_TOKENS)
