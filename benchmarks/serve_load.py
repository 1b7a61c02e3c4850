"""Load test for `spexport serve`, on loopback only, bounded in count and time.

A random GPT-2 small (benchmarks/workloads.py, nothing downloaded) with four prompt-tuning tasks is served
by `spexport serve` in a subprocess on 127.0.0.1. Then:

1. 200 concurrent mixed-task greedy requests: errors (must be 0), p50/p99 latency, and every answer compared
   with `generate_text` for that request alone, in this process;
2. tokens/s with 32 concurrent streams against the same requests one at a time.

    python -m benchmarks.serve_load [--work DIR] [--tokenizer FOLDER] [--out benchmarks/results/serve_load.json]

--tokenizer copies a real tokenizer.json (e.g. a local SmolLM2 folder) beside the model, so the texts compared
are real text; the default is workloads' small BPE tokenizer, under which most generated ids decode to nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import workloads
from benchmarks.environment import environment

HOST = "127.0.0.1"
TASKS = [("t0", 8), ("t1", 16), ("t2", 24), ("t3", 32)]
PROMPTS = ["The quick brown fox", "Once upon a time there was", "In the beginning", "Serving many tasks at once",
           "A soft prompt is a short sequence of learned vectors", "Hello", "The weather today is",
           "One two three four five six seven eight"]
DEADLINE_S = 900  # the whole run, after the build


def build(work: Path, tokenizer: Path | None) -> Path:
    from transformers import AutoModelForCausalLM

    from spexport.export import convert

    model_dir = workloads.build_model("gpt2", work / "model")
    if tokenizer is not None:
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, model_dir / name)
    adapters = []
    for i, (name, n) in enumerate(TASKS):
        if not (work / name / "adapter_config.json").is_file():
            workloads.build_prompt_adapter(AutoModelForCausalLM.from_pretrained(model_dir), model_dir, work / name, n,
                                           seed=100 + i)
        adapters.append((name, work / name))
    artifact = work / "artifact"
    if not (artifact / "spexport.json").is_file():
        convert(model_dir, adapters, artifact, overwrite=True)
    return artifact


def start(artifact: Path, log: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "spexport.cli", "serve", str(artifact), "--host", HOST,
                                    "--port", "0", "--max-batch-size", "64"], stdout=out, stderr=subprocess.STDOUT,
                                   env=env)
    for _ in range(1200):  # 2 minutes to load
        text = log.read_text()
        if f"http://{HOST}:" in text:
            return process, int(text.split(f"http://{HOST}:")[1].split()[0])
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {text}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start in 2 minutes")


def request(port: int, body: dict) -> dict:
    import http.client

    start_s = time.perf_counter()
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=600)
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        ok = response.status == 200
    except Exception as e:  # counted as an error, never fatal to the load test
        ok, answer = False, {"error": repr(e)}
    return {"ok": ok, "answer": answer, "latency_s": time.perf_counter() - start_s, "body": body}


def concurrent(port: int, bodies: list[dict]) -> tuple[list[dict], float]:
    start_s = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: request(port, b), bodies))
    return results, time.perf_counter() - start_s


def body(i: int, max_tokens: int) -> dict:
    return {"model": TASKS[i % len(TASKS)][0], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
            "temperature": 0}


def tokens(results: list[dict]) -> int:
    return sum(r["answer"]["usage"]["completion_tokens"] for r in results if r["ok"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-serve-load"))
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    artifact = build(args.work, args.tokenizer)
    process, port = start(artifact, args.work / "server.log")
    began = time.monotonic()
    try:
        request(port, body(0, 2))  # warm-up
        # 1. many concurrent mixed-task requests
        load, load_s = concurrent(port, [body(i, args.max_tokens) for i in range(args.requests)])
        latencies = np.array([r["latency_s"] for r in load])
        # 2. the same work one request at a time, then as concurrent streams
        streams = [body(i, args.max_tokens) for i in range(args.streams)]
        alone_start = time.perf_counter()
        alone = [request(port, b) for b in streams if time.monotonic() - began < DEADLINE_S]
        alone_s = time.perf_counter() - alone_start
        batched, batched_s = concurrent(port, streams)
    finally:
        process.terminate()
        exit_code = process.wait(timeout=120)

    from spexport.runtime import load as load_model

    model = load_model(artifact)
    reference = {}
    mismatches = 0
    for r in load + alone + batched:
        key = (r["body"]["model"], r["body"]["prompt"], r["body"]["max_tokens"])
        if key not in reference:
            reference[key] = model.generate_text(key[1], task=key[0], max_new_tokens=key[2])[0]
        mismatches += r["ok"] and r["answer"]["choices"][0]["text"] != reference[key]
    results = {
        "environment": environment(len(os.sched_getaffinity(0))),
        "model": "random GPT-2 small (124M), 4 prompt-tuning tasks of 8-32 virtual tokens",
        "tokenizer": str(args.tokenizer or "workloads' small BPE"), "threads": len(os.sched_getaffinity(0)),
        "load": {"requests": len(load), "errors": sum(not r["ok"] for r in load), "wall_s": load_s,
                 "p50_s": float(np.percentile(latencies, 50)), "p99_s": float(np.percentile(latencies, 99)),
                 "tokens_per_s": tokens(load) / load_s},
        "streams": args.streams, "max_tokens": args.max_tokens,
        "one_at_a_time_tokens_per_s": tokens(alone) / alone_s,
        "batched_tokens_per_s": tokens(batched) / batched_s,
        "errors_total": sum(not r["ok"] for r in load + alone + batched),
        "answers_differing_from_runtime": int(mismatches), "answers_compared": len(load + alone + batched),
        "server_exit_code_on_sigterm": exit_code,
    }
    results["speedup"] = results["batched_tokens_per_s"] / results["one_at_a_time_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0 if results["errors_total"] == 0 and mismatches == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
