"""The HTTP edge of `spexport serve`: API keys, limits, health and readiness, metrics, access logs, and the
bodies a parser or tokenizer chokes on; the official openai client against it. Servers are subprocesses on
127.0.0.1, on a port the OS picks."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from test_serve import HOST, served

from spexport.cli import main
from spexport.runtime import load
from spexport.serve.auth import authorized
from spexport.serve.limits import Admission, QueueFull

KEYS = ["key-one-0123456789abcdef", "key-two-0123456789abcdef"]
ENV_KEY = "key-env-0123456789abcdef"


def request(port: int, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEYS[0],
            timeout: float = 60) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if body is None or isinstance(body, (bytes, str)) or hasattr(body, "__iter__") and not isinstance(
        body, dict) else json.dumps(body)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
               **(headers or {})}
    connection.request(method, path, data, headers, encode_chunked=headers.get("Transfer-Encoding") == "chunked")
    response = connection.getresponse()
    raw = response.read()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"raw": raw.decode(errors="replace")}
    return response.status, answer, {k.lower(): v for k, v in response.getheaders()}


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load(tiny_llama["artifact"])


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("SPEXPORT_API_KEY", ENV_KEY)
    folder = tmp_path_factory.mktemp("edge")
    with served(tiny_llama["artifact"], folder, "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-body-bytes",
                "20000", "--max-prompts", "4", "--max-prompt-chars", "2000", "--max-tokens", "24",
                "--max-queue", "3") as (process, port):
        yield port, folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def client(port: int, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key=key, max_retries=0, timeout=60)


def test_keys_are_required_and_any_configured_key_opens(server):
    port, _ = server
    body = {"model": "pt", "prompt": "a", "max_tokens": 2}
    for key in [None, "wrong-key-0123456789abcdef", KEYS[0][:-1]]:
        status, answer, headers = request(port, "POST", "/v1/completions", body, key=key)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", answer
        assert headers["www-authenticate"] == "Bearer"
    for key in [*KEYS, ENV_KEY]:
        assert request(port, "POST", "/v1/completions", body, key=key)[0] == 200
    assert request(port, "GET", "/metrics", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        client(port, "wrong-key-0123456789abcdef").completions.create(model="pt", prompt="a", max_tokens=2)


def test_health_and_ready_are_open(server):
    port, _ = server
    assert request(port, "GET", "/health", key=None)[:2] == (200, {"status": "ok"})
    status, answer, _ = request(port, "GET", "/ready", key=None)
    assert status == 200 and answer["status"] == "ready" and answer["tasks"] == ["pt", "prefix"]


def test_constant_time_check_takes_only_bearer_tokens():
    keys = tuple(k.encode() for k in KEYS)
    assert authorized(b"Bearer " + keys[1], keys) and authorized(b"bearer " + keys[0], keys)
    assert not authorized(keys[0], keys) and not authorized(b"Basic " + keys[0], keys) and not authorized(None, keys)
    assert authorized(None, ())


def test_a_public_address_needs_a_key_or_an_explicit_opt_out(tiny_llama, monkeypatch):
    monkeypatch.delenv("SPEXPORT_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", str(tiny_llama["artifact"]), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--api-key" in result.output and "--allow-unauthenticated" in result.output
    result = CliRunner().invoke(main, ["serve", str(tiny_llama["artifact"]), "--api-key", "short"])
    assert result.exit_code == 2 and "at least 16" in result.output


def test_bodies_over_the_limit_are_413_before_they_are_read(server):
    port, _ = server
    big = json.dumps({"model": "pt", "prompt": "a" * 30_000})
    status, answer, _ = request(port, "POST", "/v1/completions", big)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    chunks = (big[i:i + 1000].encode() for i in range(0, len(big), 1000))  # no Content-Length: counted as it comes
    status, answer, _ = request(port, "POST", "/v1/completions", chunks, headers={"Transfer-Encoding": "chunked"})
    assert status == 413 and answer["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": ["a"] * 5}, "prompt", "too_many_prompts"),
    ({"prompt": "a" * 2001}, "prompt", "context_length_exceeded"),
    ({"prompt": "a", "max_tokens": 25}, "max_tokens", None),
    ({"prompt": ["a", "b"], "n": 3}, "n", None),
])
def test_limits_are_400s_naming_the_field(server, body, param, code):
    status, answer, _ = request(server[0], "POST", "/v1/completions", {"model": "pt", **body})
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["code"] == code, answer


def test_a_full_queue_is_a_429_with_retry_after(server):
    status, answer, headers = request(server[0], "POST", "/v1/completions",
                                      {"model": "pt", "prompt": ["a", "b"], "n": 2})  # 4 generations, room for 3
    assert status == 429 and headers["retry-after"] == "1" and answer["error"]["type"] == "rate_limit_error"
    admission = Admission(2)
    admission.enter(2)
    with pytest.raises(QueueFull):
        admission.enter(1)
    admission.leave(2)
    with admission.admitted(2):
        assert admission.depth == 2
    assert admission.depth == 0


@pytest.mark.parametrize("body", [
    b"[" * 15_000,  # nesting past the parser's recursion limit
    b'{"model": "pt", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",  # more digits than int() takes
    b'{"model": "pt", "prompt": "\xff\xfe"}',  # not UTF-8
    b'{"model": "pt", "prompt": "a", "temperature": NaN}',
    b'{"model": "pt", "prompt": "a", "temperature": Infinity}',
    b'{"model": "pt", "prompt": "\\ud800 lone surrogate"}',
    b'{"model": "pt", "prompt": "nul \\u0000 byte", "max_tokens": 2}',
    b'{"model": ["pt"], "prompt": "a"}',
    b'{"model": "pt", "prompt": "a", "stop": {"x": 1}}',
])
def test_bodies_parsers_and_tokenizers_choke_on_are_4xx_never_500(server, body):
    status, answer, _ = request(server[0], "POST", "/v1/completions", body)
    assert status in (200, 400), answer
    if status == 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
        assert "\n" not in answer["error"]["message"]
    assert request(server[0], "POST", "/v1/completions", {"model": "pt", "prompt": "a", "max_tokens": 2})[0] == 200


def test_request_ids_are_echoed_and_access_logs_are_json(server):
    port, folder = server
    status, _, headers = request(port, "GET", "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert status == 200 and headers["x-request-id"] == "abc-123"
    _, _, headers = request(port, "GET", "/v1/models", headers={"X-Request-Id": "bad id\twith tab"})
    assert len(headers["x-request-id"]) == 32  # a made-up id is replaced with one of the server's
    time.sleep(0.2)
    lines = [json.loads(line) for log in folder.glob("serve-*.log") for line in log.read_text().splitlines()
             if line.startswith("{")]
    mine = [entry for entry in lines if entry["request_id"] == "abc-123"]
    assert mine and mine[0]["path"] == "/v1/models" and mine[0]["status"] == 200 and mine[0]["duration_ms"] >= 0


def test_metrics_count_requests_tokens_and_latencies_per_task(server):
    port, _ = server
    for task in ["pt", "prefix"]:
        assert request(port, "POST", "/v1/completions", {"model": task, "prompt": "the cat", "max_tokens": 4,
                                                          "temperature": 0})[0] == 200
    status, answer, headers = request(port, "GET", "/metrics")
    text = answer["raw"]
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for series in ['spexport_requests_total{route="/v1/completions",status="200",task="prefix"}',
                   'spexport_prompt_tokens_total{task="pt"}', 'spexport_completion_tokens_total{task="prefix"}',
                   'spexport_time_to_first_token_seconds_count{task="pt"}',
                   'spexport_inter_token_latency_seconds_count{task="prefix"}', "spexport_batch_size_count",
                   "spexport_queue_depth 0.0", 'spexport_requests_total{route="/v1/completions",status="401",task=""}']:
        assert series in text, series
    completion = [line for line in text.splitlines() if line.startswith('spexport_completion_tokens_total{task="pre')]
    assert float(completion[0].split()[-1]) >= 4


def test_openai_client_completions_equal_the_runtime(server, model):
    c = client(server[0])
    answer = c.completions.create(model="pt", prompt=["the cat sat", "hello"], max_tokens=6, temperature=0)
    assert [ch.text for ch in answer.choices] == model.generate_text(["the cat sat", "hello"], task="pt",
                                                                     max_new_tokens=6)
    echoed = c.completions.create(model="pt", prompt="the cat sat", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "the cat sat" + answer.choices[0].text
    sampled = c.completions.create(model="pt", prompt="the cat", max_tokens=8, temperature=0.9, seed=5, n=2)
    assert [ch.text for ch in sampled.choices] == [
        model.generate_text("the cat", task="pt", max_new_tokens=8, do_sample=True, temperature=0.9, seed=s)[0]
        for s in (5, 6)]
    assert answer.usage.completion_tokens == 12


def test_openai_client_streams_with_usage(server, model):
    chunks = list(client(server[0]).completions.create(model="pt", prompt="the cat sat", max_tokens=6, temperature=0,
                                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == model.generate_text(
        "the cat sat", task="pt", max_new_tokens=6)[0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(ch.usage is None for ch in chunks[:-1])


def test_openai_client_errors_name_the_parameter(server):
    c = client(server[0])
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="pt", messages=[{"role": "user", "content": "x"}],
                                  tools=[{"type": "function", "function": {"name": "f"}}])
    assert caught.value.body["param"] == "tools" and caught.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as caught:
        c.completions.create(model="pt", prompt="x", extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"


def test_tokenizing_a_huge_prompt_never_stalls_health(tiny_llama, tmp_path):
    """The red team's 8 MB prompt froze every endpoint for 5.9 s: now it is tokenized off the event loop."""
    with served(tiny_llama["artifact"], tmp_path, "--max-body-bytes", "20000000", "--max-prompt-chars",
                "10000000") as (_, port):
        done = {}
        big = {"model": "pt", "prompt": "the cat sat on the mat " * 350_000}  # 8 MB

        def send():
            done["answer"] = request(port, "POST", "/v1/completions", big, key=ENV_KEY, timeout=120)

        thread = threading.Thread(target=send)
        thread.start()
        worst = 0.0
        while thread.is_alive():
            started = time.monotonic()
            assert request(port, "GET", "/health", key=None)[0] == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
        thread.join()
        status, answer, _ = done["answer"]
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
        assert worst < 1.0, f"/health took {worst:.2f} s while a huge prompt was tokenized"


def test_a_request_over_its_time_limit_is_a_504(tiny_llama, tmp_path):
    with served(tiny_llama["artifact"], tmp_path, "--request-timeout", "0.001") as (_, port):
        status, answer, _ = request(port, "POST", "/v1/completions", {"model": "pt", "prompt": "the cat",
                                                                      "max_tokens": 40}, key=ENV_KEY)
        assert status == 504 and answer["error"]["code"] == "timeout"
        assert request(port, "GET", "/health", key=None)[0] == 200


def test_ray_refuses_what_its_proxy_would_ignore(tiny_llama, monkeypatch):
    monkeypatch.delenv("SPEXPORT_API_KEY", raising=False)
    for extra, named in [(["--api-key", KEYS[0]], "--api-key"), (["--max-queue", "3"], "--max-queue")]:
        result = CliRunner().invoke(main, ["serve", str(tiny_llama["artifact"]), "--ray", *extra])
        assert result.exit_code == 2 and named in result.output and result.output.count("\n") == 1


def test_a_slow_client_cannot_hold_shutdown_open(tiny_llama, tmp_path):
    """A client that sends half a body and waits: SIGTERM ends the server after --shutdown-timeout."""
    import signal
    import socket

    with served(tiny_llama["artifact"], tmp_path, "--shutdown-timeout", "1") as (process, port):
        slow = socket.create_connection((HOST, port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ENV_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        time.sleep(0.5)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        assert time.monotonic() - started < 8
        slow.close()


CHAT_TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}[BOS] assistant : {% endif %}")


@pytest.fixture(scope="module")
def chat_server(tiny_llama, tmp_path_factory):
    from spexport.export import convert

    root = tmp_path_factory.mktemp("chat")
    model_dir = Path(shutil.copytree(tiny_llama["model"], root / "model"))
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    convert(model_dir, [("pt", tiny_llama["adapters"]["pt"])], root / "artifact", optimize=False)
    with served(root / "artifact", root) as (_, port):
        yield port, load(root / "artifact")


def test_openai_client_chat_honours_max_completion_tokens_and_content_parts(chat_server):
    port, model = chat_server
    c = client(port, ENV_KEY)
    messages = [{"role": "system", "content": [{"type": "text", "text": "red "}, {"type": "text", "text": "green"}]},
                {"role": "user", "content": "one two"}]
    answer = c.chat.completions.create(model="pt", messages=messages, max_completion_tokens=3, temperature=0)
    plain = [{"role": "system", "content": "red green"}, {"role": "user", "content": "one two"}]
    assert answer.choices[0].message.content == model.chat(plain, task="pt", max_new_tokens=3)
    assert answer.usage.completion_tokens == 3  # the red team got 16 tokens for max_completion_tokens=3
    chunks = list(c.chat.completions.create(model="pt", messages=plain, max_completion_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == model.chat(
        plain, task="pt", max_new_tokens=5)
    assert chunks[-1].usage.completion_tokens == 5
    two = c.chat.completions.create(model="pt", messages=plain, max_tokens=4, n=2, seed=3, temperature=0.7)
    assert [ch.message.content for ch in two.choices] == [
        model.chat(plain, task="pt", max_new_tokens=4, do_sample=True, temperature=0.7, seed=s) for s in (3, 4)]


def test_refused_streams_and_finished_requests_leave_the_queue_empty(server):
    port, _ = server
    status, answer, _ = request(port, "POST", "/v1/completions", {"model": "pt", "prompt": "a", "n": 2,
                                                                  "stream": True})
    assert status == 400 and answer["error"]["param"] == "n"
    for _ in range(3):  # more generations than the queue holds, one request after another
        body = {"model": "pt", "prompt": ["a", "b"], "max_tokens": 2}
        assert request(port, "POST", "/v1/completions", body)[0] == 200
    assert "spexport_queue_depth 0.0" in request(port, "GET", "/metrics")[1]["raw"]


def test_logprobs_logit_bias_and_penalties_change_the_answer_through_the_engine(server):
    """The red team found logprobs, penalties and logit_bias accepted with no effect: the engine runs each."""
    body = {"model": "pt", "prompt": "a b", "max_tokens": 4, "temperature": 0}
    status, plain, _ = request(server[0], "POST", "/v1/completions", {**body, "logprobs": 2})
    assert status == 200, plain
    logprobs = plain["choices"][0]["logprobs"]
    count = plain["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == count >= 1
    # greedy: each chosen token is the most likely of its alternatives, and a log-probability
    assert all(chosen <= 0 and abs(max(top.values()) - chosen) < 1e-4
               for top, chosen in zip(logprobs["top_logprobs"], logprobs["token_logprobs"]))
    first = plain["choices"][0]["text"]
    status, forced, _ = request(server[0], "POST", "/v1/completions",
                                {**body, "logit_bias": {"7": 100}, "logprobs": 0})
    tokens = forced["choices"][0]["logprobs"]["tokens"]
    assert status == 200 and len(set(tokens)) == 1 and forced["usage"]["completion_tokens"] == 4, forced
    assert forced["choices"][0]["text"] != first or len(set(logprobs["tokens"])) == 1
    status, penalized, _ = request(server[0], "POST", "/v1/completions",
                                   {**body, "frequency_penalty": 2.0, "presence_penalty": 2.0})
    assert status == 200, penalized


def test_structured_output_needs_a_tokenizer_llguidance_can_use(server):
    # this tiny tokenizer is one llguidance cannot use: a 400 naming response_format, never a 500
    status, answer, _ = request(server[0], "POST", "/v1/completions",
                                {"model": "pt", "prompt": "a", "response_format": {"type": "json_object"}})
    assert status == 400 and answer["error"]["param"] == "response_format" and "llguidance" in \
        answer["error"]["message"], answer
