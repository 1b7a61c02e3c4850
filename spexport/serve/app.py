"""The OpenAI-compatible HTTP API over one artifact, as a Starlette app behind the edge middleware."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from spexport.errors import InputError, OptionError, SpexportError
from spexport.serve import protocol, structured
from spexport.serve.edge import Edge, access_logger
from spexport.serve.limits import Admission, Limits, QueueFull
from spexport.serve.metrics import Metrics
from spexport.serve.protocol import RequestError
from spexport.serve.scheduler import Job, Scheduler, check_prompt, logprobs_json


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _as_request_error(e: Exception) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, InputError):
        code = "context_length_exceeded" if "too long" in str(e) else None
        return RequestError(str(e), code=code)
    message = " ".join(f"the server failed on this request: {e}".split())
    return RequestError(message, status=500, kind="server_error")


class Server:
    """One loaded model, its scheduler, its limits and metrics, and the route handlers."""

    def __init__(self, model, max_batch_size: int = 64, limits: Limits | None = None,
                 metrics: Metrics | None = None, **engine_options):
        self.model = model
        self.limits = limits or Limits()
        self.metrics = metrics or Metrics()
        self.admission = Admission(self.limits.max_queue, self.metrics.queue)
        self.created = int(time.time())
        self.generates = model.family.generates
        self.draining = False
        if model.tokenizer is None:
            raise OptionError(f"{model.folder} has no tokenizer.json, and the server takes text: export the artifact "
                              "from a model folder that has a tokenizer")
        self.max_tokens = min(self.limits.max_tokens or model.info.max_positions, model.info.max_positions)
        self.scheduler = Scheduler(model, max_batch_size, on_batch=self.metrics.batch,
                                   **engine_options) if self.generates else None

    # -- routes ------------------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        virtual = self.model.num_virtual_tokens
        return JSONResponse({"object": "list", "data": [
            {"id": task, "object": "model", "created": self.created, "owned_by": "spexport",
             "num_virtual_tokens": virtual[task]} for task in self.model.tasks] + [
            {"id": name, "object": "model", "created": self.created, "owned_by": "spexport", "ensemble": list(members)}
            for name, members in self.model.ensembles.items()]})

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> JSONResponse:
        if self.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ready", "tasks": self.model.tasks})

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def completions(self, request: Request):
        return await self._generation(request, "completions", self._prepare_completion)

    async def chat(self, request: Request):
        return await self._generation(request, "chat", self._prepare_chat)

    async def classify(self, request: Request):
        try:
            body = await run_in_threadpool(_parsed, await request.body())
            if self.generates:
                raise RequestError(f"/v1/classify is for encoder artifacts; this {self.model.family.display_name} "
                                   "artifact generates text: use /v1/completions", code="unsupported_endpoint")
            task = protocol.task_name(body, self.model.tasks, self.model.ensembles)
            request.state.task = task
            texts = body.get("input", body.get("inputs"))
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise RequestError("input must be a non-empty string or a non-empty list of them", param="input")
            if len(texts) > self.limits.max_prompts:
                raise RequestError(f"{len(texts)} inputs in one request; this server takes at most "
                                   f"{self.limits.max_prompts}", param="input")
            for text in texts:
                protocol.check_chars(text, self.limits.max_prompt_chars, "input")
            with self._admitted(len(texts)):
                results = await run_in_threadpool(self.model.classify, texts, task)
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        return JSONResponse({"id": f"cls-{uuid.uuid4().hex}", "object": "classification", "model": task,
                             "data": [{"index": i, "result": r} for i, r in enumerate(results)]})

    # -- preparing a generation (in a worker thread: parsing, templates and tokenizing never hold the loop) --

    async def _generation(self, request: Request, endpoint: str, prepare):
        try:
            raw = await request.body()
            task, rows, sampling, stream = await run_in_threadpool(prepare, raw)
            request.state.task, request.state.user = task, sampling.user
            if stream and len(rows) > 1:
                raise RequestError("stream takes one prompt per request", param="prompt")
            if stream and sampling.logprobs is not None:
                raise RequestError("logprobs are returned with stream=false; ask for one or the other",
                                   param="logprobs", code="unsupported_parameter")
            if stream and sampling.n > 1:
                raise RequestError("stream takes one choice (n=1)", param="n", code="unsupported_parameter")
            loop = asyncio.get_running_loop()
            jobs = [self._job(task, ids, dataclasses.replace(sampling, seed=sampling.choice_seed(i)), stream, loop, i)
                    for _, ids in rows for i in range(sampling.n)]
            self.admission.enter(len(jobs))
        except QueueFull as e:
            return error_response(self._busy(e))
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        self.metrics.tokens(task, prompt=sum(len(j.ids) for j in jobs))
        kind = "text_completion" if endpoint == "completions" else "chat.completion"
        echoes = [text for text, _ in rows for _ in range(sampling.n)] if sampling.echo else None
        return await self._answer(jobs, task, kind, stream, sampling, echoes)

    def _prepare_completion(self, raw: bytes):
        body = _parsed(raw)
        task = self._task(body)
        sampling = protocol.sampling(body, self.max_tokens, "completions", self._processors("completions"))
        prompts = protocol.prompts(body, self.limits.max_prompts, self.limits.max_prompt_chars)
        if len(prompts) * sampling.n > self.limits.max_prompts:
            raise RequestError(f"{len(prompts)} prompts x n={sampling.n} choices is more than this server takes in "
                               f"one request ({self.limits.max_prompts})", param="n")
        rows = [(p, self._checked(task, _encoded(self.model.tokenizer, p))) for p in prompts]
        return task, rows, sampling, protocol.stream_flag(body)

    def _prepare_chat(self, raw: bytes):
        body = _parsed(raw)
        task = self._task(body)
        sampling = protocol.sampling(body, self.max_tokens, "chat", self._processors("chat"))
        if sampling.n > self.limits.max_prompts:
            raise RequestError(f"n={sampling.n} choices is more than this server takes in one request "
                               f"({self.limits.max_prompts})", param="n")
        messages = protocol.messages(body, self.limits.max_prompt_chars)
        template = getattr(self.model, "apply_chat_template", None)
        if template is None:
            raise RequestError(f"this server's runtime has no chat template support yet for artifact "
                               f"{self.model.folder}; use POST /v1/completions with a formatted prompt",
                               param="messages", code="chat_template_unsupported")
        text = template(messages, add_generation_prompt=True, tokenize=False)
        ids = _encoded(self.model.tokenizer, text, add_special_tokens=False)  # as chat encodes the conversation
        return task, [("", self._checked(task, ids))], sampling, protocol.stream_flag(body)

    def _task(self, body: dict) -> str:
        if not self.generates:
            raise RequestError(f"this {self.model.family.display_name} artifact classifies; use POST /v1/classify",
                               code="unsupported_endpoint")
        return protocol.task_name(body, self.model.tasks, self.model.ensembles)

    def _processors(self, endpoint: str):
        return lambda body: structured.processors(body, self.model, endpoint)

    def _checked(self, task: str, ids: list[int]) -> list[int]:
        return check_prompt(self.model, task, ids)

    def _job(self, task: str, ids: list[int], sampling, stream: bool, loop, choice: int = 0) -> Job:
        job = Job(task, ids, sampling, loop, stream, choice=choice)
        job.on_token = _LatencyClock(self.metrics, task)
        return job

    # -- answering ---------------------------------------------------------------------------------

    def _busy(self, e: QueueFull) -> RequestError:
        return RequestError(f"the server is busy ({e}); retry later", status=429, code="rate_limit_exceeded",
                            kind="rate_limit_error", headers={"retry-after": str(self.limits.retry_after_s)})

    @contextmanager
    def _admitted(self, count: int):
        try:
            self.admission.enter(count)
        except QueueFull as e:
            raise self._busy(e) from None
        try:
            yield
        finally:
            self.admission.leave(count)

    async def _answer(self, jobs: list[Job], task: str, kind: str, stream: bool, sampling, echoes):
        ident = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": kind, "created": int(time.time()), "model": task}
        choice = self._completion_choice if kind == "text_completion" else self._chat_choice
        for job in jobs:
            self.scheduler.submit(job)
        if stream:
            events = self._events(jobs[0], head, choice, sampling, echoes[0] if echoes else "")
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            done = await asyncio.wait_for(asyncio.gather(*(self._result(job) for job in jobs)),
                                          self.limits.request_timeout_s)
        except (RequestError, SpexportError, asyncio.TimeoutError) as e:
            return error_response(_timeout_error(self.limits) if isinstance(e, asyncio.TimeoutError)
                                  else _as_request_error(e))
        finally:
            for job in jobs:
                job.cancelled = True  # whatever is still running for this request stops and frees its slot
            self.admission.leave(len(jobs))
        usage = _usage(jobs, sum(d[2] for d in done))
        self.metrics.tokens(task, completion=usage["completion_tokens"])
        texts = [(echoes[i] if echoes else "") + text for i, (text, _, _) in enumerate(done)]
        answers = [choice(i, text, reason) for i, (text, (_, reason, _)) in enumerate(zip(texts, done))]
        for answer, job in zip(answers, jobs):
            if job.sampling.logprobs is not None:
                answer["logprobs"] = logprobs_json(self.model.text_codec(), job, kind == "chat.completion")
        return JSONResponse({**head, "choices": answers, "usage": usage})

    @staticmethod
    async def _result(job: Job) -> tuple[str, str, int]:
        while True:
            event = await job.events.get()
            if event[0] == "done":
                return event[1], event[2], event[3]
            if event[0] == "error":
                raise _as_request_error(event[1])

    async def _events(self, job: Job, head: dict, choice, sampling, echo: str):
        kind = head["object"] + (".chunk" if head["object"] == "chat.completion" else "")
        deadline = time.monotonic() + self.limits.request_timeout_s
        tokens = 0
        try:
            if echo:
                yield _sse({**head, "object": kind, "choices": [choice(0, echo, None, delta=True)]})
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    yield _sse(_timeout_error(self.limits).body())
                    break
                if event[0] == "error":
                    yield _sse(_as_request_error(event[1]).body())
                    break
                done = event[0] == "done"
                chunk = choice(0, "" if done else event[1], event[2] if done else None, delta=True)
                yield _sse({**head, "object": kind, "choices": [chunk]})
                if done:
                    tokens = event[3]
                    self.metrics.tokens(head["model"], completion=tokens)
                    if sampling.include_usage:
                        yield _sse({**head, "object": kind, "choices": [], "usage": _usage([job], tokens)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client left early, or the answer is complete: either way the slot is free
            self.admission.leave(1)

    @staticmethod
    def _completion_choice(index: int, text: str, reason: str | None, delta: bool = False) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _chat_choice(index: int, text: str, reason: str | None, delta: bool = False) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, ("delta" if delta else "message"): message, "logprobs": None,
                "finish_reason": reason}

    # -- lifecycle ---------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/classify", self.classify, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/metrics", self.metrics_route, methods=["GET"])]

    def start(self) -> None:
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self) -> None:
        """Finish the generations already submitted."""
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.stop()

    @asynccontextmanager
    async def lifespan(self, app):
        self.start()
        yield
        self.draining = True
        await run_in_threadpool(self.stop)


def _parsed(raw: bytes) -> dict:
    """The JSON object of a request body; a 400 for anything else, whatever the parser chokes on."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, a number of too many digits, nesting
        message = " ".join(str(e).split())[:200] if not isinstance(e, RecursionError) else "nested too deeply"
        raise RequestError(f"the body is not valid JSON ({message}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object", code="invalid_json")
    return body


def _encoded(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """The tokens of `text`, as generate_text (chat: add_special_tokens=False) encodes it. encode_batch, unlike
    encode, lets go of the GIL while it works, so the event loop answers other requests meanwhile."""
    try:
        return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    except Exception as e:  # the tokenizers library raises bare Exceptions for text it cannot take
        raise RequestError(f"the tokenizer cannot encode this prompt ({type(e).__name__})", param="prompt") from None


class _LatencyClock:
    """Called as each token of one generation arrives: time to the first token, then between tokens."""

    def __init__(self, metrics: Metrics, task: str):
        self.metrics, self.task, self.last, self.first = metrics, task, time.monotonic(), True

    def __call__(self) -> None:
        now = time.monotonic()
        (self.metrics.first_token if self.first else self.metrics.inter_token)(self.task, now - self.last)
        self.last, self.first = now, False


def _usage(jobs: list[Job], completion: int) -> dict:
    prompt = sum(j.prompt_tokens for j in jobs if j.choice == 0)  # a prompt counts once, whatever its n
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timeout_error(limits: Limits) -> RequestError:
    return RequestError(f"the request took longer than this server allows ({limits.request_timeout_s:g} s); ask "
                        "for fewer tokens", status=504, code="timeout", kind="timeout_error")


def _sse(document: dict) -> str:
    return f"data: {json.dumps(document)}\n\n"


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    return error_response(RequestError(f"{request.method} {request.url.path[:200]}: {exc.detail}",
                                       status=exc.status_code, code="not_found" if exc.status_code == 404 else None))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unforeseen: a 500 in OpenAI's shape, one line, no traceback to the client."""
    return error_response(_as_request_error(exc))


def create_app(model, max_batch_size: int = 64, limits: Limits | None = None, keys: tuple[bytes, ...] = (),
               trusted_keys=None, **engine_options):
    """The app over a loaded model (spexport.runtime.load) or an artifact folder, behind the edge middleware
    (request ids, API `keys`, the body limit, metrics and the access log)."""
    if isinstance(model, (str, Path)):
        from spexport.runtime import load

        model = load(model, trusted_keys=trusted_keys) if trusted_keys else load(model)
    limits = limits or Limits()
    server = Server(model, max_batch_size, limits, **engine_options)
    app = Starlette(routes=server.routes(), lifespan=server.lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return Edge(app, keys, limits.max_body_bytes, server.metrics, access_logger())
