"""OpenAI's request and error shapes: a /v1/completions or /v1/chat/completions body checked into a `Sampling`
(every documented parameter honoured or refused with a 400 naming it), and the error JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from spexport.serve.params import (
    CHAT_ONLY,
    COMPLETIONS_ONLY,
    EXTENSIONS,
    SHARED,
    check_known,
    number,
    refuse_unless_default,
)

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4
MAX_N = 16
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # OpenAI's limits for logprobs and top_logprobs
MAX_LOGIT_BIAS = 300


class RequestError(Exception):
    """A request the server refuses, with OpenAI's error fields and an HTTP status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Sampling:
    """How one request chooses tokens, in the runtime's terms (transformers' names), and what it returns.

    `n` choices are n engine requests of the same prompt, choice i seeded with seed + i when a seed is given.
    `logits_processors` (logit bias, penalties, grammar) apply in order before each token is chosen;
    `logprobs` is None (none asked) or k >= 0 alternatives per token."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None
    logits_processors: tuple = ()
    include_usage: bool = False
    echo: bool = False
    top_k: int = 0
    repetition_penalty: float = 1.0
    user: str | None = None

    def runtime_kwargs(self) -> dict:
        """The decoding keywords of the runtime's generate (processors, logprobs and stop are the engine's)."""
        kwargs = {"max_new_tokens": self.max_new_tokens}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                          seed=self.seed)
        return kwargs

    def choice_seed(self, index: int) -> int | None:
        """The seed of choice `index` of n."""
        return None if self.seed is None else self.seed + index


def sampling(body: dict, max_tokens_limit: int, endpoint: str = "completions", processors=None) -> Sampling:
    """The sampling fields of a completions (`endpoint="completions"`) or chat body, checked.

    `processors(body) -> tuple` builds the logits processors (it needs the model's tokenizer); unknown and
    unsupported parameters are refused here, before anything runs."""
    check_known(body, SHARED | (CHAT_ONLY if endpoint == "chat" else COMPLETIONS_ONLY) | EXTENSIONS, RequestError)
    refuse_unless_default(body, endpoint, RequestError)
    max_tokens = _max_tokens(body, max_tokens_limit, endpoint)
    temperature = float(number(body, "temperature", 1.0, 0.0, 2.0, RequestError))
    top_p = float(number(body, "top_p", 1.0, 0.0, 1.0, RequestError))
    if top_p == 0.0:
        raise RequestError("top_p must be greater than 0", param="top_p")
    seed = number(body, "seed", None, 0, 2**63 - 1 - MAX_N, RequestError, integer=True)
    n = number(body, "n", 1, 1, MAX_N, RequestError, integer=True)
    best_of = number(body, "best_of", None, 1, MAX_N, RequestError, integer=True)
    if best_of not in (None, n):
        raise RequestError("best_of must equal n (or be left out): this server returns every choice it generates",
                           param="best_of")
    return Sampling(max_tokens, temperature > 0, temperature, top_p, seed, stop=_stops(body), n=n,
                    logprobs=_logprobs(body, endpoint), logits_processors=processors(body) if processors else (),
                    include_usage=_include_usage(body), echo=_flag(body, "echo"),
                    top_k=number(body, "top_k", 0, 0, 2**31 - 1, RequestError, integer=True),
                    repetition_penalty=float(number(body, "repetition_penalty", 1.0, 1e-3, 100.0, RequestError)),
                    user=_user(body))


def _max_tokens(body: dict, limit: int, endpoint: str) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if endpoint != "chat" and name == "max_completion_tokens":
        raise RequestError("max_completion_tokens is for /v1/chat/completions; use max_tokens",
                           param="max_completion_tokens")
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is not None:
        raise RequestError("give max_completion_tokens or max_tokens, not both", param="max_tokens")
    default = MAX_TOKENS_DEFAULT if endpoint != "chat" else min(limit, 256)
    return number(body, name, default, 1, limit, RequestError, integer=True)


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them",
                           param="stop")
    return stop


def _logprobs(body: dict, endpoint: str) -> int | None:
    most = MAX_LOGPROBS[endpoint]
    if endpoint == "completions":
        return number(body, "logprobs", None, 0, most, RequestError, integer=True)
    wanted = _flag(body, "logprobs")
    top = number(body, "top_logprobs", None, 0, most, RequestError, integer=True)
    if top is not None and not wanted:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if wanted else None


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise RequestError("stream_options takes only include_usage", param="stream_options")
    if not body.get("stream"):
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    if options.get("include_obfuscation"):
        raise RequestError("stream_options.include_obfuscation is not supported", param="stream_options")
    return _flag(options, "include_usage", where="stream_options.include_usage")


def _flag(body: dict, name: str, where: str | None = None) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{where or name} must be true or false", param=where or name)
    return value


def _user(body: dict) -> str | None:
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise RequestError(f"{name} must be a string of at most 256 characters", param=name)
    return body.get("user") or body.get("safety_identifier")


def logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({token id as a string: bias in [-100, 100]}), checked against the vocabulary."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise RequestError(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids -> numbers",
                           param="logit_bias")
    bias = {}
    for key, number_ in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() and len(key) < 10 else None
        if token is None or token >= vocab_size:
            raise RequestError(f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                               param="logit_bias")
        if isinstance(number_, bool) or not isinstance(number_, (int, float)) or not -100 <= number_ <= 100:
            raise RequestError(f"logit_bias: the bias of token {key} must be a number in [-100, 100]",
                               param="logit_bias")
        bias[token] = float(number_)
    return bias


def task_name(body: dict, tasks: list[str], ensembles=()) -> str:
    """The task or ensemble the body's `model` names."""
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("model is required: the name of a task, see GET /v1/models", param="model")
    if model not in tasks and model not in ensembles:
        names = ", ".join(tasks) + (f"; its ensembles {', '.join(ensembles)}" if ensembles else "")
        raise RequestError(f"the model {model[:100]!r} does not exist: this artifact's tasks are {names}",
                           param="model", code="model_not_found", status=404)
    return model


def prompts(body: dict, max_prompts: int | None = None, max_chars: int | None = None) -> list[str]:
    """The prompts of a completions body; more than `max_prompts`, or one longer than `max_chars`, is a 400."""
    prompt = body.get("prompt")
    prompt = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) and p for p in prompt):
        raise RequestError("prompt must be a non-empty string or a non-empty list of them", param="prompt")
    if max_prompts is not None and len(prompt) > max_prompts:
        raise RequestError(f"{len(prompt)} prompts in one request; this server takes at most {max_prompts}",
                           param="prompt", code="too_many_prompts")
    for text in prompt:
        check_chars(text, max_chars, "prompt")
    return prompt


def check_chars(text: str, max_chars: int | None, param: str) -> None:
    if max_chars is not None and len(text) > max_chars:
        raise RequestError(f"a {param} of {len(text)} characters is longer than this server takes ({max_chars})",
                           param=param, code="context_length_exceeded")


def stream_flag(body: dict) -> bool:
    return _flag(body, "stream")


def messages(body: dict, max_chars: int | None = None) -> list[dict]:
    """The conversation of a chat body: string contents, or content parts of type text joined into one string."""
    value = body.get("messages")
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    conversation = []
    for i, message in enumerate(value):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, developer, user or assistant (tool messages "
                               "need tools, which this server does not support)", param=f"messages[{i}].role")
        unknown = set(message) - {"role", "content", "name"}
        if unknown:
            raise RequestError(f"messages[{i}].{sorted(unknown)[0]} is not supported", param=f"messages[{i}]")
        content = _content(message.get("content"), i)
        check_chars(content, max_chars, "messages")
        conversation.append({"role": "system" if role == "developer" else role, "content": content})
    return conversation


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise RequestError(f"messages[{i}].content: only text parts ({{type: text, text: ...}}) are "
                                   f"supported, got type {str(part.get('type'))[:40]!r}",
                                   param=f"messages[{i}].content")
        return "".join(part["text"] for part in content)
    raise RequestError(f"messages[{i}].content must be a string or a non-empty list of text parts",
                       param=f"messages[{i}].content")
