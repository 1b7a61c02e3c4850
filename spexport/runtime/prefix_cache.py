"""Shared-prefix reuse: the KV of prompts already run, so that a later prompt of the same task that begins
with the same tokens starts from it and runs only the rest.

Prompts are cut into blocks of `block` tokens; an entry is found by the chained hash of a prompt's first k
blocks (as vLLM's prefix cache keys its blocks) and checked token for token before use. One entry holds a
whole prompt's past and answers every block boundary inside it. Entries are evicted least recently used
first, to stay within `max_bytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_BYTES = 256 << 20
DEFAULT_BLOCK = 16


@dataclass
class _Entry:
    key: tuple  # the task: its name and the identity of its prompt bank (a replaced task is another key)
    owner: object  # that bank, held so that its identity is not reused while the entry lives
    tokens: list[int]
    kv: list[np.ndarray]  # per past name [kv_heads, prefix slots + tokens, head_dim]
    prefix_slots: int
    bytes: int
    hashes: list[int]


class PrefixCache:
    """Past KV of prompts per task, keyed by blocks of their tokens, bounded in bytes, least recently used out."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES, block: int = DEFAULT_BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.entries: OrderedDict[int, _Entry] = OrderedDict()  # by id, oldest first
        self.index: dict[int, _Entry] = {}  # block-chain hash -> the newest entry holding it
        self.bytes = 0
        self.hits = self.hit_tokens = self.misses = 0

    def _hashes(self, key: tuple, tokens: list[int], most: int) -> list[int]:
        """The chained hash of each whole block among the first `most` tokens."""
        hashes, h = [], hash(key)
        for start in range(0, most - self.block + 1, self.block):
            h = hash((h, tuple(tokens[start:start + self.block])))
            hashes.append(h)
        return hashes

    def lookup(self, key: tuple, tokens: list[int]) -> tuple[list[np.ndarray], int, int] | None:
        """The longest cached start of `tokens` that leaves at least one token to run: (past per past name
        [kv_heads, slots, head_dim], its prefix slots, its tokens); None when no block matches."""
        if self.max_bytes <= 0:
            return None
        hashes = self._hashes(key, tokens, len(tokens) - 1)
        for blocks in range(len(hashes), 0, -1):
            entry = self.index.get(hashes[blocks - 1])
            count = blocks * self.block
            if entry is not None and entry.key == key and entry.tokens[:count] == tokens[:count]:
                self.entries.move_to_end(id(entry))
                self.hits, self.hit_tokens = self.hits + 1, self.hit_tokens + count
                slots = entry.prefix_slots + count
                return [kv[:, :slots] for kv in entry.kv], entry.prefix_slots, count
        self.misses += 1
        return None

    def store(self, key: tuple, tokens: list[int], kv: list[np.ndarray], prefix_slots: int,
              owner: object = None) -> None:
        """Keep a prompt's past (its prefix slots, then one slot per token) for later prompts that start alike."""
        hashes = self._hashes(key, tokens, len(tokens))
        size = sum(k.nbytes for k in kv)
        if not hashes or size > self.max_bytes or all(self.index.get(h) is not None for h in hashes):
            return  # too short to share, too big to keep, or already held
        entry = _Entry(key, owner, list(tokens), kv, prefix_slots, size, hashes)
        self.entries[id(entry)] = entry
        self.bytes += size
        for h in hashes:
            self.index[h] = entry
        while self.bytes > self.max_bytes:
            self._evict(next(iter(self.entries.values())))

    def _evict(self, entry: _Entry) -> None:
        del self.entries[id(entry)]
        self.bytes -= entry.bytes
        for h in entry.hashes:
            if self.index.get(h) is entry:
                del self.index[h]
