"""Logits processors as OpenAI defines them, and structured output on llguidance: every reply of a greedy loop
over the runtime's own logits parses and validates against its schema or grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from json_llama import json_llama  # noqa: F401  (the fixture)

from spexport.errors import InputError
from spexport.runtime import grammar, load
from spexport.runtime.processors import LogitBias, Penalties, apply
from spexport.serve import structured
from spexport.serve.protocol import RequestError

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "ok": {"type": "boolean"}},
          "required": ["label", "score", "ok"], "additionalProperties": False}
PROMPTS = ["the cat", "yes no", '{"a"', "maybe"]


@pytest.fixture(scope="module")
def model(json_llama):  # noqa: F811  (the fixture imported above)
    return load(json_llama["artifact"])


def greedy(model, prompt: str, processors, max_new_tokens: int = 50) -> tuple[str, bool]:
    """The runtime's greedy reply through `processors`, step by step over m.logits; and whether it ended
    with EOS (rather than running out of tokens)."""
    text, ended, _ = greedy_ids(model, prompt, processors, max_new_tokens)
    return text, ended


def greedy_ids(model, prompt: str, processors, max_new_tokens: int = 50) -> tuple[str, bool, list[int]]:
    ids, new = model.tokenizer.encode(prompt).ids, []
    eos = set(model.info.eos_token_ids)
    for _ in range(max_new_tokens):
        logits = model.logits(np.array([ids + new]), task="pt")[0, -1].copy()
        token = int(np.argmax(apply(processors, new, logits)))
        if token in eos:
            return model.tokenizer.decode(new), True, new
        new.append(token)
    return model.tokenizer.decode(new), False, new


def test_penalties_are_openais_formula():
    logits = np.zeros(6, np.float32)
    out = Penalties(presence=0.5, frequency=0.25)([1, 1, 1, 4], logits.copy())
    assert out.tolist() == [0, -(3 * 0.25 + 0.5), 0, 0, -(0.25 + 0.5), 0]
    assert Penalties(0.5, 0.25)([], logits.copy()).tolist() == [0] * 6


def test_logit_bias_bans_and_forces_tokens(model):
    first = greedy_ids(model, "the cat", (), 5)[2][0]
    assert first not in greedy_ids(model, "the cat", (LogitBias({first: -100}),), 5)[2]
    assert greedy_ids(model, "the cat", (LogitBias({65: 100}),), 3)[2] == [65, 65, 65]
    assert LogitBias({10_000: 5})([], np.zeros(4, np.float32)).tolist() == [0] * 4  # beyond the vocab: no logit


def test_frequency_penalty_changes_a_repetitive_greedy_reply(model):
    favoured = LogitBias({65: 3.0})  # a token the reply would repeat
    plain = greedy_ids(model, "the cat", (favoured,), 12)[2]
    penalised = greedy_ids(model, "the cat", (favoured, Penalties(frequency=1.0)), 12)[2]
    presence = greedy_ids(model, "the cat", (favoured, Penalties(presence=5.0)), 12)[2]
    assert plain.count(65) > penalised.count(65) >= 1 and presence.count(65) == 1


def compiled(model, text: str):
    tokenizer = grammar.ll_tokenizer(model.tokenizer, model.info.vocab_size, model.info.eos_token_ids)
    return grammar.Grammar(text, tokenizer)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_json_schema_replies_parse_and_validate(model, prompt):
    reply, ended = greedy(model, prompt, (compiled(model, grammar.json_schema_grammar(SCHEMA)).processor(),))
    assert ended, reply
    jsonschema.validate(json.loads(reply), SCHEMA)


def test_json_object_with_a_bias_toward_closing_is_an_object(model):
    brace = {model.tokenizer.token_to_id(c): 50 for c in "{}"}
    reply, ended = greedy(model, "the cat", (LogitBias(brace),
                                             compiled(model, grammar.json_object_grammar()).processor()))
    assert ended and reply == "{}", reply


@pytest.mark.parametrize("prompt", PROMPTS)
def test_a_lark_grammar_reply_matches_it(model, prompt):
    lark = 'start: ("yes" | "no" | "maybe") " " NUMBER\nNUMBER: /[0-9]{1,2}/'
    reply, ended = greedy(model, prompt, (compiled(model, grammar.lark_grammar(lark)).processor(),))
    assert ended and re.fullmatch(r"(yes|no|maybe) [0-9]{1,2}", reply), reply


def test_one_grammar_processor_serves_interleaved_rows(model):
    """n choices share one request's processors: rows stepped in turn each keep their own matcher."""
    processor = compiled(model, grammar.json_schema_grammar(SCHEMA)).processor()
    rows = {p: (model.tokenizer.encode(p).ids, []) for p in PROMPTS[:3]}
    done = {}
    for _ in range(50):
        for prompt, (ids, new) in rows.items():
            if prompt in done:
                continue
            logits = model.logits(np.array([ids + new]), task="pt")[0, -1].copy()
            token = int(np.argmax(processor(new, logits)))
            if token in model.info.eos_token_ids:
                done[prompt] = model.tokenizer.decode(new)
            else:
                new.append(token)
    assert set(done) == set(rows)
    for reply in done.values():
        jsonschema.validate(json.loads(reply), SCHEMA)


def test_bad_schemas_and_grammars_are_400s_naming_the_field(model):
    for body, param in [({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
                         "response_format"),
                        ({"response_format": {"type": "json_schema",
                                              "json_schema": {"schema": {"type": "frob"}}}}, "response_format"),
                        ({"response_format": {"type": "xml"}}, "response_format"),
                        ({"guided_grammar": "start: (("}, "guided_grammar"),
                        ({"guided_grammar": ""}, "guided_grammar")]:
        with pytest.raises(RequestError) as caught:
            structured.processors(body, model, "completions")
        assert caught.value.param == param and "\n" not in caught.value.message
    with pytest.raises(InputError):
        grammar.json_schema_grammar([1])


def test_processors_come_in_openais_order(model):
    body = {"logit_bias": {"5": 1}, "presence_penalty": 0.5, "response_format": {"type": "json_object"}}
    found = structured.processors(body, model, "chat")
    assert [type(p).__name__ for p in found] == ["LogitBias", "Penalties", "GrammarProcessor"]
    assert structured.processors({"response_format": {"type": "text"}}, model, "chat") == ()


def test_a_tokenizer_llguidance_cannot_use_is_a_400_naming_the_field(tiny_llama):
    """The tiny Llama's bare Metaspace decoder is one llguidance does not take."""
    with pytest.raises(RequestError) as caught:
        structured.processors({"response_format": {"type": "json_object"}}, load(tiny_llama["artifact"]), "chat")
    assert caught.value.param == "response_format" and "llguidance cannot use" in caught.value.message


def test_the_server_answers_with_json_that_validates_through_the_engine(json_llama):  # noqa: F811
    """End to end: /v1/completions with a JSON schema runs the grammar in the engine (rows of different
    prompts in one batch, each with its own matcher), and every reply parses and validates."""
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    from spexport.serve.app import create_app

    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    with TestClient(create_app(json_llama["artifact"])) as client:
        def ask(prompt: str):
            return client.post("/v1/completions", json={"model": "pt", "prompt": prompt, "max_tokens": 60,
                                                        "response_format": schema_format})

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(ask, PROMPTS))
        grammar_text = client.post("/v1/completions", json={"model": "pt", "prompt": "yes", "max_tokens": 20,
                                                           "guided_grammar": 'start: "yes" | "no"'})
    for answer in answers:
        assert answer.status_code == 200, answer.text
        jsonschema.validate(json.loads(answer.json()["choices"][0]["text"]), SCHEMA)
    assert grammar_text.status_code == 200 and grammar_text.json()["choices"][0]["text"] in ("yes", "no")
