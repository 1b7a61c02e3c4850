"""spexport on a real checkpoint (SmolLM2-135M-Instruct), side by side with onnxruntime-genai, PEFT + PyTorch
and the memory-bandwidth floor, all measured in one run.

    python -m benchmarks.real_model --model DIR_OF_SmolLM2-135M-Instruct [--work DIR] [--out benchmarks/results]

Builds once into --work: 10 prompt-tuning tasks of 12 virtual tokens (PEFT adapters initialised from text),
spexport's artifact of them and onnxruntime-genai's fp32 CPU build of the model, each in a child process
timed for wall clock and peak resident memory. Then, every engine interleaved: batch 1 (64 new tokens after
a chat prompt), batch 8, 8 tasks against 1 in a batch of 8, and ONNX Runtime's per-operator profile of one
decode step. Writes real_model.json and real_model.md into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import engines, measure, op_profile, workloads
from benchmarks.environment import describe, environment
from spexport.artifact.manifest import Manifest

INSTRUCTIONS = ["Answer the question briefly and clearly.", "Reply in the voice of a friendly pirate.",
                "Answer in French.", "Explain it to a five year old.", "Reply with a numbered list.",
                "Be formal and precise.", "Answer with one short sentence.", "Reply as a helpful chef.",
                "Use simple words only.", "Add a short example to the answer."]
VIRTUAL_TOKENS = 12
QUESTION = "What is the capital of France, and why is it famous? Tell me about its history."


def child(command: list[str], log: Path) -> dict:
    """Run `command`; its wall time and peak resident memory (the child's own, from wait4)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{command[:4]} failed; see {log}")
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def build_tasks(model_dir: Path, root: Path) -> list[tuple[str, Path]]:
    """Ten PEFT prompt-tuning adapters, initialised from instructions' token embeddings, as PEFT saves them."""
    tasks = [(f"task{i}", root / f"task{i}") for i in range(len(INSTRUCTIONS))]
    if all((path / "adapter_config.json").is_file() for _, path in tasks):
        return tasks
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    for (_, path), text in zip(tasks, INSTRUCTIONS):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                                    prompt_tuning_init_text=text, num_virtual_tokens=VIRTUAL_TOKENS,
                                    tokenizer_name_or_path=str(model_dir))
        get_peft_model(base, config).save_pretrained(path)
    return tasks


def build(model_dir: Path, work: Path, log) -> dict:
    """Tasks, spexport's artifact and genai's build, each built once; their build figures kept beside them."""
    work.mkdir(parents=True, exist_ok=True)
    tasks = build_tasks(model_dir, work / "tasks")
    figures_path = work / "build.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    artifact, genai = work / "artifact", work / "genai"
    if not workloads.built_by_this_source(artifact):
        log("spexport convert (10 tasks)")
        adapters = [arg for name, path in tasks for arg in ("--adapter", f"{name}={path}")]
        figures["spexport convert"] = child(
            [sys.executable, "-c", "from spexport.cli import main; main()", "convert", "--model", str(model_dir),
             *adapters, "--output", str(artifact), "--overwrite", "--quiet"], work / "convert.log")
        workloads.stamp_source(artifact)
    if not (genai / "genai_config.json").is_file():
        log("onnxruntime-genai model builder (fp32, cpu)")
        figures["onnxruntime-genai builder"] = child(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(genai),
             "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")], work / "genai_build.log")
    figures_path.write_text(json.dumps(figures, indent=2))
    return {"tasks": tasks, "artifact": artifact, "genai": genai, "export": figures}


class FixedLength(engines.Spexport):
    """spexport with the model's EOS ignored, so every engine generates exactly the tokens asked for
    (genai's min_length and PEFT's min_new_tokens do the same for them)."""

    def __init__(self, artifact: Path):
        super().__init__(artifact)
        self.model.info = dataclasses.replace(self.model.info, eos_token_ids=[])


def chat_ids(model_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    return np.array([ids], np.int64)


def measure_speed(loaded: dict, ids: np.ndarray, tasks: list[str], new_tokens: int, reps: int) -> dict:
    """Batch 1 and batch 8 for every engine, and spexport's batch of 8 tasks against one, interleaved."""
    eight = np.repeat(ids, 8, axis=0)
    cases = {f"{name}|batch1": measure.generation(engine, ids, tasks[:1], new_tokens)
             for name, engine in loaded.items()}
    cases.update({f"{name}|batch8": measure.generation(loaded[name], eight, tasks[:1] * 8, new_tokens)
                  for name in ("spexport", "onnxruntime-genai")})
    cases["spexport|batch8, 8 tasks"] = measure.generation(loaded["spexport"], eight, tasks[:8], new_tokens)
    return measure.interleaved(cases, reps)


def summary(result: dict) -> dict:
    """The issue's targets: each figure, its limit and whether it is met."""
    runs, floor = result["speed"], result["floor"]
    med = {name: {k: measure.median(r, k) for k in ("ttft_s", "step_s", "tokens_per_s")} for name, r in runs.items()}
    spx, genai = "spexport|batch1", "onnxruntime-genai|batch1"
    weights = result["weight_bytes_per_step"]
    rows = [
        ("decode ms/token / bandwidth floor", med[spx]["step_s"] / floor["floor_s"], 1.5, "<="),
        ("decode ms/token / genai", measure.paired_ratio(runs[spx], runs[genai], "step_s"), 0.75, "<="),
        ("batch 8 tokens/s / genai", measure.paired_ratio(runs["spexport|batch8"], runs["onnxruntime-genai|batch8"],
                                                          "tokens_per_s"), 1.3, ">="),
        ("batch 8: 8 tasks / 1 task (time per step)", measure.paired_ratio(runs["spexport|batch8, 8 tasks"],
                                                                           runs["spexport|batch8"], "step_s"),
         1.05, "<="),
        ("TTFT / genai", measure.paired_ratio(runs[spx], runs[genai], "ttft_s"), 0.6, "<="),
    ]
    export = result["export"]
    if "spexport convert" in export and "onnxruntime-genai builder" in export:
        rows += [("export time / genai builder", export["spexport convert"]["wall_s"]
                  / export["onnxruntime-genai builder"]["wall_s"], 3.0, "<="),
                 ("export peak RSS / fp32 weights", export["spexport convert"]["peak_rss_bytes"] / weights, 2.5, "<=")]
    targets = [{"figure": f, "measured": round(v, 3), "limit": f"{op} {limit}",
                "met": bool(v <= limit if op == "<=" else v >= limit)} for f, v, limit, op in rows]
    return {"medians": med, "targets": targets}


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = ["# SmolLM2-135M-Instruct, fp32, CPU", "",
             f"{describe(result['environment'])}; prompt {result['prompt_tokens']} tokens (chat "
             f"template), {result['new_tokens']} new tokens; tasks of {VIRTUAL_TOKENS} virtual tokens; medians of "
             f"{result['reps']} interleaved repetitions.", "",
             "| engine | TTFT ms | decode ms/token | tokens/s |", "|---|---|---|---|"]
    for name, m in s["medians"].items():
        lines.append(f"| {name} | {m['ttft_s'] * 1e3:.1f} | {m['step_s'] * 1e3:.1f} | {m['tokens_per_s']:.1f} |")
    floor = result["floor"]
    lines += ["", f"Bandwidth floor: {result['weight_bytes_per_step'] / 1e6:.0f} MB of weights per step at "
              f"{floor['best_gbs']:.1f} GB/s = {floor['floor_s'] * 1e3:.1f} ms; ONNX Runtime's MatMuls alone over "
              f"the same weights: {floor['matmul_only_s'] * 1e3:.1f} ms.", "",
              "| export | wall s | peak RSS MB |", "|---|---|---|"]
    for name, e in result["export"].items():
        lines.append(f"| {name} | {e['wall_s']:.1f} | {e['peak_rss_bytes'] / 1e6:.0f} |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    lines += [f"| {t['figure']} | {t['measured']} | {t['limit']} | {'yes' if t['met'] else 'no'} |"
              for t in s["targets"]]
    for name, table in result.get("profile", {}).items():
        lines += ["", f"Decode step profile, {name} (ONNX Runtime profiler, batch 1, "
                  f"past {table['past']} positions, {table['kernels']} kernels per step):", "",
                  op_profile.markdown(table)]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: Path) -> Path:
    """real_model.png: batch-1 decode ms/token beside ONNX Runtime's MatMuls alone and the bandwidth floor;
    batch-8 tokens/s with one task and with eight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med, floor = result["summary"]["medians"], result["floor"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bars = {f"spexport\n({VIRTUAL_TOKENS} virtual\ntokens)": med["spexport|batch1"]["step_s"],
            "genai\n(no prompt)": med["onnxruntime-genai|batch1"]["step_s"],
            "MatMuls\nalone": floor["matmul_only_s"], "bandwidth\nfloor": floor["floor_s"]}
    left.bar(list(bars), [v * 1e3 for v in bars.values()], color=["C0", "C1", "C7", "C2"])
    left.set_ylabel("ms per token")
    left.set_title("decode, batch 1 (lower is better)")
    bars = {"spexport,\n1 task": med["spexport|batch8"]["tokens_per_s"],
            "spexport,\n8 tasks": med["spexport|batch8, 8 tasks"]["tokens_per_s"],
            "genai": med["onnxruntime-genai|batch8"]["tokens_per_s"]}
    right.bar(list(bars), list(bars.values()), color=["C0", "C0", "C1"])
    right.set_ylabel("tokens/s")
    right.set_title("decode, batch 8 (higher is better)")
    fig.suptitle(f"SmolLM2-135M-Instruct, fp32, {result['threads']} CPU threads; genai = onnxruntime-genai")
    fig.tight_layout()
    path = out / "real_model.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="SmolLM2-135M-Instruct's HF folder (fp32)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spexport-real")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT + PyTorch out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", file=sys.stderr, flush=True)

    threads = measure.threads()
    built = build(args.model, args.work, log)
    names = [name for name, _ in built["tasks"]]
    log("loading engines")
    loaded = {"spexport": FixedLength(built["artifact"]), "onnxruntime-genai": engines.Genai(built["genai"], threads)}
    if not args.no_peft:
        loaded["peft+pytorch"] = engines.Peft(args.model, built["tasks"], threads)
    ids = chat_ids(args.model)
    weights = workloads.weight_bytes_per_step(args.model)
    log("memory bandwidth and ONNX Runtime's MatMuls alone")
    bandwidth = measure.bandwidth()
    matmuls = measure.interleaved({"m": measure.matmul_ceiling(built["artifact"] / "model.onnx", threads)}, 3)["m"]
    log("speed, every engine interleaved")
    runs = measure_speed(loaded, ids, names, args.new_tokens, args.reps)
    bandwidth_end = measure.bandwidth()
    best = max(bandwidth["best_gbs"], bandwidth_end["best_gbs"])
    result = {"environment": environment(threads), "threads": threads, "prompt_tokens": int(ids.shape[1]),
              "new_tokens": args.new_tokens,
              "reps": args.reps, "weight_bytes_per_step": weights, "export": built["export"], "speed": runs,
              "floor": {"bandwidth_start": bandwidth, "bandwidth_end": bandwidth_end, "best_gbs": best,
                        "floor_s": weights / best / 1e9, "matmul_only_s": measure.median(matmuls, "step_s")},
              "load_average": list(os.getloadavg())}
    log("per-operator profiles of a decode step")
    loaded.clear()
    past = VIRTUAL_TOKENS + ids.shape[1] + args.new_tokens // 2
    runs = Manifest.read(built["artifact"]).core_graph or "model.onnx"  # the graph the Python runtime runs
    result["profile"] = {"spexport": op_profile.profile(built["artifact"] / runs, past, threads),
                         "onnxruntime-genai": op_profile.profile(built["genai"] / "model.onnx", past, threads)}
    result["summary"] = summary(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_model.json").write_text(json.dumps(result, indent=2, default=str))
    (args.out / "real_model.md").write_text(markdown(result))
    plot(result, args.out)
    log(f"wrote {args.out}/real_model.json, real_model.md and real_model.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
