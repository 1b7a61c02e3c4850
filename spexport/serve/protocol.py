"""OpenAI's request and error shapes: checking a request body into a `Completion`, and the error JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4


class RequestError(Exception):
    """A request the server refuses, with OpenAI's error fields and an HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """How one request chooses tokens, in the runtime's terms."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)

    def runtime_kwargs(self) -> dict:
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"{name} must be {kind} in [{low}, {high}], got {value!r}", param=name)
    return value


def sampling(body: dict, max_tokens_limit: int) -> Sampling:
    """The sampling fields of a completions or chat body, checked."""
    max_tokens = _number(body, "max_tokens", MAX_TOKENS_DEFAULT, 1, max_tokens_limit, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0.0:
        raise RequestError("top_p must be greater than 0", param="top_p")
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                           param="stop")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("n must be 1: this server returns one choice per prompt", param="n")
    return Sampling(max_tokens, temperature > 0, temperature, top_p, seed, stop)


def task_name(body: dict, tasks: list[str], ensembles=()) -> str:
    """The task or ensemble the body's `model` names."""
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model is required: the name of a task, see GET /v1/models", param="model")
    if model not in tasks and model not in ensembles:
        names = ", ".join(tasks) + (f"; its ensembles {', '.join(ensembles)}" if ensembles else "")
        raise RequestError(f"the model {model!r} does not exist: this artifact's tasks are {names}",
                           param="model", code="model_not_found", status=404)
    return model


def prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompt = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) and p for p in prompt):
        raise RequestError("prompt must be a non-empty string or a non-empty list of them", param="prompt")
    return prompt


def stream_flag(body: dict) -> bool:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", param="stream")
    return stream


def messages(body: dict) -> list[dict]:
    value = body.get("messages")
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise RequestError("messages must be a non-empty list of {role, content} objects with string values",
                           param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]
