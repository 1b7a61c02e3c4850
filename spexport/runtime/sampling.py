"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (transformers' order), after
the repetition penalty. Each row draws from its own random stream, so a seeded row samples what it samples
alone, whatever else is in its batch."""

from __future__ import annotations

import numpy as np


def next_tokens(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
                rngs: list[np.random.Generator]) -> np.ndarray:
    """logits [batch, vocab] -> token ids [batch]; `rngs` holds one random stream per row (sampling only).

    Raises FloatingPointError when a row's largest logit is NaN or Inf, so that no token can be chosen
    from it. argmax and max count NaN as the largest value, so checking the one value each row is
    chosen by costs nothing per vocabulary entry."""
    if not do_sample:
        chosen = logits.argmax(axis=-1)
        _check_finite(logits[np.arange(len(logits)), chosen])
        return chosen
    scores = logits.astype(np.float64) / max(temperature, 1e-6)
    _check_finite(scores.max(axis=-1))
    if top_k and top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the best token)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for rng, p in zip(rngs, probs)])


def _check_finite(best: np.ndarray) -> None:
    if not np.isfinite(best).all():
        raise FloatingPointError("NaN or Inf logits")


def penalize_repetition(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of each token in `seen` [batch, vocab] is
    divided by `penalty`, or multiplied by it where negative (in the logits' own float32, as torch does)."""
    return np.where(seen, np.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty)), logits)
