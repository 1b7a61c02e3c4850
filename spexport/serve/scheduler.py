"""Dynamic batching across requests: one thread gathers the requests that arrive together and runs them
through the runtime as one batch, tasks mixed, then hands each request its own tokens.

A row's answer is what `generate_text` returns for that request alone: greedy rows of any tasks share a
batch (rows are independent in the runtime), each row is cut at its own max_tokens and first EOS, and a
row joins a batch only if the batch leaves it the room it would have alone. Sampled requests with a seed
run alone, since the runtime's sampler draws from one random stream per call; sampled requests without
a seed share a batch with those of the same temperature and top_p.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from spexport.errors import InputError, SpexportError
from spexport.serve.protocol import Sampling

WINDOW_S = 0.005  # after the first request, how long to wait for others to join its batch


@dataclass
class Job:
    """One prompt's generation. The scheduler reports to `events` (an asyncio queue on `loop`):
    ("delta", text) while streaming, then ("done", text, finish_reason, completion_tokens) or ("error", exc)."""

    task: str
    ids: list[int]  # the prompt's tokens
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set when the client has gone: the row stops and frees its slot
    on_token: object = None  # called with no arguments as each token arrives (the server's latency metrics)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def put(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass


class _Row:
    """A job's progress inside a batch."""

    def __init__(self, job: Job, tokenizer, eos: set[int]):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.tokens: list[int] = []
        self.text, self.sent, self.reason = "", 0, None

    @property
    def finished(self) -> bool:
        return self.reason is not None or self.job.cancelled

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if self.job.on_token is not None:
            self.job.on_token()
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stops = [i for i in (self.text.find(s) for s in self.job.sampling.stop) if i >= 0]
        if stops:
            self.text, self.reason = self.text[:min(stops)], "stop"
        elif token in self.eos:
            self.reason = "stop"
        elif len(self.tokens) >= self.job.sampling.max_new_tokens:
            self.reason = "length"
        if self.job.stream:
            self._send()

    def _send(self) -> None:
        """Stream the text that can no longer change: hold back a partial UTF-8 character and, until the
        row ends, any tail that could begin a stop string."""
        end = len(self.text)
        if self.reason is None:
            if self.text.endswith("\ufffd"):
                return
            for stop in self.job.sampling.stop:
                for n in range(min(len(stop) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(stop[:n]):
                        end = min(end, len(self.text) - n)
                        break
        if end > self.sent:
            self.job.put("delta", self.text[self.sent:end])
            self.sent = end

    def finish(self) -> None:
        self.reason = self.reason or "length"
        if self.job.stream:
            self._send()
        self.job.put("done", self.text, self.reason, len(self.tokens))


class Scheduler:
    """The batching thread over one loaded decoder or encoder-decoder model."""

    def __init__(self, model, max_batch_size: int = 64, window_s: float = WINDOW_S, on_batch=None):
        self.on_batch = on_batch or (lambda rows: None)  # the server's batch-size metric
        self.model, self.max_batch_size, self.window_s = model, min(max_batch_size, model.max_batch_size), window_s
        self.tokenizer = model.tokenizer
        self.eos = set(model.info.eos_token_ids)
        # an encoder-decoder model may force EOS as the last token max_new_tokens allows (BART's forced_eos_token_id)
        self.forces_last_token = model.FAMILY != "decoder-only"
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = 0  # batches run, and rows in them: for tests and the load report
        self.rows = 0
        self.thread = threading.Thread(target=self._serve, name="spexport-scheduler", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def stop(self) -> None:
        """Finish every job already submitted, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            jobs = [self.queue.get()]
            deadline = time.monotonic() + self.window_s
            while len(jobs) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            while len(jobs) < self.max_batch_size:  # whatever else is already waiting
                try:
                    jobs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in jobs
            for batch in self.batches_of([j for j in jobs if j is not None and not j.cancelled]):
                self._run_safely(batch)

    def batches_of(self, jobs: list[Job]) -> list[list[Job]]:
        """Group jobs that may share a batch: greedy ones together, unseeded sampled ones by their settings,
        seeded ones alone (encoder-decoder: only rows of equal max_tokens); a row whose max_tokens the batch's
        width would cut short runs alone."""
        groups: dict[tuple, list[Job]] = {}
        alone = []
        for job in jobs:
            s = job.sampling
            if s.do_sample and s.seed is not None:
                alone.append([job])
                continue
            key = (s.do_sample, s.temperature, s.top_p, s.top_k) if s.do_sample else (False,)
            key += (s.repetition_penalty,)  # a batch runs with its first row's settings
            if self.forces_last_token:  # its last new token depends on max_tokens: only equal ones share
                key += (s.max_new_tokens,)
            groups.setdefault(key, []).append(job)
        info, virtual = self.model.info, self.model.num_virtual_tokens
        batches = []
        for group in groups.values():
            width = max(j.prompt_tokens for j in group)
            room = info.max_positions - max(virtual[j.task] for j in group) - width
            fits = [j for j in group if j.sampling.max_new_tokens <= room]
            alone += [[j] for j in group if j.sampling.max_new_tokens > room]
            batches += [fits[i:i + self.max_batch_size] for i in range(0, len(fits), self.max_batch_size)]
        return batches + alone

    def _run_safely(self, jobs: list[Job]) -> None:
        try:
            self._run(jobs)
        except SpexportError as e:
            if len(jobs) > 1:  # find the row at fault: each alone gets its own answer or error
                for job in jobs:
                    self._run_safely([job])
                return
            jobs[0].put("error", e)
        except Exception as e:  # the server outlives any one batch
            for job in jobs:
                job.put("error", e)

    def _run(self, jobs: list[Job]) -> None:
        model, first = self.model, jobs[0].sampling
        ids, mask = padded([j.ids for j in jobs], model.info.pad_token_id or 0, model.PAD_TEXT_LEFT)
        kwargs = first.runtime_kwargs()
        kwargs["max_new_tokens"] = max(j.sampling.max_new_tokens for j in jobs)
        rows = [_Row(j, self.tokenizer, self.eos) for j in jobs]
        columns = model.generate_columns(ids, mask, [j.task for j in jobs], **kwargs)
        self.batches, self.rows = self.batches + 1, self.rows + len(jobs)
        self.on_batch(len(jobs))
        try:
            for column in columns:
                for row, token in zip(rows, column.tolist()):
                    if not row.finished:
                        row.add(token)
                if all(r.finished for r in rows):
                    break
        finally:
            columns.close()
        for row in rows:
            if not row.job.cancelled:
                row.finish()


def padded(rows: list[list[int]], pad: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token rows padded to one width, on the left or the right, as generate_text pads them; and their mask."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        slots = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, slots], mask[i, slots] = row, 1
    return ids, mask


def check_prompt(model, task: str, ids: list[int]) -> list[int]:
    """The prompt's tokens; InputError if it leaves the task no position to generate."""
    tokens = len(ids)
    if tokens == 0:
        raise InputError("the prompt encodes to no tokens")
    allowed = model.info.max_positions - model.num_virtual_tokens[task]
    if tokens >= allowed:
        raise InputError(f"prompt of {tokens} tokens is too long: task {task!r} allows {allowed - 1} prompt tokens "
                         f"and at least one new token (max positions {model.info.max_positions})")
    return ids
