"""Logits processors as OpenAI defines its sampling parameters, for the generation loop.

A processor is `processor(tokens, logits) -> logits`: `tokens` are the row's generated tokens so far (not
the prompt) and `logits` the row's next-token logits [vocab] float32, which it may change in place. The
generation loop applies them in order before it picks a token, for greedy and sampled rows alike.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import numpy as np


class LogitsProcessor(Protocol):
    """Changes one row's next-token logits given the tokens it has generated."""

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray: ...


class LogitBias:
    """OpenAI's `logit_bias`: a number in [-100, 100] added to a token's logit before sampling (-100 bans it,
    100 all but forces it)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = np.array(list(bias), np.int64)
        self.values = np.array(list(bias.values()), np.float32)

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray:
        inside = self.ids < logits.shape[-1]  # a token past the graph's vocab has no logit to bias
        logits[self.ids[inside]] += self.values[inside]
        return logits


class Penalties:
    """OpenAI's `presence_penalty` and `frequency_penalty`: a token that appears c > 0 times among the tokens
    generated so far loses `frequency * c + presence` from its logit (negative values encourage it)."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0):
        self.presence, self.frequency = presence, frequency

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray:
        if not tokens:
            return logits
        counts = Counter(t for t in tokens if 0 <= t < logits.shape[-1])
        ids = np.fromiter(counts.keys(), np.int64, len(counts))
        times = np.fromiter(counts.values(), np.float32, len(counts))
        logits[ids] -= self.frequency * times + self.presence
        return logits


def apply(processors, tokens: list[int], logits: np.ndarray) -> np.ndarray:
    """`logits` after every processor of `processors` in order."""
    for processor in processors:
        logits = processor(tokens, logits)
    return logits
