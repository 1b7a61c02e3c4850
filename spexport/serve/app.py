"""The OpenAI-compatible HTTP API over one artifact, as a Starlette app."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from spexport.errors import InputError, OptionError, SpexportError
from spexport.serve import protocol
from spexport.serve.protocol import RequestError
from spexport.serve.scheduler import Job, Scheduler, check_prompt


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _as_request_error(e: Exception) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, InputError):
        code = "context_length_exceeded" if "too long" in str(e) else None
        return RequestError(str(e), code=code)
    return RequestError(f"the server failed on this request: {e}", status=500, kind="server_error")


class Server:
    """One loaded model, its scheduler, and the route handlers."""

    def __init__(self, model, max_batch_size: int = 64):
        self.model = model
        self.created = int(time.time())
        self.generates = model.family.generates
        if model.tokenizer is None:
            raise OptionError(f"{model.folder} has no tokenizer.json, and the server takes text: export the artifact "
                              "from a model folder that has a tokenizer")
        self.scheduler = Scheduler(model, max_batch_size) if self.generates else None

    # -- routes ------------------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": task, "object": "model", "created": self.created, "owned_by": "spexport",
             "num_virtual_tokens": self.model.num_virtual_tokens[task]} for task in self.model.tasks]})

    async def completions(self, request: Request):
        try:
            body = await self._body(request)
            task, prompts, sampling, stream = self._generation_request(body)
            if stream and len(prompts) > 1:
                raise RequestError("stream takes one prompt per request", param="prompt")
            encode = self.model.tokenizer.encode  # as generate_text encodes a text
            jobs = [self._job(task, encode(p).ids, sampling, stream) for p in prompts]
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        return await self._answer(jobs, task, "text_completion", stream, self._completion_choice)

    async def chat(self, request: Request):
        try:
            body = await self._body(request)
            task, _, sampling, stream = self._generation_request({**body, "prompt": "-"})
            messages = protocol.messages(body)
            # token ids, as chat encodes the conversation
            ids = self.model.apply_chat_template(messages, add_generation_prompt=True)
            jobs = [self._job(task, list(ids), sampling, stream)]
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        return await self._answer(jobs, task, "chat.completion", stream, self._chat_choice)

    async def classify(self, request: Request):
        try:
            body = await self._body(request)
            if self.generates:
                raise RequestError(f"/v1/classify is for encoder artifacts; this {self.model.family.display_name} "
                                   f"artifact generates text: use /v1/completions", code="unsupported_endpoint")
            task = protocol.task_name(body, self.model.tasks)
            texts = body.get("input", body.get("inputs"))
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise RequestError("input must be a non-empty string or a non-empty list of them", param="input")
            results = await run_in_threadpool(self.model.classify, texts, task)
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        return JSONResponse({"id": f"cls-{uuid.uuid4().hex}", "object": "classification", "model": task,
                             "data": [{"index": i, "result": r} for i, r in enumerate(results)]})

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e}); send a JSON object",
                               code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", code="invalid_json")
        return body

    def _generation_request(self, body: dict):
        if not self.generates:
            raise RequestError(f"this {self.model.family.display_name} artifact classifies; use POST /v1/classify",
                               code="unsupported_endpoint")
        task = protocol.task_name(body, self.model.tasks)
        sampling = protocol.sampling(body, self.model.info.max_positions)
        return task, protocol.prompts(body), sampling, protocol.stream_flag(body)

    def _job(self, task: str, ids: list[int], sampling, stream: bool) -> Job:
        return Job(task, check_prompt(self.model, task, ids), sampling, asyncio.get_running_loop(), stream)

    async def _answer(self, jobs: list[Job], task: str, kind: str, stream: bool, choice):
        ident = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": kind, "created": int(time.time()), "model": task}
        for job in jobs:
            self.scheduler.submit(job)
        if stream:
            return StreamingResponse(self._events(jobs[0], head, choice), media_type="text/event-stream")
        try:
            done = [await self._result(job) for job in jobs]
        except (RequestError, SpexportError) as e:
            return error_response(_as_request_error(e))
        except asyncio.CancelledError:
            for job in jobs:
                job.cancelled = True
            raise
        usage = {"prompt_tokens": sum(j.prompt_tokens for j in jobs), "completion_tokens": sum(d[2] for d in done)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({**head, "choices": [choice(i, text, reason) for i, (text, reason, _) in
                                                 enumerate(done)], "usage": usage})

    @staticmethod
    async def _result(job: Job) -> tuple[str, str, int]:
        while True:
            event = await job.events.get()
            if event[0] == "done":
                return event[1], event[2], event[3]
            if event[0] == "error":
                raise _as_request_error(event[1])

    async def _events(self, job: Job, head: dict, choice):
        kind = head["object"] + (".chunk" if head["object"] == "chat.completion" else "")
        try:
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    chunk = choice(0, event[1], None, delta=True)
                elif event[0] == "done":
                    chunk = choice(0, "", event[2], delta=True)
                else:
                    yield f"data: {json.dumps(_as_request_error(event[1]).body())}\n\n"
                    break
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [chunk]})}\n\n"
                if event[0] == "done":
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client left early, or the answer is complete: either way the slot is free

    @staticmethod
    def _completion_choice(index: int, text: str, reason: str | None, delta: bool = False) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _chat_choice(index: int, text: str, reason: str | None, delta: bool = False) -> dict:
        message = {"role": "assistant", "content": text}
        return {"index": index, ("delta" if delta else "message"): message, "finish_reason": reason}

    # -- lifecycle ---------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/classify", self.classify, methods=["POST"])]

    def start(self) -> None:
        if self.scheduler is not None:
            self.scheduler.start()

    def stop(self) -> None:
        """Finish the generations already submitted."""
        if self.scheduler is not None:
            self.scheduler.stop()

    @asynccontextmanager
    async def lifespan(self, app):
        self.start()
        yield
        await run_in_threadpool(self.stop)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in OpenAI's error shape."""
    return error_response(RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                                       code="not_found" if exc.status_code == 404 else None))


def create_app(model, max_batch_size: int = 64) -> Starlette:
    """The app over a loaded model (spexport.runtime.load) or an artifact folder."""
    if isinstance(model, (str, Path)):
        from spexport.runtime import load

        model = load(model)
    server = Server(model, max_batch_size)
    app = Starlette(routes=server.routes(), lifespan=server.lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app
