"""One generation loop for the families that generate (decoder-only and encoder-decoder).

A family's model gives the loop its `Steps`: the first step runs the prompt, each next step one new
token per row. The loop chooses tokens and yields them a column at a time, so `generate` collects the
columns and a streaming caller could take each as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from spexport.runtime import inputs, sampling
from spexport.runtime.base import ServedArtifact, non_finite_logits


class Steps(Protocol):
    """A generation's model calls on its `graph`, each returning every row's next-token logits [batch, vocab]."""

    graph: Path

    def first(self) -> np.ndarray:
        """Run the prompt; the logits at each row's last real token, wherever its padding is."""

    def next(self, tokens: np.ndarray) -> np.ndarray:
        """Feed each row's newest token [batch]."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose new tokens: greedy unless do_sample, then temperature, top-k and top-p (transformers'
    order), repeatable with a seed."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        inputs.check_generation(self.max_new_tokens, self.do_sample, self.temperature, self.top_k, self.top_p,
                                self.seed)


def token_columns(steps: Steps, config: GenerationConfig, room: int, eos_token_ids: list[int], pad_token_id: int,
                  forced: Callable[[int], int | None]) -> Iterator[np.ndarray]:
    """Each step's new token per row [batch], for at most max_new_tokens steps and `room` positions.

    `forced(step)` is a token the model prescribes at that step, or None. A row that has given an EOS
    gets the pad token from then on; the loop ends when every row has.
    """
    rng = np.random.default_rng(config.seed)
    eos = np.array(eos_token_ids, np.int64)
    count = min(config.max_new_tokens, room)
    if count <= 0:
        return
    logits = steps.first()
    unfinished = np.ones(len(logits), bool)
    for step in range(count):
        try:
            chosen = sampling.next_tokens(logits, config.do_sample, config.temperature, config.top_k, config.top_p,
                                          rng)
        except FloatingPointError:
            raise non_finite_logits(steps.graph) from None
        token = forced(step)
        chosen = np.where(unfinished, chosen if token is None else token, pad_token_id).astype(np.int64)
        yield chosen
        unfinished &= ~np.isin(chosen, eos)
        if not unfinished.any() or step == count - 1:
            return
        logits = steps.next(chosen)


class GeneratingModel(ServedArtifact):
    """A served artifact that generates text: `generate` and `generate_text` over the family's `_steps`."""

    VERBS = ("logits", "generate", "generate_text")
    DOES = "generates text"
    PAD_TEXT_LEFT = True  # generate_text's padding side: a decoder-only model continues each row at its right end

    def _steps(self, ids: np.ndarray, mask: np.ndarray, rows: list[int]) -> Steps:
        raise NotImplementedError

    def _room(self, ids: np.ndarray, rows: list[int]) -> int:
        """New tokens the batch's positions leave room for."""
        raise NotImplementedError

    def _sequence_start(self, ids: np.ndarray) -> np.ndarray:
        """What `generate` returns ahead of the new tokens."""
        raise NotImplementedError

    def _forced_token(self, step: int, config: GenerationConfig) -> int | None:
        return None

    def _token_columns(self, ids: np.ndarray, mask: np.ndarray, rows: list[int],
                       config: GenerationConfig) -> Iterator[np.ndarray]:
        eos = self.info.eos_token_ids
        pad = self.info.pad_token_id if self.info.pad_token_id is not None else (eos[0] if eos else 0)
        return token_columns(self._steps(ids, mask, rows), config, self._room(ids, rows), eos, pad,
                             lambda step: self._forced_token(step, config))

    def _new_tokens(self, ids: np.ndarray, mask: np.ndarray, rows: list[int], config: GenerationConfig) -> np.ndarray:
        columns = list(self._token_columns(ids, mask, rows, config))
        return np.stack(columns, axis=1) if columns else np.empty((len(ids), 0), np.int64)

    def generate_columns(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                         max_new_tokens: int = 20, **kwargs) -> Iterator[np.ndarray]:
        """generate's new tokens one column [batch] at a time, as the loop chooses them, for callers that
        stream or stop early (the server); kwargs are generate's settings."""
        config = GenerationConfig(max_new_tokens, **kwargs)
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        return self._token_columns(ids, mask, rows, config)

    def generate(self, input_ids, attention_mask=None, task: str | Sequence[str] = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> np.ndarray:
        """Token ids as transformers' `generate` returns them: for a decoder-only model the input followed
        by the new tokens; for an encoder-decoder model the decoder start token followed by them.

        Rows may be padded anywhere (left, right, or in gaps); mark padding with attention_mask, and each
        row gets what it gets alone. Rows stop at the model's EOS (later slots hold the pad token), at
        max_new_tokens, or where the model's positions run out. An encoder-decoder model's
        forced_bos_token_id and forced_eos_token_id apply as in transformers: the first new token, and
        the last one max_new_tokens allows.
        """
        config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        ids, mask, rows = self._prepare(input_ids, attention_mask, task)
        return np.concatenate([self._sequence_start(ids), self._new_tokens(ids, mask, rows, config)], axis=1)

    def generate_text(self, texts: str | Sequence[str], task: str | Sequence[str] = None,
                      max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Tokenize, pad, generate, and decode each row's new tokens; kwargs are generate's settings."""
        tokenizer = self._require_tokenizer()
        _, ids, mask = inputs.tokenize(tokenizer, texts, self.info.pad_token_id, left=self.PAD_TEXT_LEFT)
        config = GenerationConfig(max_new_tokens, **kwargs)
        ids, mask, rows = self._prepare(ids, mask, task)
        return [tokenizer.decode(row.tolist(), skip_special_tokens=True)
                for row in self._new_tokens(ids, mask, rows, config)]
