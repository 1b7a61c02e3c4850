"""Request bodies into `Sampling`: every OpenAI parameter is honoured or refused with a 400 naming it."""

from __future__ import annotations

import pytest

from spexport.serve import protocol
from spexport.serve.params import CHAT_ONLY, COMPLETIONS_ONLY, REFUSED, SHARED
from spexport.serve.protocol import RequestError, Sampling


def parse(body: dict, endpoint: str = "completions") -> Sampling:
    return protocol.sampling({"model": "pt", **body}, 64, endpoint)


def refused(body: dict, endpoint: str = "completions") -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, endpoint)
    assert caught.value.status == 400 and "\n" not in caught.value.message
    return caught.value


def test_max_completion_tokens_is_the_chat_max_tokens():
    assert parse({"max_completion_tokens": 3}, "chat").max_new_tokens == 3
    assert parse({"max_tokens": 5}, "chat").max_new_tokens == 5
    assert refused({"max_completion_tokens": 3, "max_tokens": 4}, "chat").param == "max_tokens"
    assert refused({"max_completion_tokens": 65}, "chat").param == "max_completion_tokens"


def test_the_fields_the_engine_consumes():
    s = parse({"n": 3, "seed": 7, "stop": "x", "logprobs": 2, "echo": True, "temperature": 0.5, "top_p": 0.9,
               "user": "u-1", "stream": True, "stream_options": {"include_usage": True}})
    assert (s.n, s.seed, s.stop, s.logprobs, s.echo, s.do_sample, s.include_usage, s.user) == \
        (3, 7, ["x"], 2, True, True, True, "u-1")
    assert [s.choice_seed(i) for i in range(3)] == [7, 8, 9]
    assert parse({"temperature": 0}).do_sample is False and parse({}).logprobs is None


def test_chat_logprobs_are_top_logprobs_when_asked():
    assert parse({"logprobs": True, "top_logprobs": 4}, "chat").logprobs == 4
    assert parse({"logprobs": True}, "chat").logprobs == 0
    assert parse({"logprobs": False}, "chat").logprobs is None
    assert refused({"top_logprobs": 2}, "chat").param == "top_logprobs"
    assert refused({"logprobs": 6}).param == "logprobs"  # completions: an integer up to 5


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_each_unsupported_documented_parameter_is_refused_by_name(name):
    endpoint = "completions" if name in COMPLETIONS_ONLY else "chat"
    value = {"suffix": "x", "tools": [{"type": "function"}], "tool_choice": "auto", "parallel_tool_calls": True,
             "functions": [{"name": "f"}], "function_call": "auto", "audio": {}, "modalities": ["audio"],
             "prediction": {}, "reasoning_effort": "low", "verbosity": "low", "web_search_options": {},
             "store": True, "metadata": {"a": "b"}, "service_tier": "flex"}[name]
    error = refused({name: value}, endpoint)
    assert error.param == name and error.code == "unsupported_parameter"


def test_defaults_of_unsupported_parameters_pass():
    parse({"tools": [], "tool_choice": "none", "store": False, "service_tier": "auto", "modalities": ["text"]},
          "chat")
    parse({"suffix": None, "best_of": 1})


def test_unknown_and_misplaced_parameters_are_refused_by_name():
    assert refused({"frobnicate": 1}).param == "frobnicate"
    assert refused({"messages": []}).param == "messages"  # a chat parameter on /v1/completions
    assert refused({"echo": True}, "chat").param == "echo"
    assert refused({"best_of": 3, "n": 2}).param == "best_of"
    assert refused({"stream_options": {"include_usage": True}}).param == "stream_options"  # needs stream


def test_every_documented_parameter_has_a_fate():
    documented_completions = {"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                              "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                              "suffix", "temperature", "top_p", "user"}
    documented_chat = {"messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
                       "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
                       "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
                       "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop",
                       "store", "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs",
                       "top_p", "user", "verbosity", "web_search_options"}
    assert documented_completions <= SHARED | COMPLETIONS_ONLY
    assert documented_chat <= SHARED | CHAT_ONLY


def test_logit_bias_is_checked_against_the_vocabulary():
    assert protocol.logit_bias({"logit_bias": {"5": -100, "7": 2.5}}, 10) == {5: -100.0, 7: 2.5}
    for bad in ({"10": 1}, {"x": 1}, {"-1": 1}, {"3": 101}, {"3": True}, [1]):
        with pytest.raises(RequestError) as caught:
            protocol.logit_bias({"logit_bias": bad}, 10)
        assert caught.value.param == "logit_bias"


def test_content_part_messages_are_joined_text():
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text",
                                                                                           "text": "brief"}]},
                         {"role": "developer", "content": "x"}, {"role": "user", "content": "hi", "name": "a"}]}
    assert protocol.messages(body) == [{"role": "system", "content": "be brief"}, {"role": "system", "content": "x"},
                                       {"role": "user", "content": "hi"}]
    for bad in ([{"type": "image_url", "image_url": {"url": "x"}}], [], 5):
        with pytest.raises(RequestError) as caught:
            protocol.messages({"messages": [{"role": "user", "content": bad}]})
        assert caught.value.param == "messages[0].content"
    with pytest.raises(RequestError) as caught:
        protocol.messages({"messages": [{"role": "tool", "content": "x"}]})
    assert caught.value.param == "messages[0].role"


def test_prompt_limits_come_before_tokenizing():
    with pytest.raises(RequestError) as caught:
        protocol.prompts({"prompt": ["a"] * 3}, max_prompts=2)
    assert caught.value.code == "too_many_prompts"
    with pytest.raises(RequestError) as caught:
        protocol.prompts({"prompt": "abc"}, max_chars=2)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as caught:
        protocol.messages({"messages": [{"role": "user", "content": "abc"}]}, max_chars=2)
    assert caught.value.param == "messages"
