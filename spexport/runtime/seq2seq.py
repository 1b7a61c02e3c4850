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
)
from spexport.errors import ArtifactError, InputError
from spexport.runtime import inputs, sampling
from spexport.runtime.base import (
    ORT_ERRORS,
    ServedArtifact,
    check_ports,
    first_line,
    load_bank,
    load_tokenizer,
    open_session,
)
from spexport.runtime.encoder import stack_rows


class Seq2SeqModel(ServedArtifact):
    """A frozen encoder-decoder model plus a bank of per-task prompts: virtual-token embeddings for
    the encoder (prompt tuning, P-tuning) or self-attention KV prefixes for the decoder (prefix tuning)."""

    def __init__(self, folder: Path, manifest: Manifest, providers: list[str],
                 max_batch_size: int = inputs.MAX_BATCH_SIZE):
        super().__init__(folder, manifest, max_batch_size)
        info = self.info
        self._start = _token(folder, "decoder_start_token_id", info.decoder_start_token_id, info.vocab_size)
        self._forced_bos = _token(folder, "forced_bos_token_id", info.forced_bos_token_id, info.vocab_size, None)
        self._forced_eos = _token(folder, "forced_eos_token_id", info.forced_eos_token_id, info.vocab_size, None)
        bank = load_bank(folder, manifest)
        prompts = [bank[t.tensor] for t in manifest.tasks]
        # a task feeds the encoder ([n, hidden] embeddings) or the decoder ([layers, 2, heads, n, head_dim])
        self._embeds = [p if p.ndim == 2 else np.zeros((0, info.hidden_size), np.float32) for p in prompts]
        empty_kv = np.zeros((info.num_layers, 2, info.num_kv_heads, 0, info.head_dim), np.float32)
        self._kv = [p if p.ndim == 5 else empty_kv for p in prompts]
        self._past = cache_names(CACHE_PAST, info.num_layers)
        self._present = cache_names(CACHE_PRESENT, info.num_layers)
        self._encoder_graph = self._graph_path(manifest.encoder_graph, "encoder_graph")
        self._decoder_graph = self._graph_path(manifest.graph, "graph")
        self.encoder = open_session(self._encoder_graph, providers)
        self.decoder = open_session(self._decoder_graph, providers)
        check_ports(self.encoder, self._encoder_graph, *self._encoder_ports())
        check_ports(self.decoder, self._decoder_graph, *self._decoder_ports())
        self.providers = self.decoder.get_providers()
        self.tokenizer = load_tokenizer(self.folder, manifest)

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

    def _prepare(self, input_ids, attention_mask, task):
        ids = inputs.as_token_matrix(input_ids, self.info.vocab_size, self.max_batch_size)
        mask = inputs.as_mask(attention_mask, ids.shape)
        rows = inputs.task_indices(task, self.tasks, ids.shape[0])
        longest = max(len(self._embeds[r]) + n for r, n in zip(rows, mask.sum(axis=1)))
        if longest > self.info.max_positions:
            raise InputError(f"an input row of {longest} tokens, its task's virtual tokens included, is longer than "
                             f"the model's {self.info.max_positions} positions")
        return ids, mask, rows

    def _encode(self, ids, mask, rows) -> tuple[np.ndarray, np.ndarray]:
        """The encoder's states and mask, each row laid out as [virtual tokens, its tokens, padding]."""
        embeds, prompt_mask = stack_rows([self._embeds[r] for r in rows], 0)
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
        kv, mask = stack_rows([self._kv[r] for r in rows], 3)
        return {KV_PREFIX: kv, PREFIX_MASK: mask}

    def _room(self, rows: list[int]) -> int:
        """Decoder tokens a batch may feed: a row's prefix takes positions before its own tokens."""
        return self.info.max_positions - max(self._kv[r].shape[3] for r in rows)

    @staticmethod
    def _run(session, path: Path, names: list[str], feeds: dict) -> list[np.ndarray]:
        try:
            return session.run(names, feeds)
        except ORT_ERRORS as e:  # inputs are checked first, so the artifact is at fault (or memory ran out)
            raise ArtifactError(f"{path}: ONNX Runtime failed running it ({first_line(e)})") from e

    # -- public verbs ---------------------------------------------------------------------------

    def logits(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
               decoder_input_ids=None) -> np.ndarray:
        """Logits [batch, dec_len, vocab] of `decoder_input_ids` (default: the decoder start token)
        given the encoder input; no virtual positions on either side."""
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        if decoder_input_ids is None:
            decoder_ids = np.full((len(ids), 1), self._start, np.int64)
        else:
            decoder_ids = inputs.as_token_matrix(decoder_input_ids, self.info.vocab_size, self.max_batch_size)
            if len(decoder_ids) != len(ids):
                raise InputError(f"decoder_input_ids has {len(decoder_ids)} rows, input_ids {len(ids)}")
        if decoder_ids.shape[1] > self._room(rows):
            raise InputError(f"decoder_input_ids of {decoder_ids.shape[1]} tokens is too long: with its task's "
                             f"virtual tokens the decoder allows {self._room(rows)}")
        logits, _ = self._decode(decoder_ids, self._encode(ids, mask, rows), self._prefix(rows), None)
        return logits

    def generate(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """Decoder tokens [batch, 1 + new], starting with the decoder start token, as transformers'
        `generate` returns them for an encoder-decoder model (greedy unless do_sample).

        Encoder rows may be padded on either side (mark padding with attention_mask). Rows stop at
        the model's EOS (later slots hold the pad token), at max_new_tokens, or where the decoder's
        positions run out. The model's forced_bos_token_id and forced_eos_token_id apply as in
        transformers: the first new token, and the last one max_new_tokens allows.
        """
        inputs.check_generation(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        encoded, prefix = self._encode(ids, mask, rows), self._prefix(rows)
        eos = np.array(self.info.eos_token_ids, np.int64)
        pad = self.info.pad_token_id if self.info.pad_token_id is not None else (eos[0] if eos.size else 0)
        rng = np.random.default_rng(seed)
        sequences = np.full((len(ids), 1), self._start, np.int64)
        step_ids, cache = sequences, None
        unfinished = np.ones(len(ids), bool)
        for step in range(min(max_new_tokens, self._room(rows))):
            logits, cache = self._decode(step_ids, encoded, prefix, cache)
            chosen = sampling.next_tokens(logits[:, -1], do_sample, temperature, top_k, top_p, rng)
            forced = self._forced_bos if step == 0 else None
            forced = self._forced_eos if step == max_new_tokens - 1 else forced
            chosen = np.where(unfinished, chosen if forced is None else forced, pad).astype(np.int64)
            sequences = np.concatenate([sequences, chosen[:, None]], axis=1)
            unfinished &= ~np.isin(chosen, eos)
            if not unfinished.any():
                break
            step_ids = chosen[:, None]
        return sequences

    def generate_text(self, texts: str | Sequence[str], task: str | Sequence[str] = None,
                      max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Tokenize, right-pad, generate, and decode each row's new tokens."""
        tokenizer = self._require_tokenizer()
        _, ids, mask = inputs.tokenize(tokenizer, texts, self.info.pad_token_id, left=False)
        out = self.generate(ids, mask, task=task, max_new_tokens=max_new_tokens, **kwargs)
        return [tokenizer.decode(row[1:].tolist(), skip_special_tokens=True) for row in out]

    def classify(self, *args, **kwargs):
        raise InputError("classify is for classifier artifacts; this encoder-decoder artifact generates text")

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(f"{self.folder} has no tokenizer.json; pass token ids instead of text")
        return self.tokenizer


_REQUIRED = object()


def _token(folder: Path, field: str, value, vocab_size: int, default=_REQUIRED) -> int | None:
    """A special token id from the manifest's model fields, checked against the vocabulary."""
    if value is None and default is not _REQUIRED:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ArtifactError(f"{folder}: field model.{field} must be a token id below vocab_size {vocab_size}, "
                            f"got {value!r}")
    return value
