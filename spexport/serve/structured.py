"""The logits processors of a request body: logit_bias, presence and frequency penalties, and structured
output (`response_format` json_object / json_schema, and `guided_grammar` on /v1/completions)."""

from __future__ import annotations

from spexport.errors import InputError
from spexport.runtime import grammar
from spexport.runtime.processors import LogitBias, Penalties
from spexport.serve.params import number
from spexport.serve.protocol import RequestError, logit_bias


def processors(body: dict, model, endpoint: str) -> tuple:
    """The processors `body` asks for, in the order they apply: bias, penalties, then the grammar's mask
    (last, so nothing can lift a token the grammar forbids)."""
    found = []
    bias = logit_bias(body, model.info.vocab_size)
    if bias:
        found.append(LogitBias(bias))
    presence = float(number(body, "presence_penalty", 0.0, -2.0, 2.0, RequestError))
    frequency = float(number(body, "frequency_penalty", 0.0, -2.0, 2.0, RequestError))
    if presence or frequency:
        found.append(Penalties(presence, frequency))
    text = _grammar_text(body, endpoint)
    if text is not None:
        param = "guided_grammar" if body.get("guided_grammar") is not None else "response_format"
        try:
            tokenizer = grammar.ll_tokenizer(model.tokenizer, model.info.vocab_size, model.info.eos_token_ids)
            found.append(grammar.Grammar(text, tokenizer).processor())
        except InputError as e:
            raise RequestError(str(e), param=param) from None
    return tuple(found)


def _grammar_text(body: dict, endpoint: str) -> str | None:
    lark = body.get("guided_grammar")
    if lark is not None:
        if endpoint != "completions":
            raise RequestError("guided_grammar is for /v1/completions; use response_format", param="guided_grammar")
        return _compiled(grammar.lark_grammar, lark, "guided_grammar")
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.json_object_grammar()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format.json_schema must be {name, schema: {...}}", param="response_format")
        return _compiled(grammar.json_schema_grammar, spec["schema"], "response_format")
    raise RequestError("response_format.type must be text, json_object or json_schema", param="response_format")


def _compiled(compile_, source, param: str) -> str:
    try:
        return compile_(source)
    except InputError as e:
        raise RequestError(str(e), param=param) from None
