"""Prompt-lookup drafting (transformers' `prompt_lookup_num_tokens`): guess a row's next tokens from an
earlier place in its own prompt and output where its last few tokens appeared, for the model to check
in one step.

Each row decides for itself whether to draft: no match, no draft; and a row whose drafts keep being
rejected waits longer and longer before it drafts again, so open-ended text pays (almost) nothing.
"""

from __future__ import annotations

MAX_NGRAM = 3  # the longest run of last tokens searched for (transformers' max_matching_ngram_size is 2)
MIN_NGRAM = 2  # one matching token predicts open text too poorly to be worth a draft
MAX_PAUSE = 16  # steps a row that keeps missing waits, at most, before drafting again


def find_draft(tokens: list[int], count: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `count` tokens that followed the latest earlier occurrence of the longest run (of `min_ngram` to
    `max_ngram`) of the last tokens in `tokens`; empty when there is none."""
    size = len(tokens)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        tail = tokens[size - n:]
        for start in range(size - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + count]
    return []


class Drafter:
    """One row's drafting state: how many tokens to draft, and the backoff after misses.

    The draft length follows the row's luck: it doubles (up to `count`) after a draft kept whole and drops to
    one more than the tokens kept after a partial one, so a row that copies drafts long and one that does
    not pays for few verified tokens."""

    def __init__(self, count: int):
        self.count = self.length = count
        self.pause = 0  # steps to wait before drafting again
        self.misses = 0
        self.drafted = self.accepted = 0

    def draft(self, tokens: list[int], most: int) -> list[int]:
        """The draft for this step (at most `most` tokens), or none."""
        if self.count <= 0 or most <= 0:
            return []
        if self.pause:
            self.pause -= 1
            return []
        return find_draft(tokens, min(self.length, most))

    def record(self, drafted: int, accepted: int) -> None:
        """A drafted step's outcome: a draft with no token accepted doubles the pause before the next one."""
        self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
        self.length = min(self.count, 2 * self.length) if accepted == drafted else max(2, accepted + 1)
        if accepted:
            self.misses = 0
        else:
            self.misses += 1
            self.pause = min(MAX_PAUSE, 2 ** (self.misses - 1))
