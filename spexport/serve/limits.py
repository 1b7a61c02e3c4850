"""What one client may ask of the server: the limits `spexport serve` enforces, and the admission counter
that turns a full queue into a 429 with Retry-After instead of an ever longer wait."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

from spexport.errors import OptionError


@dataclass(frozen=True)
class Limits:
    """The server's limits; each has a flag of `spexport serve` (`--max-body-bytes`, ...)."""

    max_body_bytes: int = 4 * 1024 * 1024  # a request body, counted as it streams in
    max_prompts: int = 64  # prompts in one /v1/completions request (and n choices per request)
    max_prompt_chars: int = 200_000  # characters of one prompt or chat message, before tokenizing
    max_tokens: int | None = None  # max_tokens / max_completion_tokens; None: the model's positions
    max_queue: int = 256  # generations admitted (waiting or running); more get 429
    request_timeout_s: float = 600.0  # from admission to the last token; then 504 (streams end with an error)
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long requests in flight may finish before they are cut
    retry_after_s: int = 1  # what a 429 tells the client to wait

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompts", "max_prompt_chars", "max_queue", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise OptionError(f"max-tokens must be a whole number >= 1, got {self.max_tokens!r}")
        for name in ("request_timeout_s", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise OptionError(f"{name.replace('_s', '').replace('_', '-')} must be a positive number of "
                                  f"seconds, got {value!r}")


class QueueFull(Exception):
    """The admission counter is at its limit."""


class Admission:
    """Generations admitted and not yet finished, at most `limit`. The server admits each request's
    generations before it hands them to the execution side, which reads `depth` for its metrics."""

    def __init__(self, limit: int, on_change=None):
        self.limit, self.depth = limit, 0
        self.on_change = on_change or (lambda depth: None)
        self._lock = threading.Lock()

    def enter(self, count: int = 1) -> None:
        """Admit `count` generations, all or none; QueueFull if they do not fit."""
        with self._lock:
            if self.depth + count > self.limit:
                raise QueueFull(f"{self.depth} generations are queued or running, the most this server takes is "
                                f"{self.limit}")
            self.depth += count
            self.on_change(self.depth)

    def leave(self, count: int = 1) -> None:
        with self._lock:
            self.depth = max(0, self.depth - count)
            self.on_change(self.depth)

    @contextmanager
    def admitted(self, count: int = 1):
        self.enter(count)
        try:
            yield
        finally:
            self.leave(count)
