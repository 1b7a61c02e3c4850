"""An engine request: its settings, its state (waiting, running, finished), how it picks each token, and
the events it hands its caller."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from spexport.errors import InputError, SpexportError
from spexport.runtime import sampling
from spexport.runtime.base import non_finite_logits
from spexport.runtime.generation import GenerationConfig
from spexport.runtime.lookup import Drafter
from spexport.runtime.session import first_line
from spexport.runtime.text import TextCodec, TextStream

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class LogitsProcessor(Protocol):
    """Changes one row's next-token logits before the token is chosen (greedy and sampled rows alike).

    `tokens` are the row's generated tokens so far (not the prompt); `logits` [vocab] float32 is a copy
    the processor may change in place. A grammar masks tokens with -inf."""

    def __call__(self, tokens: list[int], logits: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability and the `k` most likely alternatives (token, log-probability), from
    log_softmax of the processed logits (for an ensemble: of the members' mean log-probabilities)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Event:
    """What a request produced since its last event: new tokens (an EOS among them; several when a
    prompt-lookup draft was accepted), their new text, their logprobs (when asked), and on the last
    event the finish reason ("stop", "length" or "cancelled") and the usage counts."""

    tokens: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: dict | None = None


@dataclass(frozen=True)
class Completion:
    """A request's whole answer: `Request.collect()`."""

    tokens: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob]
    usage: dict


class Request:
    """A submitted generation: iterate it for its events (or `collect()` them), `cancel()` it to free its slot.

    One engine thread changes it; any thread may iterate or cancel it. Iterating raises the request's
    error (a SpexportError with a one-line message) if it failed.
    """

    def __init__(self, prompt: list[int], task_ids: list[int], config: GenerationConfig, count: int,
                 codec: TextCodec | None, stop: list[str], processors: Sequence[LogitsProcessor],
                 logprobs: int | None, lookup: int, eos: set[int], listener: Callable[[object], None] | None,
                 vocab: int, drive: Callable[[], bool] | None):
        self.prompt, self.task_ids, self.config, self.count = prompt, task_ids, config, count
        self.processors, self.logprobs, self.eos, self.vocab = tuple(processors), logprobs, eos, vocab
        self.stream = TextStream(codec, stop) if codec is not None else None
        # greedy single rows may draft; a processor could hold state that a rejected draft would corrupt
        drafts = lookup > 0 and not config.do_sample and not processors and len(task_ids) == 1
        self.drafter = Drafter(lookup) if drafts else None
        self.rng = np.random.default_rng(config.seed)  # this request's own stream, as `generate` alone seeds it
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[prompt] = True
        self.state = WAITING
        self.table = self.graph = None  # the task list its ids index, and the graph that runs it (the engine's)
        self.tokens: list[int] = []
        self.cached_tokens = 0
        self.cancelled = False
        self.error: SpexportError | None = None  # why it failed, if it did
        self._listener, self._drive = listener, drive
        self._events: queue.Queue = queue.Queue()
        self._pending: list[tuple[int, str, TokenLogprob | None]] = []

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def cancel(self) -> None:
        """Stop generating: the engine frees the request's rows at its next step and ends it with "cancelled"."""
        self.cancelled = True

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._next()
            if isinstance(event, SpexportError):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def collect(self) -> Completion:
        """Wait for the whole answer."""
        tokens, text, logprobs, last = [], "", [], None
        for event in self:
            tokens += event.tokens
            text += event.text
            logprobs += event.logprobs
            last = event
        return Completion(tokens, text, last.finish_reason, logprobs, last.usage)

    def _next(self):
        while self._drive is not None and self._events.empty():
            self._drive()
        return self._events.get()

    # -- the engine thread's side --------------------------------------------------------------------

    def pick(self, member_logits: list[np.ndarray]) -> int:
        """Choose the next token from each member row's logits [vocab] (one row, or an ensemble's)."""
        scores = [self._processed(logits) for logits in member_logits]
        if len(scores) > 1:
            scores = [np.mean([log_softmax(s) for s in scores], axis=0).astype(np.float32)]
        config = self.config
        try:
            token = int(sampling.next_tokens(scores[0][None], config.do_sample, config.temperature, config.top_k,
                                             config.top_p, [self.rng])[0])
        except FloatingPointError:
            if not self.processors:
                raise non_finite_logits(self.graph) from None
            raise InputError("no token can be chosen: the logits processors masked every token (or the model "
                             "computed NaN or Inf logits)") from None
        self._logprob = None if self.logprobs is None else _logprob(scores[0], token, self.logprobs)
        return token

    def _processed(self, logits: np.ndarray) -> np.ndarray:
        logits = np.array(logits, np.float32)
        if self.seen is not None:
            logits = sampling.penalize_repetition(logits, self.seen, self.config.repetition_penalty)
        for processor in self.processors:
            try:
                out = processor(list(self.tokens), logits)
            except Exception as e:  # the caller's code: its failure is this request's, one line
                raise InputError(f"a logits processor failed: {first_line(e)}") from None
            logits = logits if out is None else np.asarray(out, np.float32)
            if logits.shape != (self.vocab,):
                raise InputError(f"a logits processor returned shape {logits.shape}; it must return [vocab] logits")
        return logits

    def accept(self, token: int) -> None:
        """Append the token just picked; the request finishes at an EOS, a stop string or its token count."""
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[token] = True
        text, reason = "", None
        if token in self.eos:
            reason = "stop"  # an EOS ends the reply and is no part of its text
        elif self.stream is not None:
            text = self.stream.push(token)
            reason = "stop" if self.stream.stopped else None
        if reason is None and len(self.tokens) >= self.count:
            reason = "length"
        self._pending.append((token, text, self._logprob))
        if reason is not None:
            self.finish(reason)

    def flush(self) -> None:
        """Hand the caller the tokens accepted since the last event."""
        if self._pending and not self.finished:
            self._emit(self._event())

    def _event(self, reason: str | None = None, tail: str = "") -> Event:
        pending, self._pending = self._pending, []
        return Event(tuple(t for t, _, _ in pending), "".join(text for _, text, _ in pending) + tail,
                     tuple(lp for _, _, lp in pending if lp is not None), reason,
                     self.usage() if reason is not None else None)

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        tail = self.stream.finish() if self.stream is not None and reason != "cancelled" else ""
        self.state = FINISHED
        self._emit(self._event(reason, tail))

    def fail(self, error: SpexportError) -> None:
        if not self.finished:
            self.state, self.error = FINISHED, error
            self._emit(error)

    def usage(self) -> dict:
        drafter = self.drafter
        usage = {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                 "total_tokens": len(self.prompt) + len(self.tokens), "cached_tokens": self.cached_tokens}
        if drafter is not None:
            usage.update(draft_tokens=drafter.drafted, accepted_draft_tokens=drafter.accepted)
        return usage

    def _emit(self, event) -> None:
        if self._listener is not None:
            self._listener(event)
        else:
            self._events.put(event)

    _logprob: TokenLogprob | None = None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def _logprob(scores: np.ndarray, token: int, k: int) -> TokenLogprob:
    logprobs = log_softmax(scores)
    top = np.argsort(-logprobs, kind="stable")[:k] if k else []
    return TokenLogprob(token, float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in top))
