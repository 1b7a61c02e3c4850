"""Serving an encoder-decoder artifact (T5, BART): the encoder once per batch, then the decoder step
by step with its cache, many tasks in one batch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from spexport.artifact.integrity import inside_folder
from spexport.artifact.manifest import Manifest
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
    stack_prefixes,
)
from spexport.errors import ArtifactError, InputError
from spexport.families import SEQ2SEQ
from spexport.runtime import inputs
from spexport.runtime.base import EMBEDDINGS, KV, Batch, finite_logits, prompt_kind
from spexport.runtime.generation import GeneratingModel, GenerationConfig
from spexport.runtime.session import check_ports, load_bank, open_session


class Seq2SeqModel(GeneratingModel):
    """A frozen encoder-decoder model plus a bank of per-task prompts: virtual-token embeddings for
    the encoder (prompt tuning, P-tuning) or self-attention KV prefixes for the decoder (prefix tuning)."""

    family = SEQ2SEQ
    PAD_TEXT_LEFT = False
    PADDING_TAKES_POSITIONS = False  # the encoder lays each row out as [virtual tokens, its tokens, padding]

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE):
        super().__init__(folder, manifest, max_batch_size)
        info = self.info
        self._start = _token(folder, "decoder_start_token_id", info.decoder_start_token_id, info.vocab_size)
        self._forced_bos = _token(folder, "forced_bos_token_id", info.forced_bos_token_id, info.vocab_size, None)
        self._forced_eos = _token(folder, "forced_eos_token_id", info.forced_eos_token_id, info.vocab_size, None)
        bank = load_bank(folder, manifest)
        kinds = [prompt_kind(folder, t) for t in manifest.tasks]
        prompts = [bank[t.tensor] for t in manifest.tasks]
        # a task feeds the encoder ([n, hidden] embeddings) or the decoder ([layers, 2, heads, n, head_dim])
        empty_embeds = np.zeros((0, info.hidden_size), np.float32)
        self._embeds = [p if kind == EMBEDDINGS else empty_embeds for p, kind in zip(prompts, kinds)]
        empty_kv = np.zeros((info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32)
        self._kv = [p if kind == KV else empty_kv for p, kind in zip(prompts, kinds)]
        self._positions_taken = [len(e) for e in self._embeds]  # a KV prefix takes decoder positions instead
        self._past = cache_names(CACHE_PAST, info.num_layers)
        self._present = cache_names(CACHE_PRESENT, info.num_layers)
        self._encoder_graph = self._graph_path(manifest.encoder_graph, "encoder_graph")
        self._decoder_graph = self._graph_path(manifest.graph, "graph")
        self.encoder = open_session(self._encoder_graph, providers)
        self.decoder = open_session(self._decoder_graph, providers)
        check_ports(self.encoder, self._encoder_graph, *self._encoder_ports())
        check_ports(self.decoder, self._decoder_graph, *self._decoder_ports())
        self.providers = self.decoder.get_providers()

    def _graph_path(self, rel: str | None, field: str) -> Path:
        if not rel or rel not in self.manifest.files:
            raise ArtifactError(f"{self.folder}: field {field} must name a graph listed in files, got {rel!r}")
        return inside_folder(self.folder, rel)

    def _encoder_ports(self) -> tuple[dict[str, list], dict[str, list]]:
        hidden = self.info.hidden_size
        return ({"input_ids": [None, None], "attention_mask": [None, None], PROMPT_EMBEDS: [None, None, hidden],
                 PROMPT_MASK: [None, None]},
                {"last_hidden_state": [None, None, hidden], ENCODER_MASK: [None, None]})

    def _decoder_ports(self) -> tuple[dict[str, list], dict[str, list]]:
        info = self.info
        kv = [None, info.num_kv_heads, None, info.head_dim]
        return ({"input_ids": [None, None], ENCODER_MASK: [None, None], ENCODER_STATES: [None, None, info.hidden_size],
                 KV_PREFIX: [None, info.num_layers, 2, info.num_kv_heads, None, info.head_dim],
                 PREFIX_MASK: [None, None], USE_CACHE_BRANCH: [1], **dict.fromkeys(self._past, kv)},
                {"logits": [None, None, info.vocab_size], **dict.fromkeys(self._present, kv)})

    # -- running the graphs ---------------------------------------------------------------------

    def _encode(self, ids: np.ndarray, mask: np.ndarray, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's states and mask, each row laid out as [virtual tokens, its tokens, padding]."""
        embeds, prompt_mask = stack_prefixes([self._embeds[r] for r in rows], axis=0, min_slots=1)
        return self._run(self.encoder, self._encoder_graph, ["last_hidden_state", ENCODER_MASK],
                         {"input_ids": ids, "attention_mask": mask, PROMPT_EMBEDS: embeds, PROMPT_MASK: prompt_mask})

    def _decode(self, step_ids, encoded, prefix, cache) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder step. `cache` is None on the first step (the graph then computes the
        cross-attention cache), else the previous step's cache; returns logits and the new cache."""
        hidden, encoder_mask = encoded
        if cache is None:
            shape = (len(step_ids), self.info.num_kv_heads, 0, self.info.head_dim)
            past = [np.zeros(shape, np.float32)] * len(self._past)
        else:
            past = cache
        feeds = {"input_ids": step_ids, ENCODER_MASK: encoder_mask, ENCODER_STATES: hidden, **prefix,
                 USE_CACHE_BRANCH: np.array([cache is not None]), **dict(zip(self._past, past))}
        logits, *present = self._run(self.decoder, self._decoder_graph, ["logits", *self._present], feeds)
        if cache is not None:  # the cross-attention cache stays what the first step made
            present = [new if ".decoder." in name else old for name, new, old in zip(self._present, present, cache)]
        return logits, present

    def _prefix(self, rows: list[int]) -> dict[str, np.ndarray]:
        kv, mask = stack_prefixes([self._kv[r] for r in rows], axis=3, min_slots=1)
        return {KV_PREFIX: kv, PREFIX_MASK: mask}

    def _steps(self, batch: Batch, new_tokens: int) -> _CachedSteps:
        return _CachedSteps(self, self._encode(batch.ids, batch.mask, batch.rows), self._prefix(batch.rows),
                            self._sequence_start(batch.ids))

    def _room(self, batch: Batch) -> int:
        """Decoder tokens a batch may feed: a row's prefix takes positions before its own tokens."""
        return self.info.max_positions - max(self._kv[r].shape[3] for r in batch.rows)

    def _sequence_start(self, ids: np.ndarray) -> np.ndarray:
        return np.full((len(ids), 1), self._start, np.int64)

    def _sequence_so_far(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = self._sequence_start(ids)  # transformers penalizes the decoder's tokens, not the encoder's
        return start, np.ones_like(start)

    def _forced_token(self, step: int, config: GenerationConfig) -> int | None:
        """The model's forced_bos_token_id at the first step, its forced_eos_token_id (or nothing) at the last
        step max_new_tokens allows."""
        if step == config.max_new_tokens - 1:
            return self._forced_eos
        return self._forced_bos if step == 0 else None

    # -- public verbs ---------------------------------------------------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
               decoder_input_ids=None) -> np.ndarray:
        """Logits [batch, dec_len, vocab] of `decoder_input_ids` (default: the decoder start token)
        given the encoder input; no virtual positions on either side."""
        batch = self._prepare(input_ids, attention_mask, task, verb="logits")
        ids, mask, rows = batch.ids, batch.mask, batch.rows
        if decoder_input_ids is None:
            decoder_ids = np.full((len(ids), 1), self._start, np.int64)
        else:
            decoder_ids = inputs.as_token_matrix(decoder_input_ids, self.info.vocab_size, self.max_batch_size)
            if len(decoder_ids) != len(ids):
                raise InputError(f"decoder_input_ids has {len(decoder_ids)} rows, input_ids {len(ids)}")
        self._check_length("decoder_input_ids", np.full(len(ids), decoder_ids.shape[1]),
                           [self._kv[r].shape[3] for r in rows])
        logits, _ = self._decode(decoder_ids, self._encode(ids, mask, rows), self._prefix(rows), None)
        return finite_logits(logits, self._decoder_graph)


class _CachedSteps:
    """One generation's decoder steps over the encoder's states, each step feeding back the cache."""

    def __init__(self, model: Seq2SeqModel, encoded: tuple[np.ndarray, np.ndarray], prefix: dict[str, np.ndarray],
                 start: np.ndarray):
        self.model, self.encoded, self.prefix, self.start = model, encoded, prefix, start
        self.graph, self.cache = model._decoder_graph, None

    def first(self) -> np.ndarray:
        logits, self.cache = self.model._decode(self.start, self.encoded, self.prefix, None)
        return logits[:, -1]

    def next(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.cache = self.model._decode(tokens[:, None], self.encoded, self.prefix, self.cache)
        return logits[:, -1]


_REQUIRED = object()


def _token(folder: Path, field: str, value, vocab_size: int, default=_REQUIRED) -> int | None:
    """A special token id from the manifest's model fields, checked against the vocabulary."""
    if value is None and default is not _REQUIRED:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ArtifactError(f"{folder}: field model.{field} must be a token id below vocab_size {vocab_size}, "
                            f"got {value!r}")
    return value
