"""A serving engine over one loaded model: continuous batching of requests of any tasks, shared-prefix
reuse, prompt-lookup drafting and prompt ensembles, in one loop.

    engine = Engine(model)
    for event in engine.submit(prompt_ids, task="support", max_new_tokens=64):
        print(event.text, end="")

One thread runs the loop (`step`): it admits waiting requests (each prefilled alone, from the longest
cached start of its prompt, within a budget of prefill tokens per step), steps every running row one
token (or one token plus a draft), and retires finished rows at once. A request's tokens are what
`generate` gives it alone, greedy or seeded. Encoder-decoder artifacts run one request at a time through
their generation loop inside the same thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from spexport.artifact.ports import LOGITS_POSITIONS
from spexport.errors import ArtifactError, InputError, SpexportError
from spexport.families import DECODER
from spexport.runtime import inputs
from spexport.runtime.base import TaskTable, running
from spexport.runtime.generation import GenerationConfig
from spexport.runtime.prefix_cache import DEFAULT_BLOCK, DEFAULT_BYTES, PrefixCache
from spexport.runtime.requests import RUNNING, Completion, Event, LogitsProcessor, Request, TokenLogprob
from spexport.runtime.rowbatch import RowBatch
from spexport.runtime.session import first_line
from spexport.runtime.text import check_stop

__all__ = ["Completion", "Engine", "Event", "LogitsProcessor", "Request", "TokenLogprob"]

MAX_RUNNING_ROWS = 64
MAX_PREFILL_TOKENS = 2048
REBUILD_WASTE = 0.5  # rebuild a batch whose past is more than this share masked slots


class _Row:
    """One sequence in the running batch: a request's row (an ensemble request has one per member)."""

    def __init__(self, request: Request, task_id: int):
        self.request, self.task_id = request, task_id
        self.kv: list[np.ndarray] | None = None  # its past while it is outside a batch
        self.draft: list[int] = []


class Engine:
    """Continuous batching over `model` (a decoder-only or encoder-decoder model from `load`).

    max_running_rows: rows stepped together at most (an ensemble request takes one per member).
    max_prefill_tokens: prompt tokens prefilled per step at most (a longer prompt still runs, alone).
    prefix_cache_bytes: memory for the KV of prompts already run (0: no prefix reuse); block_size: its
    granularity in tokens. prompt_lookup_num_tokens: the default draft length of greedy requests (0: none).
    background: run the loop in a thread of its own (else iterating a request drives it).
    """

    def __init__(self, model, max_running_rows: int = MAX_RUNNING_ROWS, max_prefill_tokens: int = MAX_PREFILL_TOKENS,
                 prefix_cache_bytes: int = DEFAULT_BYTES, block_size: int = DEFAULT_BLOCK,
                 prompt_lookup_num_tokens: int = 0, background: bool = True):
        for name, value, low in [("max_running_rows", max_running_rows, 1), ("max_prefill_tokens",
                                 max_prefill_tokens, 1), ("prefix_cache_bytes", prefix_cache_bytes, 0),
                                 ("block_size", block_size, 1), ("prompt_lookup_num_tokens",
                                                                 prompt_lookup_num_tokens, 0)]:
            if not inputs.is_whole(value) or value < low:
                raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not model.family.generates:
            raise InputError(f"the engine generates text; this {model.family.display_name} artifact {model.DOES}")
        self.model = model
        self.decoder = model.family is DECODER  # the engine batches rows of a KV prefix; others run whole
        self.max_running_rows, self.max_prefill_tokens = max_running_rows, max_prefill_tokens
        self.lookup = prompt_lookup_num_tokens
        self.cache = PrefixCache(prefix_cache_bytes, block_size)
        self.graph = model.step_graph() if self.decoder else None
        self.steps = 0  # decode steps run, and rows in them: for tests and reports
        self.stepped_rows = 0
        self._incoming: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._joining: list[_Row] = []
        self._batches: list[tuple[RowBatch, list[_Row]]] = []
        self._wake = threading.Condition()
        self._closing = False
        self._background = background
        self._thread: threading.Thread | None = None
        self._step_lock = threading.Lock()

    # -- the caller's side ---------------------------------------------------------------------------

    def submit(self, prompt_ids, task: str | Sequence[str] | None = None, max_new_tokens: int = 20,
               do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, repetition_penalty: float = 1.0,
               prompt_lookup_num_tokens: int | None = None, stop: str | Sequence[str] | None = None,
               logits_processors: Sequence[LogitsProcessor] = (), logprobs: int | None = None,
               listener: Callable[[Event | SpexportError], None] | None = None) -> Request:
        """Queue one prompt (token ids) for `task` (a task name, an ensemble's name, or a tuple of member
        task names) with generate's settings; the returned Request yields its events as they come.

        stop: strings that end the reply (TextStream's rules). logits_processors: callables
        (tokens, logits) -> logits, applied in order. logprobs: k for each token's log-probability and its k
        best alternatives. prompt_lookup_num_tokens: draft length for this request (None: the engine's).
        listener: called in the engine thread with each event (or the request's error) instead of
        queueing them for iteration.
        """
        table = self.model.task_table() if self.decoder else None
        ids = self._prompt(prompt_ids)
        task_ids = self._task_ids(task, table)
        config = GenerationConfig(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty)
        lookup = self.lookup if prompt_lookup_num_tokens is None else prompt_lookup_num_tokens
        if not inputs.is_whole(lookup) or lookup < 0:
            raise InputError(f"prompt_lookup_num_tokens must be a whole number >= 0, got {lookup!r}")
        if logprobs is not None and (not inputs.is_whole(logprobs) or not 0 <= logprobs <= 20):
            raise InputError(f"logprobs must be None or a whole number in [0, 20], got {logprobs!r}")
        processors = tuple(logits_processors or ())
        if not all(callable(p) for p in processors):
            raise InputError("logits_processors must be callables (tokens, logits) -> logits")
        if not self.decoder and (processors or logprobs is not None):
            raise InputError("logits_processors and logprobs need a decoder-only artifact")
        stops = check_stop(stop)
        codec = self.model.text_codec()
        if stops and codec is None:
            raise InputError(f"{self.model.folder} has no tokenizer.json, so stop strings cannot be matched")
        count = self._count(ids, task_ids, table, max_new_tokens)
        drive = None if self._background else self._drive
        request = Request(ids, task_ids, config, count, codec, stops, processors,
                          logprobs, lookup, set(self.model.info.eos_token_ids), listener, self.model.info.vocab_size,
                          drive)
        request.table, request.graph = table, self.graph.graph if self.graph is not None else None
        with self._wake:
            if self._closing:
                raise InputError("the engine is closed; it takes no more requests")
            self._incoming.append(request)
            self._wake.notify()
        self.start()
        return request

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread (None until started, or without background)."""
        return self._thread

    def start(self) -> None:
        """Start the loop's thread now (submit starts it otherwise); nothing without background."""
        with self._wake:
            if self._background and self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="spexport-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Finish every request already submitted, then stop the loop's thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            while self.step():
                pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt(self, prompt_ids) -> list[int]:
        ids = inputs.as_token_matrix(prompt_ids, self.model.info.vocab_size, 1)
        return ids[0].tolist()

    def _task_ids(self, task, table: TaskTable | None) -> list[int]:
        names = list(table.names) if table is not None else self.model.tasks
        members = getattr(self.model, "ensembles", {}).get(task) if isinstance(task, str) else None
        if members is None and isinstance(task, (tuple, list)):
            members = tuple(task)
            if not members:
                raise InputError("an ensemble needs at least one member task")
        if members is not None and not self.decoder:
            raise InputError("ensembles in the engine need a decoder-only artifact")
        return inputs.task_indices(list(members), names, len(members)) if members is not None \
            else inputs.task_indices(task, names, 1)

    def _count(self, ids: list[int], task_ids: list[int], table: TaskTable | None, max_new_tokens: int) -> int:
        """The most tokens the request may get: max_new_tokens, or fewer where its positions run out (an
        encoder-decoder model's generation loop checks its own)."""
        if table is None:
            return max_new_tokens
        positions = self.model.info.max_positions - max(table.positions[t] for t in task_ids)
        if len(ids) > positions:
            raise InputError(f"prompt of {len(ids)} tokens is too long: with its task's virtual tokens the model "
                             f"allows {positions} (max positions {self.model.info.max_positions})")
        return min(max_new_tokens, positions - len(ids))

    def _drive(self) -> bool:
        with self._step_lock:
            return self.step()

    # -- the loop -------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._waiting or self._batches or self._joining or self._closing):
                    self._wake.wait()
                if self._closing and not (self._incoming or self._waiting or self._batches or self._joining):
                    return
            try:
                self.step()
            except Exception as e:  # the loop outlives any one step: its running requests fail, in one line
                error = ArtifactError(f"the engine failed running a step ({first_line(e)})")
                for row in self._joining + [row for _, rows in self._batches for row in rows]:
                    row.request.fail(error)
                self._batches, self._joining = [], []

    def step(self) -> bool:
        """One iteration: step the running rows, admit (prefill) waiting requests, retire finished rows.
        Returns whether requests remain."""
        with self._wake:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.finish("cancelled")
        if not self.decoder:
            self._run_one()
        else:
            for batch, rows in self._batches:
                self._decode(batch, rows)
            # finished rows leave and new ones join in one rebuild, before the next step
            self._admit()
            self._regroup()
        return bool(self._waiting or self._batches or self._joining or self._incoming)

    def running_rows(self) -> int:
        """Rows in the running batch (with those that join it at the next step)."""
        return sum(len(rows) for _, rows in self._batches) + len(self._joining)

    def _admit(self) -> None:
        budget = self.max_prefill_tokens
        while self._waiting and budget > 0:
            request = self._waiting[0]
            running_rows = self.running_rows()
            if running_rows and running_rows + len(request.task_ids) > self.max_running_rows:
                return
            self._waiting.popleft()
            if request.count <= 0:
                request.finish("length")
                continue
            try:
                rows, logits, cost = self._prefill(request)
                request.state = RUNNING
                request.accept(request.pick(logits))
                request.flush()
            except SpexportError as e:
                request.fail(e)
                continue
            budget -= cost
            if not request.finished:
                self._joining.extend(rows)

    def _prefill(self, request: Request) -> tuple[list[_Row], list[np.ndarray], int]:
        """Run the request's prompt once per row, each alone from its longest cached start."""
        graph, table, prompt = self.graph, request.table, request.prompt
        rows, logits, cost = [], [], 0
        for task_id in request.task_ids:
            key = (table.names[task_id], id(table.prompts[task_id]) if table.prompts is not None else None)
            hit = self.cache.lookup(key, prompt)
            if hit is None:
                past, slots = self.model.row_start(task_id, table)
                cached = 0
            else:
                past, slots, cached = hit
            fed = prompt[cached:]
            start = past[0].shape[1]
            feeds = {"input_ids": np.array([fed], np.int64), "attention_mask": np.ones((1, start + len(fed)), np.int64),
                     "position_ids": (start + np.arange(len(fed), dtype=np.int64))[None],
                     **self.model.batch_feeds([task_id]),
                     **{name: np.ascontiguousarray(p[None]) for name, p in zip(graph.past_names, past)}}
            if graph.positional:
                feeds[LOGITS_POSITIONS] = np.array([[len(fed) - 1]], np.int64)
            with running(graph.graph):
                out = graph.session.run(["logits", *graph.present_names], feeds)
            row = _Row(request, task_id)
            row.kv = [present[0] for present in out[1:]]
            self.cache.store(key, prompt, row.kv, slots, owner=table.prompts)
            request.cached_tokens = max(request.cached_tokens, cached)
            rows.append(row)
            logits.append(out[0][0, -1])
            cost += len(fed)
        return rows, logits, cost

    def _regroup(self) -> None:
        """Rebuild the batches when rows joined or left (or too many slots are masked): finished rows
        free their KV here, before the next step."""
        changed = bool(self._joining) or any(
            batch.wasted > REBUILD_WASTE or any(row.request.finished or row.request.cancelled for row in rows)
            for batch, rows in self._batches)
        if not changed:
            return
        pool = list(self._joining)
        for batch, rows in self._batches:
            for row, kv in zip(rows, batch.take()):
                if row.request.cancelled:
                    row.request.finish("cancelled")
                if not row.request.finished:
                    row.kv = kv
                    pool.append(row)
        self._batches, self._joining = [], []
        # a sliding window counts masked slots, so its rows batch only with rows of their own length
        groups: dict[int, list[_Row]] = {}
        for row in pool:
            groups.setdefault(row.kv[0].shape[1] if self.graph.windowed else 0, []).append(row)
        for rows in groups.values():
            batch = RowBatch(self.graph, [row.kv for row in rows], self.model.batch_feeds([r.task_id for r in rows]))
            for row in rows:
                row.kv = None
            self._batches.append((batch, rows))

    def _decode(self, batch: RowBatch, rows: list[_Row]) -> None:
        fed = []
        for row in rows:
            request = row.request
            row.draft = []
            if request.drafter is not None and not self.graph.windowed:
                row.draft = request.drafter.draft(request.prompt + request.tokens,
                                                  request.count - len(request.tokens) - 1)
            fed.append([request.tokens[-1], *row.draft])
        try:
            logits = batch.step(fed)
        except SpexportError as e:
            for row in rows:
                row.request.fail(e)
            return
        self.steps, self.stepped_rows = self.steps + 1, self.stepped_rows + len(rows)
        members: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            members.setdefault(id(row.request), []).append(i)
        for indices in members.values():
            request = rows[indices[0]].request
            if request.finished or request.cancelled:
                continue
            try:
                if len(indices) > 1:
                    request.accept(request.pick([logits[i, 0] for i in indices]))
                else:
                    self._verify(batch, indices[0], rows[indices[0]], logits)
                request.flush()
            except SpexportError as e:
                request.fail(e)

    @staticmethod
    def _verify(batch: RowBatch, i: int, row: _Row, logits: np.ndarray) -> None:
        """Pick the row's tokens after each fed slot while they agree with its draft: the longest agreeing
        prefix, plus the token after it; the rejected draft slots are masked out."""
        request, draft = row.request, row.draft
        accepted = 0
        for j in range(len(draft) + 1):
            token = request.pick([logits[i, j]])
            request.accept(token)
            if request.finished or j == len(draft) or token != draft[j]:
                break
            accepted += 1
        if draft:
            batch.reject(i, len(draft) - accepted)
            request.drafter.record(len(draft), accepted)

    def _run_one(self) -> None:
        """An encoder-decoder request, run alone through the model's generation loop."""
        if not self._waiting:
            return
        request = self._waiting.popleft()
        if request.count <= 0:
            request.finish("length")
            return
        request.state = RUNNING
        config = request.config
        columns = self.model.generate_columns(
            np.array([request.prompt]), None, self.model.tasks[request.task_ids[0]], request.count,
            do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            seed=config.seed, repetition_penalty=config.repetition_penalty)
        try:
            for column in columns:
                if request.cancelled:
                    request.finish("cancelled")
                    break
                request.accept(int(column[0]))
                request.flush()
                if request.finished:
                    break
        except SpexportError as e:
            request.fail(e)
        finally:
            columns.close()
        if not request.finished:
            request.finish("length")

