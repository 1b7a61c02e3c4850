"""Edge decode speed on SmolLM2-135M-Instruct: spexport (fp32, int8, int4), onnxruntime-genai (fp32, int4, its own
builder) and llama.cpp (F32, Q8_0, Q4_1 GGUFs) in one interleaved run, same threads, same context depth.

    python -m benchmarks.edge_speed --model DIR --genai-python /tmp/genai-0.11.4/bin/python [--reps 5]

- llama.cpp: `llama-bench -d 48 -n N -p 0` (N tokens decoded after 48 tokens of context), built from the
  llama-cpp-python sdist by build_llama_cpp.sh into a cache folder; its converter writes the F32 GGUF (run by
  the genai venv's Python, which has the converter's torch and transformers 4) and llama-quantize the Q8_0 and
  Q4_1 ones (llama_cpp.py);
- spexport and genai: N tokens decoded after a 49-token chat prompt (the first token's time subtracted);
  spexport serves a prompt-tuning task of 12 virtual tokens, so its context is 12 positions deeper;
- genai runs in a child process with the Python of a venv holding the release under test (genai_child.py);
- "ORT MatMuls alone fp32": ONNX Runtime's matrix kernels over the fp32 graph's weight shapes and nothing else
  (measure.matmul_ceiling), the floor any fp32 ONNX graph meets on this machine, beside llama.cpp F32;
- "... graph, bare loop": spexport's graph (the one its runtime runs: the in-place graph, its KV buffer shared
  by past and present) and genai's, with and without its shared KV buffer, in one lean loop with the same
  session options (bare_loop.py): the graphs compared alone, and what each runtime adds.
Every repetition runs each engine once, in a rotating order; figures are medians and ratios are taken within
each repetition (benchmarks/measure.py). After the timing, ONNX Runtime's per-operator profile of one decode
step of each ONNX graph (op_profile.py) shows where the time goes. Writes edge_speed.json (with environment()'s
record and the load average at the end), edge_speed.md and, with matplotlib, edge_speed.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import bare_loop, llama_cpp, measure, op_profile, quantization, workloads
from benchmarks.environment import describe, environment

PROMPT_TOKENS = 49
DEPTH = PROMPT_TOKENS - 1  # llama-bench's context before the first decoded token
SPEXPORT = {"spexport fp32": {}, "spexport int8": {"quantize": "int8"}, "spexport int4": {"quantize": "int4"}}
GENAI = {"genai fp32": "fp32", "genai int4": "int4"}
LLAMA = {"llama.cpp F32": "F32", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_1": "Q4_1"}
MATMULS = {"MatMul", "FusedMatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
           "MatMulIntegerToFloat"}
RATIOS = [  # (numerator, denominator, target): targets from issue 31
    ("spexport int4", "llama.cpp Q4_1", 1.0), ("spexport int4", "genai int4", 1.0),
    ("spexport fp32", "genai fp32", 0.9), ("spexport fp32", "llama.cpp F32", None),
    ("spexport int8", "spexport int4", None), ("spexport int8", "llama.cpp Q8_0", None),
    ("genai int4", "llama.cpp Q4_1", None), ("genai fp32", "llama.cpp F32", None),
    ("ORT MatMuls alone fp32", "llama.cpp F32", None), ("spexport fp32", "ORT MatMuls alone fp32", None)]
MATMULS_ALONE = "ORT MatMuls alone fp32"  # ONNX Runtime's kernels over the same weights and nothing else
# bare_loop.py's cases, per precision: each graph in the same bare loop, and genai's with its shared KV buffer
BARE = {precision: (f"spexport {precision} graph, bare loop", f"genai {precision} graph, bare loop",
                    f"genai {precision} graph, bare loop, shared KV") for precision in ("fp32", "int4")}
RATIOS += [pair for precision, (ours, theirs, shared) in BARE.items()
           for pair in [(f"spexport {precision}", ours, None), (ours, shared, None), (shared, theirs, None),
                        (f"genai {precision}", shared, None)]]


def build(model_dir: Path, work: Path, genai_python: str | None, gguf_python: str | None, log) -> dict:
    from spexport.export import convert

    adapters = quantization.build_adapters(model_dir, work / "adapters")[:1]
    built = {}
    for name, options in SPEXPORT.items():
        folder = work / name.replace(" ", "-")
        if not workloads.built_by_this_source(folder):
            log(f"converting {name}")
            convert(model_dir, adapters, folder, overwrite=True, **options)
            workloads.stamp_source(folder)
        built[name] = folder
    for name, precision in (GENAI.items() if genai_python else ()):
        folder = work / name.replace(" ", "-")
        if not (folder / "genai_config.json").is_file():
            log(f"onnxruntime-genai builder, {precision}")
            subprocess.run([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                            str(folder), "-p", precision, "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                           stdout=subprocess.DEVNULL)
        built[name] = folder
    if gguf_python is None:
        return built
    log("llama.cpp binaries and GGUFs")
    llama_cpp.build()
    ggufs = llama_cpp.ggufs(model_dir, work / "gguf", gguf_python)
    built.update({name: ggufs[kind] for name, kind in LLAMA.items()})
    return built


def prompt_ids(model_dir: Path) -> np.ndarray:
    """A chat prompt of exactly PROMPT_TOKENS tokens (the speed prompt's chat template, its text cut or repeated)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = quantization.SPEED_PROMPT
    while True:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False)
        if len(ids) >= PROMPT_TOKENS:
            break
        text += " " + quantization.SPEED_PROMPT
    head = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                             return_dict=False))
    cut = len(ids) - PROMPT_TOKENS  # drop words from the user's text, keep the template's tokens around it
    return np.array(ids[:head - 6] + ids[head - 6 + cut:] if cut else ids, np.int64)[:PROMPT_TOKENS]


class GenaiChild:
    """genai_child.py in a process of its own, serving both genai builds."""

    def __init__(self, python: str, folders: list[Path], threads: int):
        for folder in folders:
            config_path = folder / "genai_config.json"
            config = json.loads(config_path.read_text())
            config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
            search = config.setdefault("search", {})
            search.update({k: v for k, v in {"do_sample": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0}.items()
                           if search.get(k) is None})  # 0.11.4's builder leaves nulls its own parser refuses
            config_path.write_text(json.dumps(config, indent=2))
        self.process = subprocess.Popen([python, str(Path(__file__).with_name("genai_child.py")), str(threads),
                                         *map(str, folders)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.process.stdout.readline())["ready"]

    def case(self, index: int, ids: np.ndarray, new_tokens: int):
        def run() -> dict:
            self.process.stdin.write(json.dumps({"model": index, "ids": ids.tolist(), "new_tokens": new_tokens}) + "\n")
            self.process.stdin.flush()
            return json.loads(self.process.stdout.readline())
        return run

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def spexport_case(folder: Path, ids: np.ndarray, new_tokens: int):
    from spexport.runtime import load

    model = load(folder)
    task = model.tasks[0] if isinstance(model.tasks, (list, tuple)) else next(iter(model.tasks))

    def run() -> dict:
        # untimed first: a 1-token call right after another engine's case runs cold (the cores and caches that
        # engine just held), and subtracted from a warm longer call it would make the decode look faster
        model.generate(ids[None], task=task, max_new_tokens=1)
        start = time.perf_counter()
        model.generate(ids[None], task=task, max_new_tokens=1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        made = model.generate(ids[None], task=task, max_new_tokens=1 + new_tokens).shape[1] - len(ids)
        total = time.perf_counter() - start
        return {"ms_per_token": 1000 * max(total - first, 1e-9) / max(made - 1, 1), "ttft_ms": 1000 * first}
    return run


def bare_cases(built: dict, new_tokens: int, threads: int) -> dict:
    """bare_loop.py's cases: spexport's graph (the one its runtime runs on the CPU, its task's virtual tokens in the
    past; the in-place graph's past and present in one buffer) and genai's, each in the same bare loop, and
    genai's with past and present in one buffer."""
    cases = {}
    for precision, (ours, theirs, shared) in BARE.items():
        graph, in_place = workloads.served_graph(built[f"spexport {precision}"])
        cases[ours] = bare_loop.bare_decode(graph, threads, quantization.VIRTUAL_TOKENS + PROMPT_TOKENS, new_tokens,
                                            shared=in_place)
        genai_graph = built[f"genai {precision}"] / "model.onnx"
        cases[theirs] = bare_loop.bare_decode(genai_graph, threads, PROMPT_TOKENS, new_tokens)
        cases[shared] = bare_loop.bare_decode(genai_graph, threads, PROMPT_TOKENS, new_tokens, shared=True)
    return cases


def profiles(built: dict, new_tokens: int, threads: int) -> dict:
    """ONNX Runtime's per-operator profile of one decode step of each ONNX engine's graph, halfway through the
    timed tokens (spexport's past includes its task's virtual tokens): where the time goes beside llama.cpp."""
    found = {}
    for name in (*SPEXPORT, *GENAI):
        if name not in built:
            continue
        if name in SPEXPORT:
            graph = workloads.served_graph(built[name])[0]  # what the runtime runs on the CPU
            past = quantization.VIRTUAL_TOKENS + PROMPT_TOKENS + new_tokens // 2
        else:
            graph, past = built[name] / "model.onnx", PROMPT_TOKENS + new_tokens // 2
        found[name] = op_profile.profile(graph, past, threads)
    return found


def summary(runs: dict[str, list[dict]]) -> dict:
    medians = {name: measure.median(r, "ms_per_token") for name, r in runs.items()}
    ratios = [{"of": a, "to": b, "ratio": measure.paired_ratio(runs[a], runs[b], "ms_per_token"), "target": t}
              for a, b, t in RATIOS if a in runs and b in runs]
    return {"ms_per_token": medians, "ratios": ratios}


def run_environment(threads: int, genai_version: str | None, llama: bool) -> dict:
    """environment()'s record, with the two peers that live outside this venv: the genai child's release and
    llama.cpp's sdist and build."""
    found = environment(threads)
    found["versions"]["onnxruntime-genai"] = genai_version
    if llama:
        found["llama.cpp"] = llama_cpp.version()
    return found


def markdown(result: dict) -> str:
    env, found = result["environment"], result["summary"]
    llama = env.get("llama.cpp", {})
    lines = [f"SmolLM2-135M-Instruct; {describe(env)}"
             + (f"; llama.cpp from the llama-cpp-python {llama['llama-cpp-python sdist']} sdist" if llama else ""),
             "", f"{result['reps']} interleaved repetitions, medians; {result['new_tokens']} tokens decoded after "
             f"{PROMPT_TOKENS} of context (llama.cpp: -d {DEPTH}); host load average (1, 5, 15 min) "
             f"{_load(env['load_average_at_start'])} at the start, {_load(env['load_average_at_end'])} at the end.",
             "",
             "| engine | decode ms/token (median) |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in found["ms_per_token"].items()]
    lines += ["", "| ratio (paired, per repetition) | median | target |", "|---|---|---|"]
    for r in found["ratios"]:
        verdict = "" if r["target"] is None else "met" if r["ratio"] <= r["target"] else "missed"
        target = "" if r["target"] is None else f"≤ {r['target']:.2f}× ({verdict})"
        lines.append(f"| {r['of']} / {r['to']} | {r['ratio']:.2f}× | {target} |")
    for name, table in result.get("profiles", {}).items():
        matmuls = sum(e["ms"] for e in table["ops"] if e["op"] in MATMULS)
        lines += ["", f"**{name}**, one decode step at a past of {table['past']} (ONNX Runtime's profiler): "
                  f"matrix products {matmuls:.2f} ms of {table['kernel_ms']:.2f} ms in kernels "
                  f"({matmuls / table['kernel_ms']:.0%}).", "", op_profile.markdown(table, rows=8)]
    return "\n".join(lines) + "\n"


def _load(average: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in average)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.boxplot([[r["ms_per_token"] for r in runs[n]] for n in names], tick_labels=names, vert=False)
    ax.set_xscale("log")  # a loaded host stretches some runs tenfold
    ax.set_xlabel("decode ms/token, log scale (lower is better)")
    env = result["environment"]
    ax.set_title(f"SmolLM2-135M, {env['threads']} threads, one interleaved run ({result['reps']} reps); "
                 f"host load {env['load_average_at_start'][0]:.1f} at the start", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "edge_speed.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="SmolLM2-135M-Instruct's HF folder (fp32)")
    parser.add_argument("--genai-python", help="the Python of a venv with onnxruntime-genai (left out without it)")
    parser.add_argument("--gguf-python", help="the Python that runs llama.cpp's GGUF converter (torch, "
                        "transformers 4, sentencepiece); --genai-python's when left out")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-edge"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-profile", action="store_true", help="leave out the per-operator profiles")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", file=sys.stderr, flush=True)

    threads = measure.threads()
    llama = not args.no_llama_cpp
    gguf_python = (args.gguf_python or args.genai_python) if llama else None
    if llama and gguf_python is None:
        parser.error("llama.cpp's GGUF converter needs --gguf-python or --genai-python (or pass --no-llama-cpp)")
    built = build(args.model, args.work, args.genai_python, gguf_python, log)
    ids = prompt_ids(args.model)
    cases = {name: spexport_case(built[name], ids, args.new_tokens) for name in SPEXPORT}
    matmuls = measure.matmul_ceiling(built["spexport fp32"] / "model.onnx", threads)
    cases[MATMULS_ALONE] = lambda: {"ms_per_token": 1000 * matmuls()["step_s"]}
    genai = GenaiChild(args.genai_python, [built[n] for n in GENAI], threads) if args.genai_python else None
    if genai is not None:
        cases.update({name: genai.case(i, ids, args.new_tokens) for i, name in enumerate(GENAI)})
        cases.update(bare_cases(built, args.new_tokens, threads))
    if llama:
        cases.update({name: (lambda g=built[name]: llama_cpp.bench(g, DEPTH, args.new_tokens, threads))
                      for name in LLAMA})
    log("warm-up, then every engine interleaved")
    for case in cases.values():
        case()
    record = run_environment(threads, genai and genai.version, llama)
    runs = measure.interleaved(cases, args.reps)
    record["load_average_at_end"] = list(os.getloadavg())
    if genai is not None:
        genai.close()
    result = {"environment": record, "reps": args.reps, "new_tokens": args.new_tokens,
              "prompt_tokens": PROMPT_TOKENS, "runs": runs, "summary": summary(runs)}
    if not args.no_profile:
        log("per-operator profiles of a decode step")
        result["profiles"] = profiles(built, args.new_tokens, threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge_speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "edge_speed.md").write_text(markdown(result))
    try:
        plot(result, args.out)
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
