"""Every decoder type's decode step: kernels per step, and its time beside its MatMuls alone.

    python -m benchmarks.families [--work DIR] [--types llama,gpt2,...] [--reps 30] [--out benchmarks/results]

Each type gets a mid-size random model where the MatMuls dominate (hidden 576 and intermediate 1536, as
SmolLM2-135M, 8 layers, an 8k vocabulary) with its distinguishing features on, converted with one
prompt-tuning task. The graph the Python runtime runs on the CPU (the in-place graph where there is one, its
past and present bound to one buffer; else the core graph) takes one decode step at batch 1 after a past of
64, timed interleaved with a graph of its weight matrices' MatMuls alone (measure.matmul_ceiling); the kernels
per step come from ONNX Runtime's profiler (op_profile). Writes families.json and families.md into --out, with
the git commit, package versions and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import bare_loop, measure, op_profile, workloads
from benchmarks.run import environment

PAST = 64
ROUNDS = 15  # interleaved rounds per type: a 4 ms step on a shared host wanders by 10% between rounds
LLAMA = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, max_position_embeddings=2048)
CONFIGS = {
    "llama": LLAMA, "mistral": {**LLAMA, "sliding_window": None}, "qwen2": LLAMA, "qwen3": LLAMA,
    "granite": {**LLAMA, "embedding_multiplier": 12.0, "attention_multiplier": 0.015625, "residual_multiplier": 0.22,
                "logits_scaling": 8.0},
    "phi3": {k: v for k, v in LLAMA.items() if k != "head_dim"}, "gemma": LLAMA, "olmo2": LLAMA,
    "gemma2": {**LLAMA, "sliding_window": 4096, "query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0},
    "gpt2": dict(n_embd=576, n_layer=8, n_head=9, n_positions=2048),
    "gpt_neox": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                     max_position_embeddings=2048, rotary_pct=0.25),
    "opt": dict(hidden_size=576, ffn_dim=1536, num_hidden_layers=8, num_attention_heads=9,
                max_position_embeddings=2048, word_embed_proj_dim=576),
    "bloom": dict(hidden_size=576, n_layer=8, n_head=9),
}
VOCAB = 8192


def build(model_type: str, work: Path) -> Path:
    """The type's random model and its artifact with one task, built once."""
    folder, artifact = work / model_type / "model", work / model_type / "artifact"
    if workloads.built_by_this_source(artifact):
        return artifact
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, **CONFIGS[model_type], vocab_size=VOCAB,
                                      **workloads.NO_SPECIAL_TOKENS)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder)
        workloads.save_tokenizer(folder)
        workloads.build_prompt_adapter(model, folder, work / model_type / "task", 8, seed=1)
    subprocess.run([sys.executable, "-c", "from spexport.cli import main; main()", "convert", "--model", str(folder),
                    "--adapter", f"task={work / model_type / 'task'}", "--output", str(artifact), "--overwrite",
                    "--quiet"], check=True)
    workloads.stamp_source(artifact)
    return artifact


def step_timer(graph: Path, threads: int, reps: int, shared: bool = False):
    """A case for measure.interleaved: the median of `reps` decode steps of `graph` as `step_s`. `shared`: each
    past and its present bound to one buffer (the in-place graph), so every step writes the same slot."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    feeds = op_profile.feeds(graph, PAST)
    binding = session.io_binding()
    for name, value in feeds.items():
        if shared and name.startswith("past_key_values."):
            bare_loop.bind_shared_cache(binding, name, name.replace("past_key_values.", "present."), value, PAST + 1)
        else:
            binding.bind_cpu_input(name, value)
    for output in session.get_outputs():
        if not (shared and output.name.startswith("present.")):
            binding.bind_output(output.name)
    session.run_with_iobinding(binding)

    def run() -> dict:
        return measure.step_seconds(lambda: session.run_with_iobinding(binding), reps)
    return run


def measure_type(model_type: str, work: Path, threads: int, reps: int) -> dict:
    from spexport.artifact.manifest import Manifest

    artifact = build(model_type, work)
    manifest = Manifest.read(artifact)
    graph, shared = workloads.served_graph(artifact)
    runs = measure.interleaved({"step": step_timer(graph, threads, reps, shared),
                                "matmuls": measure.matmul_ceiling(graph, threads, reps)}, ROUNDS)
    profile = op_profile.profile(graph, PAST, threads, runs=5)
    step, matmuls = measure.median(runs["step"], "step_s"), measure.median(runs["matmuls"], "step_s")
    ops = {op["op"] for op in profile["ops"]}
    return {"graph": graph.name, "written": bool(ops & {"Attention", "GroupQueryAttention"}),
            "kernels_per_step": profile["kernels"], "kernels_per_layer": profile["kernels"] / manifest.model.num_layers,
            "step_ms": step * 1e3, "matmuls_ms": matmuls * 1e3, "step_over_matmuls": step / matmuls,
            "paired_ratio": measure.paired_ratio(runs["step"], runs["matmuls"], "step_s"),
            "best_ratio": min(r["best_s"] for r in runs["step"]) / min(r["best_s"] for r in runs["matmuls"]),
            "top_ops": profile["ops"][:6]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spexport-families")
    parser.add_argument("--types", default=",".join(CONFIGS))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", action="store_true", help="add to --out's families.json instead of replacing it")
    args = parser.parse_args(argv)
    threads = measure.threads()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "families.json"
    # each type is added to the results as it is measured, so a long run split over several calls adds up
    results = json.loads(path.read_text())["types"] if args.keep and path.is_file() else {}
    for model_type in args.types.split(","):
        print(f"{time.strftime('%H:%M:%S')} {model_type}", file=sys.stderr, flush=True)
        results[model_type] = {**measure_type(model_type, args.work, threads, args.reps), "commit": commit,
                               "load_average": list(os.getloadavg())}
        result = {"commit": commit, "environment": environment(threads), "past": PAST, "vocab": VOCAB,
                  "configs": {t: CONFIGS[t] for t in results}, "types": results}
        path.write_text(json.dumps(result, indent=2, default=str))
        (args.out / "families.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"Decode step, batch 1, past {result['past']}, {result['environment']['threads']} threads, commit "
             f"{result['commit'][:10]}, {result['environment']['cpu']}", "",
             "| type | graph | kernels / step | kernels / layer | step ms | MatMuls alone ms | step / MatMuls | "
             "fastest step / fastest MatMuls |", "|---|---|---|---|---|---|---|---|"]
    for model_type, r in result["types"].items():
        kind = "written" if r["written"] else "traced"
        best = f"{r['best_ratio']:.2f}" if "best_ratio" in r else ""  # results written before it was measured
        lines.append(f"| {model_type} | {kind} | {r['kernels_per_step']} | {r['kernels_per_layer']:.1f} | "
                     f"{r['step_ms']:.2f} | {r['matmuls_ms']:.2f} | {r['paired_ratio']:.2f} | {best} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
