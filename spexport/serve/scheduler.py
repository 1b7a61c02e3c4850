"""The server's execution path: HTTP jobs run as requests of one runtime `Engine` (continuous batching).

A job is one choice of one prompt. It becomes one engine request, whose events come back on the job's
asyncio queue: a streaming client sees its first piece as soon as its own prompt has run, not after a
batch it arrived behind, and a client that leaves frees its row at the next step. The text and stop
strings go through the runtime's TextStream, so a reply equals `generate_text` / `chat` for that request
alone (greedy, or seeded: each request has its own random stream).
"""

from __future__ import annotations

import asyncio
import copy

from spexport.errors import InputError, SpexportError
from spexport.runtime.engine import Engine, Event
from spexport.runtime.prefix_cache import DEFAULT_BYTES
from spexport.serve.protocol import Sampling


class Job:
    """One choice of one prompt. The engine reports to `events` (an asyncio queue on `loop`): ("delta", text)
    while streaming, then ("done", text, finish_reason, completion_tokens) or ("error", exc). `tokens` and
    `logprobs` (engine TokenLogprob entries, when asked) fill in as the request runs; `usage` at its end."""

    def __init__(self, task: str, ids: list[int], sampling: Sampling, loop: asyncio.AbstractEventLoop,
                 stream: bool = False, echo_text: str = "", choice: int = 0):
        self.task, self.ids, self.sampling, self.loop, self.stream = task, ids, sampling, loop, stream
        self.choice = choice  # which of the prompt's n choices
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = echo_text  # echo: the prompt's text leads the choice
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.usage: dict | None = None
        self.request = None
        self.on_token = None  # called with no arguments as tokens arrive (the server's latency metrics)
        self._cancelled = False
        if stream and echo_text:
            self.put("delta", echo_text)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        """Set when the client has gone: the engine stops the request and frees its row."""
        self._cancelled = value
        if value and self.request is not None:
            self.request.cancel()

    def put(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def on_event(self, event: Event | SpexportError) -> None:
        """The engine thread's report for this job's request."""
        if isinstance(event, SpexportError):
            self.put("error", event)
            return
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        if event.tokens and self.on_token is not None:
            self.on_token()
        self.text += event.text
        if self.stream and event.text:
            self.put("delta", event.text)
        if event.finish_reason is not None:
            self.usage = event.usage
            if event.finish_reason != "cancelled":  # a gone client gets no answer
                self.put("done", self.text, event.finish_reason, len(self.tokens))


def choices(task: str, ids: list[int], sampling: Sampling, loop, stream: bool, echo_text: str = "") -> list[Job]:
    """The `n` jobs of one prompt; with a seed, choice i is seeded with seed + i."""
    return [Job(task, ids, _seeded(sampling, i), loop, stream, echo_text, i) for i in range(getattr(sampling, "n", 1))]


def _seeded(sampling: Sampling, choice: int) -> Sampling:
    """The settings of choice `choice`: its seed moved on by `choice` (a copy, every field kept)."""
    if choice == 0 or sampling.seed is None:
        return sampling
    moved = copy.copy(sampling)
    object.__setattr__(moved, "seed", sampling.seed + choice)  # a frozen dataclass too
    return moved


class Scheduler:
    """The engine over one loaded decoder or encoder-decoder model, fed with jobs.

    max_batch_size: rows running together at most; on_batch: called with the running rows as events come;
    prompt_lookup: draft length of greedy requests (0: none);
    prefix_cache_mb: memory for shared prompt starts (MiB); max_prefill_tokens: prompt tokens run per step.
    """

    def __init__(self, model, max_batch_size: int = 64, prompt_lookup: int = 0,
                 prefix_cache_mb: int = DEFAULT_BYTES >> 20, max_prefill_tokens: int = 2048, on_batch=None):
        self.model = model
        self.on_batch = on_batch or (lambda rows: None)  # the server's batch-size metric, as each event comes
        self.engine = Engine(model, max_running_rows=min(max_batch_size, model.max_batch_size),
                             max_prefill_tokens=max_prefill_tokens, prefix_cache_bytes=prefix_cache_mb << 20,
                             prompt_lookup_num_tokens=prompt_lookup)

    @property
    def thread(self):
        return self.engine.thread

    def start(self) -> None:
        self.engine.start()

    def submit(self, job: Job) -> None:
        s = job.sampling
        try:
            job.request = self.engine.submit(
                job.ids, job.task, s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature, top_k=s.top_k,
                top_p=s.top_p, seed=s.seed, repetition_penalty=s.repetition_penalty, stop=s.stop, logprobs=s.logprobs,
                logits_processors=s.logits_processors, listener=lambda event: self._report(job, event))
        except SpexportError as e:
            job.put("error", e)
            return
        if job.cancelled:
            job.request.cancel()

    def _report(self, job: Job, event) -> None:
        """An engine event for `job` (in the engine's thread): the batch-size metric, then the job's own handling."""
        self.on_batch(self.engine.running_rows())
        job.on_event(event)

    def stop(self) -> None:
        """Finish every job already submitted, then end the engine's thread."""
        self.engine.close()


def check_prompt(model, task: str, ids: list[int]) -> list[int]:
    """The prompt's tokens; InputError if it leaves the task no position to generate."""
    tokens = len(ids)
    if tokens == 0:
        raise InputError("the prompt encodes to no tokens")
    members = getattr(model, "ensembles", {}).get(task, (task,))  # an ensemble: its longest member prompt
    allowed = model.info.max_positions - max(model.num_virtual_tokens[member] for member in members)
    if tokens >= allowed:
        raise InputError(f"prompt of {tokens} tokens is too long: task {task!r} allows {allowed - 1} prompt tokens "
                         f"and at least one new token (max positions {model.info.max_positions})")
    return ids


def logprobs_json(codec, job: Job, chat: bool) -> dict:
    """A choice's logprobs in OpenAI's shape: chat's `content` list, or completions' parallel lists."""
    def text(token: int) -> str:
        return codec.tokenizer.decode([token], skip_special_tokens=False)

    if chat:
        def entry(token: int, logprob: float) -> dict:
            piece = text(token)
            return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in job.logprobs]}
    offsets, at = [], len(job.text) - sum(len(text(lp.token)) for lp in job.logprobs)
    for lp in job.logprobs:
        offsets.append(max(at, 0))
        at += len(text(lp.token))
    return {"tokens": [text(lp.token) for lp in job.logprobs], "token_logprobs": [lp.logprob for lp in job.logprobs],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in job.logprobs], "text_offset": offsets}
