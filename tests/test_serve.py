"""`spexport serve`: the OpenAI-compatible API answers exactly what the runtime answers for each request alone,
batches concurrent requests across tasks, refuses bad requests in OpenAI's error shape without dying, and
finishes its requests in flight on SIGTERM. Servers listen on 127.0.0.1 only, on a port the OS picks."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from spexport.runtime import load  # noqa: E402
from spexport.serve.protocol import Sampling  # noqa: E402
from spexport.serve.scheduler import Job, Scheduler  # noqa: E402

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world", "the cat sat", "a", "runtime models serve many tasks", "one two three four five six"]


@contextmanager
def served(artifact: Path, tmp_path: Path, *extra: str):
    """`spexport serve ARTIFACT` in a subprocess on 127.0.0.1, port chosen by the OS; yields (process, port)."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "spexport.cli", "serve", str(artifact), "--host", HOST,
                                    "--port", "0", *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        port = None
        for _ in range(600):  # at most 60 s
            text = log.read_text()
            if f"http://{HOST}:" in text:
                port = int(text.split(f"http://{HOST}:")[1].split()[0])
                break
            assert process.poll() is None, text
            time.sleep(0.1)
        assert port, log.read_text()
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def post(port: int, path: str, body, timeout: float = 60) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    connection.request("POST", path, data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def stream(port: int, body: dict, timeout: float = 60) -> list:
    """The server-sent events of a streaming request: parsed chunks, then the string "[DONE]"."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in response.read().decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load(tiny_llama["artifact"])


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    with served(tiny_llama["artifact"], tmp_path_factory.mktemp("serve")) as (_, port):
        yield port


def test_models_lists_the_tasks(server, model):
    connection = http.client.HTTPConnection(HOST, server, timeout=30)
    connection.request("GET", "/v1/models")
    listing = json.loads(connection.getresponse().read())
    assert [m["id"] for m in listing["data"]] == model.tasks == ["pt", "prefix"]
    assert listing["object"] == "list" and {m["object"] for m in listing["data"]} == {"model"}


@pytest.mark.parametrize("task", ["pt", "prefix"])
def test_greedy_completions_equal_the_runtime(server, model, task):
    status, answer = post(server, "/v1/completions", {"model": task, "prompt": PROMPTS, "max_tokens": 9,
                                                      "temperature": 0})
    assert status == 200, answer
    expected = [model.generate_text(p, task=task, max_new_tokens=9)[0] for p in PROMPTS]
    assert [c["text"] for c in answer["choices"]] == expected
    assert [c["index"] for c in answer["choices"]] == list(range(len(PROMPTS)))
    assert answer["object"] == "text_completion" and answer["model"] == task
    assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]


def test_seeded_sampling_equals_the_runtime(server, model):
    body = {"model": "pt", "prompt": "the cat sat", "max_tokens": 12, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    texts = {post(server, "/v1/completions", body)[1]["choices"][0]["text"] for _ in range(2)}
    assert texts == set(model.generate_text("the cat sat", task="pt", max_new_tokens=12, do_sample=True,
                                            temperature=0.8, top_p=0.9, seed=7))


def test_stop_cuts_the_text_before_the_stop_string(server, model):
    full = model.generate_text("hello world", task="pt", max_new_tokens=12)[0]
    stop = full[3:5]
    status, answer = post(server, "/v1/completions", {"model": "pt", "prompt": "hello world", "max_tokens": 12,
                                                      "temperature": 0, "stop": [stop]})
    assert status == 200 and answer["choices"][0]["text"] == full[:full.index(stop)]
    assert answer["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("task", ["pt", "prefix"])
def test_streaming_sends_the_runtime_text_in_pieces_then_done(server, model, task):
    events = stream(server, {"model": task, "prompt": "the cat sat", "max_tokens": 10, "temperature": 0})
    assert events[-1] == "[DONE]" and len(events) > 3
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == model.generate_text(
        "the cat sat", task=task, max_new_tokens=10)[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_concurrent_mixed_task_requests_each_get_their_own_answer(server, model):
    requests = [{"model": ["pt", "prefix"][i % 2], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 3 + i % 7,
                 "temperature": 0} for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda body: post(server, "/v1/completions", body), requests))
    for body, (status, answer) in zip(requests, answers):
        assert status == 200, answer
        assert answer["choices"][0]["text"] == model.generate_text(body["prompt"], task=body["model"],
                                                                   max_new_tokens=body["max_tokens"])[0]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "pt", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "pt", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "pt", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "pt", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": "pt", "prompt": "x", "seed": "s"}, 400, "seed"),
    ({"model": "pt", "prompt": "x", "stop": [1]}, 400, "stop"),
    ({"model": "pt", "prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"model": "pt", "prompt": ""}, 400, "prompt"),
    ({"model": "pt", "prompt": 5}, 400, "prompt"),
    ({"model": "pt", "prompt": "x", "n": 0}, 400, "n"),
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, body, status, param):
    got, answer = post(server, "/v1/completions", body)
    assert got == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert "\n" not in answer["error"]["message"]
    assert post(server, "/v1/completions", {"model": "pt", "prompt": "a", "max_tokens": 2, "temperature": 0})[0] == 200


def test_too_many_tokens_is_a_400_naming_the_limit(server):
    status, answer = post(server, "/v1/completions", {"model": "prefix", "prompt": " ".join(["cat"] * 80)})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert "too long" in answer["error"]["message"] and "max positions 64" in answer["error"]["message"]


def test_classify_and_chat_refuse_clearly_on_a_decoder_without_a_chat_template(server, model):
    status, answer = post(server, "/v1/classify", {"model": "pt", "input": "x"})
    assert status == 400 and "/v1/completions" in answer["error"]["message"]
    status, answer = post(server, "/v1/chat/completions", {"model": "pt", "messages": [{"role": "user",
                                                                                        "content": "hi"}]})
    assert status == 400 and "chat template" in answer["error"]["message"], answer


CHAT_TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}[BOS] assistant : {% endif %}")


def test_chat_completions_use_the_artifacts_template_and_equal_the_runtime(tiny_llama, tmp_path):
    import shutil

    from spexport.export import convert

    model_dir = Path(shutil.copytree(tiny_llama["model"], tmp_path / "model"))
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    artifact = tmp_path / "artifact"
    convert(model_dir, [("pt", tiny_llama["adapters"]["pt"]), ("prefix", tiny_llama["adapters"]["prefix"])],
            artifact, optimize=False)
    chat_model = load(artifact)
    conversations = {"pt": [{"role": "user", "content": "the cat sat on"}],
                     "prefix": [{"role": "system", "content": "red green"}, {"role": "user", "content": "one two"}]}
    with served(artifact, tmp_path) as (_, port):
        for task, messages in conversations.items():
            status, answer = post(port, "/v1/chat/completions", {"model": task, "messages": messages,
                                                                  "max_tokens": 8, "temperature": 0})
            assert status == 200, answer
            assert answer["object"] == "chat.completion"
            reply = answer["choices"][0]["message"]
            assert reply["role"] == "assistant"
            assert reply["content"] == chat_model.chat(messages, task=task, max_new_tokens=8)


def test_a_client_that_leaves_mid_stream_frees_the_server(server, model):
    connection = http.client.HTTPConnection(HOST, server, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": "pt", "prompt": "hello", "max_tokens": 50,
                                                              "temperature": 0, "stream": True}))
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")
    connection.close()
    status, answer = post(server, "/v1/completions", {"model": "prefix", "prompt": "a", "max_tokens": 4,
                                                      "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"] == model.generate_text("a", task="prefix",
                                                                                 max_new_tokens=4)[0]


def test_engine_flags_keep_every_answer(tiny_llama, tmp_path, model):
    """--prompt-lookup drafts and --prefix-cache-mb reuses shared starts; the answers stay the runtime's."""
    system = "one two three four five six the cat sat on the mat "
    with served(tiny_llama["artifact"], tmp_path, "--prompt-lookup", "4", "--prefix-cache-mb", "8",
                "--max-prefill-tokens", "16") as (_, port):
        for prompt in [system + "red", system + "blue", "hello world"]:
            status, answer = post(port, "/v1/completions", {"model": "pt", "prompt": prompt, "max_tokens": 20,
                                                            "temperature": 0})
            assert status == 200 and answer["choices"][0]["text"] == model.generate_text(
                prompt, task="pt", max_new_tokens=20)[0]


# -- the scheduler, in process ------------------------------------------------------------------------


def _jobs(loop, specs, stream=False):
    return [Job(task, ids, Sampling(n, False, 1.0, 1.0, None), loop, stream) for task, ids, n in specs]


def _slowed(scheduler, delay: float):
    """Each engine step waits `delay` first, so that a test can act while requests run."""
    step = scheduler.engine.step

    def slow_step():
        time.sleep(delay)
        return step()
    scheduler.engine.step = slow_step
    return scheduler


def test_scheduler_runs_concurrent_mixed_tasks_in_one_running_batch(model):
    async def main():
        scheduler = Scheduler(model)
        specs = [(["pt", "prefix"][i % 2], PROMPTS[i % len(PROMPTS)], 2 + i) for i in range(10)]
        jobs = _jobs(asyncio.get_running_loop(), [(t, model.tokenizer.encode(p).ids, n) for t, p, n in specs])
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        done = [await asyncio.wait_for(job.events.get(), 60) for job in jobs]
        await asyncio.to_thread(scheduler.stop)
        return scheduler.engine, specs, done

    engine, specs, done = asyncio.run(main())
    assert engine.steps <= 11 and engine.stepped_rows > 2 * engine.steps  # rows stepped together, not one by one
    assert [d[1] for d in done] == [model.generate_text(p, task=t, max_new_tokens=n)[0] for t, p, n in specs]


def test_a_stream_that_arrives_during_a_long_request_streams_and_ends_first(model):
    async def main():
        scheduler = _slowed(Scheduler(model), 0.01)
        loop = asyncio.get_running_loop()
        [long] = _jobs(loop, [("pt", model.tokenizer.encode("the cat sat").ids, 60)])
        [short] = _jobs(loop, [("prefix", model.tokenizer.encode("hello world").ids, 5)], stream=True)
        scheduler.start()
        scheduler.submit(long)
        while len(long.tokens) < 3:
            await asyncio.sleep(0.005)
        scheduler.submit(short)
        events = []
        while not events or events[-1][0] != "done":
            events.append(await asyncio.wait_for(short.events.get(), 60))
        running = long.request.state
        await asyncio.to_thread(scheduler.stop)
        return events, running, (await long.events.get())

    events, running, long_done = asyncio.run(main())
    assert running == "running"  # the short one ended while the long one still ran
    assert events[0][0] == "delta" and events[-1][0] == "done"
    assert "".join(e[1] for e in events[:-1]) == events[-1][1] == model.generate_text(
        "hello world", task="prefix", max_new_tokens=5)[0]
    assert long_done[1] == model.generate_text("the cat sat", task="pt", max_new_tokens=60)[0]


def test_a_cancelled_stream_stops_and_frees_its_row(model):
    async def main():
        scheduler = _slowed(Scheduler(model), 0.02)
        [job] = _jobs(asyncio.get_running_loop(), [("pt", model.tokenizer.encode("hello").ids, 60)], stream=True)
        scheduler.start()
        scheduler.submit(job)
        first = await asyncio.wait_for(job.events.get(), 60)
        job.cancelled = True
        await asyncio.to_thread(scheduler.stop)
        return first, job, scheduler.engine

    first, job, engine = asyncio.run(main())
    assert first[0] == "delta"
    assert len(job.tokens) < 30  # far fewer than the 60 tokens asked for
    assert job.request.state == "finished" and engine.running_rows() == 0
    assert all(job.events.get_nowait()[0] == "delta" for _ in range(job.events.qsize()))  # no answer for a gone client


def test_n_choices_echo_and_logprobs_run_as_engine_requests(model):
    from spexport.serve.scheduler import choices

    sampling = Sampling(8, True, 0.9, 0.95, 5)
    sampling.n, sampling.logprobs = 2, 2  # the Sampling fields the execution side consumes (CONTRACTS.md)

    async def main():
        scheduler = Scheduler(model)
        scheduler.start()
        jobs = choices("pt", model.tokenizer.encode("the cat sat").ids, sampling, asyncio.get_running_loop(),
                       False, echo_text="the cat sat")
        for job in jobs:
            scheduler.submit(job)
        done = [await asyncio.wait_for(job.events.get(), 60) for job in jobs]
        await asyncio.to_thread(scheduler.stop)
        return jobs, done

    jobs, done = asyncio.run(main())
    for i, (job, event) in enumerate(zip(jobs, done)):  # choice i is seeded with seed + i
        reply = model.generate_text("the cat sat", task="pt", max_new_tokens=8, do_sample=True, temperature=0.9,
                                    top_p=0.95, seed=5 + i)[0]
        assert event[1] == "the cat sat" + reply
        assert [lp.token for lp in job.logprobs] == job.tokens and all(len(lp.top) == 2 for lp in job.logprobs)


# -- shutdown -----------------------------------------------------------------------------------------


def test_sigterm_stops_accepting_finishes_the_request_in_flight_and_exits_0(tiny_llama, tmp_path, model):
    body = json.dumps({"model": "pt", "prompt": "the cat sat", "max_tokens": 40, "temperature": 0,
                       "stream": True}).encode()
    with served(tiny_llama["artifact"], tmp_path) as (process, port):
        # a request in flight: its headers are in, half its body is not when SIGTERM comes
        connection = socket.create_connection((HOST, port), timeout=60)
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            post(port, "/v1/completions", {"model": "pt", "prompt": "a"}, timeout=5)
        connection.sendall(body[10:])
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
        connection.close()
        assert process.wait(timeout=60) == 0
    assert reply.startswith(b"HTTP/1.1 200")
    events = [line[len("data: "):] for line in reply.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == model.generate_text(
        "the cat sat", task="pt", max_new_tokens=40)[0]


# -- encoders -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from test_encoders import SEQ, TOK, build_adapter, build_base

    from spexport.export import convert

    root = tmp_path_factory.mktemp("tiny-bert")
    model_dir = build_base("bert", root / "model")
    adapters = {"sentiment": build_adapter(model_dir, "bert", (SEQ, "prompt_tuning", 4, 3), root / "s", seed=1),
                "ner": build_adapter(model_dir, "bert", (TOK, "prefix_tuning", 3, 4), root / "n", seed=2)}
    convert(model_dir, list(adapters.items()), root / "artifact")
    return root / "artifact"


def test_classify_gives_the_runtime_pipeline_output(tiny_bert, tmp_path):
    model = load(tiny_bert)
    texts = ["the cat sat", "a good movie"]
    with served(tiny_bert, tmp_path) as (_, port):
        for task in ["sentiment", "ner"]:
            status, answer = post(port, "/v1/classify", {"model": task, "input": texts})
            assert status == 200, answer
            assert [d["result"] for d in answer["data"]] == json.loads(json.dumps(model.classify(texts, task=task)))
        status, answer = post(port, "/v1/completions", {"model": "sentiment", "prompt": "x"})
        assert status == 400 and "/v1/classify" in answer["error"]["message"]
        assert post(port, "/v1/classify", {"model": "sentiment", "input": []})[1]["error"]["param"] == "input"


# -- Ray Serve ----------------------------------------------------------------------------------------


@pytest.mark.ray
def test_ray_serve_with_two_replicas_answers_like_the_runtime(tiny_llama, tmp_path, model):
    """A local Ray (about 10 s to start here), two replicas: both answer, each exactly as the runtime."""
    pytest.importorskip("ray.serve")
    with socket.socket() as probe:  # Ray's proxy needs a fixed port: take one the OS has just given out
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    with open(tmp_path / "ray.log", "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "spexport.cli", "serve", str(tiny_llama["artifact"]),
                                    "--ray", "--replicas", "2", "--host", HOST, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(180):  # at most 3 minutes to start Ray and both replicas
            assert process.poll() is None, (tmp_path / "ray.log").read_text()
            if "serving on" in (tmp_path / "ray.log").read_text():
                break
            time.sleep(1)
        else:
            pytest.fail("Ray Serve did not start in 3 minutes: " + (tmp_path / "ray.log").read_text()[-2000:])
        replicas = set()
        for i in range(16):
            body = {"model": ["pt", "prefix"][i % 2], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 6,
                    "temperature": 0}
            connection = http.client.HTTPConnection(HOST, port, timeout=60)
            connection.request("POST", "/v1/completions", json.dumps(body))
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            replicas.add(response.getheader("x-spexport-replica"))
            assert answer["choices"][0]["text"] == model.generate_text(body["prompt"], task=body["model"],
                                                                       max_new_tokens=6)[0]
        assert len(replicas) == 2
        events = stream(port, {"model": "prefix", "prompt": "the cat sat", "max_tokens": 8, "temperature": 0})
        assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == \
            model.generate_text("the cat sat", task="prefix", max_new_tokens=8)[0]
        assert post(port, "/v1/completions", {"model": "nope", "prompt": "x"})[0] == 404
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_generate_columns_are_generate_new_tokens(model):
    import numpy as np

    ids = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int64)
    columns = np.stack(list(model.generate_columns(ids, mask, ["pt", "prefix"], max_new_tokens=7)), axis=1)
    assert (columns == model.generate(ids, mask, ["pt", "prefix"], max_new_tokens=7)[:, 5:]).all()


def test_replicas_without_ray_is_refused_in_one_line(tiny_llama):
    from click.testing import CliRunner

    from spexport.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_llama["artifact"]), "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas needs --ray" in result.output


# -- encoder-decoder ----------------------------------------------------------------------------------


def test_encoder_decoder_completions_equal_the_runtime(tmp_path):
    import torch
    from test_seq2seq import METHODS, MODELS, build_adapter, save_tokenizer

    from spexport.export import convert

    family = sorted(MODELS)[0]
    torch.manual_seed(0)
    MODELS[family]().save_pretrained(tmp_path / "model")
    save_tokenizer(tmp_path / "model")
    adapters = [(name, build_adapter(tmp_path / "model", make(n), tmp_path / name, seed=i + 1))
                for i, (name, (make, n)) in enumerate(list(METHODS.items())[:2])]
    convert(tmp_path / "model", adapters, tmp_path / "artifact")
    model = load(tmp_path / "artifact")
    requests = [{"model": adapters[i % 2][0], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4 + i % 2,
                 "temperature": 0} for i in range(6)]
    with served(tmp_path / "artifact", tmp_path) as (_, port):
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda body: post(port, "/v1/completions", body), requests))
    for body, (status, answer) in zip(requests, answers):
        assert status == 200, answer
        assert answer["choices"][0]["text"] == model.generate_text(body["prompt"], task=body["model"],
                                                                   max_new_tokens=body["max_tokens"])[0]
