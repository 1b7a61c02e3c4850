"""Which request parameters the server knows: every parameter OpenAI documents for /v1/completions and
/v1/chat/completions is honoured or refused with a 400 that names it, and a parameter nobody documents is
refused too, so that nothing a client sends is silently ignored."""

from __future__ import annotations

# honoured by both endpoints (protocol.sampling and the app read them)
SHARED = frozenset({"model", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "max_tokens", "n",
                    "seed", "stop", "stream", "stream_options", "temperature", "top_p", "user", "response_format"})
COMPLETIONS_ONLY = frozenset({"prompt", "echo", "best_of", "suffix"})
CHAT_ONLY = frozenset({"messages", "max_completion_tokens", "top_logprobs", "safety_identifier", "prompt_cache_key",
                       "store", "metadata", "service_tier", "tools", "tool_choice", "parallel_tool_calls",
                       "functions", "function_call", "audio", "modalities", "prediction", "reasoning_effort",
                       "verbosity", "web_search_options"})
# not OpenAI's: vLLM's names, for what transformers' generate also takes and for a Lark grammar
EXTENSIONS = frozenset({"top_k", "repetition_penalty", "guided_grammar"})

# documented, not supported: the value each may have (its default, meaning "not used"), and why it is refused
REFUSED = {
    "suffix": ((None, ""), "insertion (suffix) is not supported"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model has no reasoning effort setting"),
    "verbosity": ((None,), "this model has no verbosity setting"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "this server stores no completions"),
    "metadata": ((None, {}), "metadata is only used with store, and this server stores no completions"),
    "service_tier": ((None, "auto", "default"), "this server has one service tier"),
}


def check_known(body: dict, known: frozenset, error) -> None:
    """`error` (RequestError) naming the first parameter of `body` the endpoint does not know."""
    for name in body:
        if name not in known:
            raise error(f"unrecognized request argument: {str(name)[:64]!r}", param=str(name)[:64],
                        code="unknown_parameter")


def refuse_unless_default(body: dict, endpoint: str, error) -> None:
    """`error` for a documented parameter this server does not support, given a value other than its default."""
    for name, (defaults, why) in REFUSED.items():
        if name in body and not any(body[name] == d and type(body[name]) is type(d) for d in defaults):
            raise error(f"{name}: {why}", param=name, code="unsupported_parameter")
    if endpoint == "completions" and body.get("guided_grammar") is not None and body.get("response_format"):
        raise error("give guided_grammar or response_format, not both", param="guided_grammar")


def number(body: dict, name: str, default, low: float, high: float, error, integer: bool = False):
    """body[name] checked to lie in [low, high] (an int if `integer`); `default` when absent or null."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise error(f"{name} must be {kind} in [{low}, {high}], got {str(value)[:40]}", param=name)
    return value
