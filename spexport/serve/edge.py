"""The HTTP edge, as one ASGI middleware around the app: a request id (X-Request-Id, echoed), the API key,
the body-size limit (the Content-Length header first, then the bytes as they arrive), the request metrics,
and one structured JSON access-log line per request."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from spexport.serve.auth import OPEN_PATHS, authorized
from spexport.serve.protocol import RequestError

ACCESS_LOG = "spexport.access"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def access_logger() -> logging.Logger:
    """The access log: one JSON object per line on stderr."""
    logger = logging.getLogger(ACCESS_LOG)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Edge:
    """ASGI middleware: request id, key, body limit, metrics and access log around `app`."""

    def __init__(self, app, keys: tuple[bytes, ...], max_body_bytes: int, metrics, logger: logging.Logger):
        self.app, self.keys, self.max_body_bytes = app, keys, max_body_bytes
        self.metrics, self.logger = metrics, logger
        self.state = getattr(app, "state", None)  # the wrapped app's: `app.state.server`

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        seen = {"status": 500, "bytes": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                seen["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refusal(scope, headers)
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, refusal = await self._read_body(receive, headers)
                receive = _replay(body, receive)
            if refusal is not None:
                await _send_error(send_with_id, refusal)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, request_id, seen, started)

    def _refusal(self, scope, headers: dict) -> RequestError | None:
        if scope["path"] in OPEN_PATHS or authorized(headers.get(b"authorization"), self.keys):
            return None
        return RequestError("missing or invalid API key: send Authorization: Bearer <key>", status=401,
                            code="invalid_api_key", headers={"www-authenticate": "Bearer"})

    async def _read_body(self, receive, headers: dict) -> tuple[bytes, RequestError | None]:
        """The whole body, or a 413 as soon as it is known to be too large (before it is read, if the
        Content-Length says so)."""
        too_large = RequestError(f"the request body is larger than this server takes ({self.max_body_bytes} "
                                 "bytes)", status=413, code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return b"", too_large if length.isdigit() else RequestError("bad Content-Length header")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", RequestError("the client closed the connection", status=499)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _log(self, scope, request_id: str, seen: dict, started: float) -> None:
        route = scope["path"] if scope["path"] in ROUTES else "other"
        task = scope["state"].get("task", "")
        self.metrics.request(route, seen["status"], task)
        client = scope.get("client")
        self.logger.info(json.dumps({
            "ts": round(time.time(), 3), "request_id": request_id, "method": scope["method"],
            "path": scope["path"][:200], "status": seen["status"], "task": task or None,
            "duration_ms": round((time.monotonic() - started) * 1000, 1), "bytes_out": seen["bytes"],
            "client": client[0] if client else None, "user": scope["state"].get("user")}))


ROUTES = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/classify", "/health", "/ready",
                    "/metrics"})


def _replay(body: bytes, receive):
    """The body read already, then the connection's own messages (a streaming response waits on them to
    learn that the client has gone)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send, error: RequestError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
