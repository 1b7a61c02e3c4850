"""spexport's performance benchmark, side by side with PEFT + PyTorch, optimum's ORTModelForCausalLM,
onnxruntime-genai and the memory-bandwidth floor (benchmarks/README.md: the install it needs).

    .venv-bench/bin/python -m benchmarks.run [--quick] [--out benchmarks/results] [--work DIR]

Writes results.json, results.md and PNG plots into --out. Models, adapters and artifacts are
built once into --work (random weights, nothing downloaded) and reused by later runs (an artifact
is rebuilt when spexport's sources have changed since); export times are measured when an
artifact is built and kept with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks import classifier, engines, measure, report, workloads
from benchmarks.environment import environment

MODES = {
    "quick": dict(models=["gpt2"], reps=3, prompt=32, new_tokens=16, sweep=[8, 32, 128, 256], drift_tokens=64,
                  variants=["int8"], classifier_seq=128),
    "full": dict(models=["gpt2", "llama"], reps=5, prompt=64, new_tokens=32, sweep=[8, 16, 32, 64, 128, 256],
                 drift_tokens=64, variants=["int8", "fp16", "unfused"], classifier_seq=128),
}
TASKS_IN_ARTIFACT = 100  # 8 tasks of 32 virtual tokens, the sweep's tasks, then bare prompts up to 100
MEMORY_COUNTS = [1, 10, 100]
VARIANTS = {"int8": dict(quantize="int8"), "fp16": dict(dtype="float16"), "unfused": dict(optimize=False)}


def build(name: str, work: Path, mode: dict) -> dict:
    """The model, its adapters and every artifact; export times as measured when each was built."""
    from optimum.exporters.onnx import main_export

    from spexport.export import convert

    root = work / name
    model_dir = workloads.build_model(name, root / "model")
    specs = workloads.task_specs(MODES["full"]["sweep"])
    adapters = workloads.build_adapters(model_dir, root / "adapters", specs)
    hidden = json.loads((model_dir / "config.json").read_text()).get("hidden_size") or 768
    bare = workloads.raw_prompts(root / "bare", TASKS_IN_ARTIFACT - len(adapters), 32, hidden)
    times_path = root / "export_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}

    def timed_once(key: str, folder: Path, built, fn) -> Path:
        if not built(folder):
            start = time.perf_counter()
            fn()
            times[key] = time.perf_counter() - start
            times_path.write_text(json.dumps(times, indent=2))
        return folder

    def convert_stamped(folder: Path, options: dict) -> None:
        convert(model_dir, adapters + bare, folder, overwrite=True, **options)
        workloads.stamp_source(folder)

    built = {"model": model_dir, "adapters": adapters, "artifacts": {}, "unavailable": {}}
    for variant in ["fp32", *mode["variants"]]:
        options = VARIANTS.get(variant, {})
        folder = root / f"artifact-{variant}"
        try:
            built["artifacts"][variant] = timed_once(
                f"spexport convert ({variant}, {TASKS_IN_ARTIFACT} tasks)", folder, workloads.built_by_this_source,
                lambda folder=folder, options=options: convert_stamped(folder, options))
        except Exception as e:  # a variant this machine cannot build is reported, not fatal
            built["unavailable"][variant] = f"export failed: {e}"
    built["ort"] = timed_once("optimum main_export (base model)", root / "optimum",
                              lambda folder: (folder / "model.onnx").is_file(),
                              lambda: main_export(str(model_dir), output=str(root / "optimum"),
                                                  task="text-generation-with-past", do_validation=False,
                                                  local_files_only=True))
    if name == "llama":
        built["genai"], why = engines.build_genai(model_dir, root / "genai", work / "genai-cache")
        if why:
            built["unavailable"]["onnxruntime-genai"] = why
    else:
        built["unavailable"]["onnxruntime-genai"] = "run on the Llama-style model only"
    for count in MEMORY_COUNTS:
        built[f"subset{count}"] = workloads.subset_artifact(built["artifacts"]["fp32"], root / f"subset-{count}", count)
    built["export_times_s"] = times
    return built


def load_engines(built: dict, threads: int) -> tuple[dict, dict]:
    loaded, unavailable = {}, dict(built["unavailable"])
    for variant, folder in built["artifacts"].items():
        key = "spexport" if variant == "fp32" else f"spexport {variant}"
        try:
            loaded[key] = engines.Spexport(folder, key)
            loaded[key].generate(np.zeros((1, 4), np.int64), ["t32_0"], 2)  # fp16 may load and still fail to run
        except Exception as e:
            loaded.pop(key, None)
            unavailable[key] = f"does not run on this machine's CPU provider: {str(e).splitlines()[0][:200]}"
    loaded["peft+pytorch"] = engines.Peft(built["model"], built["adapters"], threads)
    loaded["optimum-ort"] = engines.OrtBaseline(built["ort"], threads)
    if built.get("genai"):
        loaded["onnxruntime-genai"] = engines.Genai(built["genai"], threads)
    return loaded, unavailable


def speed(loaded: dict, ids: np.ndarray, mode: dict) -> dict:
    """TTFT and decode tokens/s at batch 1 and 8, every engine interleaved; 8 rows of one task."""
    out = {}
    for batch in (1, 8):
        rows = ids[:batch]
        cases = {name: measure.generation(e, rows, ["t32_0"] * batch, mode["new_tokens"]) for name, e in loaded.items()}
        out[f"batch{batch}"] = measure.interleaved(cases, mode["reps"])
    return out


def matmul_ceiling(loaded: dict, built: dict, ids: np.ndarray, mode: dict, threads: int) -> dict:
    """spexport's decode step at batch 1 beside ONNX Runtime's MatMuls alone over the same weights."""
    cases = {"onnxruntime matmuls only": measure.matmul_ceiling(built["artifacts"]["fp32"] / "model.onnx", threads),
             "spexport": measure.generation(loaded["spexport"], ids[:1], ["t32_0"], mode["new_tokens"])}
    return measure.interleaved(cases, mode["reps"])


def mixed_batch(model, ids: np.ndarray, mode: dict) -> dict:
    """8 rows with 8 different tasks against 8 rows of one task, same shapes."""
    cases = {"8 tasks": measure.generation(model, ids, [f"t32_{i}" for i in range(8)], mode["new_tokens"]),
             "1 task": measure.generation(model, ids, ["t32_0"] * 8, mode["new_tokens"])}
    return measure.interleaved(cases, mode["reps"])


def virtual_token_sweep(loaded: dict, ids: np.ndarray, mode: dict) -> dict:
    """TTFT and decode speed at batch 1 against the task's number of virtual tokens."""
    cases = {f"{name}|{n}": measure.generation(loaded[name], ids[:1], [f"vt{n}"], mode["new_tokens"])
             for n in mode["sweep"] for name in ("spexport", "peft+pytorch")}
    return measure.interleaved(cases, mode["reps"])


def task_switch(loaded: dict, ids: np.ndarray, mode: dict) -> dict:
    """A one-token request for task A right after one for task B, against right after one for A."""
    def case(engine, before: str):
        def run() -> dict:
            engine.generate(ids[:1], [before], 1)
            start = time.perf_counter()
            engine.generate(ids[:1], ["t32_0"], 1)
            return {"latency_s": time.perf_counter() - start}
        return run

    cases = {f"{name}|{kind}": case(loaded[name], before) for name in ("spexport", "peft+pytorch")
             for kind, before in (("same task", "t32_0"), ("switched", "t32_1"))}
    return measure.interleaved(cases, mode["reps"] * 2)


def drift(loaded: dict, ids: np.ndarray, mode: dict) -> dict:
    """Each spexport variant against spexport fp32, and spexport fp32 against PEFT: max |Δlogits| over
    the prompt's positions, and greedy agreement over `drift_tokens` new tokens (8 rows, 8 tasks)."""
    tasks = [f"t32_{i}" for i in range(8)]
    reference = loaded["spexport"]
    ref_logits = reference.logits(ids, tasks)
    ref_tokens = reference.generate(ids, tasks, mode["drift_tokens"])
    # Teacher-forced: each variant's next-token choice along fp32's own greedy text, so one flip does
    # not change every later position: the per-token flip rate behind the greedy agreement.
    forced_ids = np.concatenate([ids, ref_tokens], axis=1)
    forced_span = slice(ids.shape[1] - 1, forced_ids.shape[1] - 1)
    ref_forced = reference.logits(forced_ids, tasks)[:, forced_span].argmax(-1)
    out = {}
    for name, engine in loaded.items():
        if name.startswith("spexport "):
            tokens = engine.generate(ids, tasks, mode["drift_tokens"])
            forced = engine.logits(forced_ids, tasks)[:, forced_span].argmax(-1)
            out[name] = {"against": "spexport fp32", "max_abs_logits": float(np.abs(engine.logits(ids, tasks)
                                                                                      - ref_logits).max()),
                         "greedy_agreement": float((tokens == ref_tokens).mean()),
                         "teacher_forced_agreement": float((forced == ref_forced).mean())}
    peft = loaded["peft+pytorch"]
    peft_logits = np.concatenate([peft.logits(ids[i:i + 1], [t]) for i, t in enumerate(tasks)])
    peft_tokens = np.concatenate([peft.generate(ids[i:i + 1], [t], mode["drift_tokens"]) for i, t in enumerate(tasks)])
    out["spexport"] = {"against": "peft+pytorch", "max_abs_logits": float(np.abs(ref_logits - peft_logits).max()),
                       "greedy_agreement": float((ref_tokens == peft_tokens).mean())}
    # Random weights give flat next-token distributions; the gap between the two best logits says how
    # small a drift can flip a greedy choice (and a flip changes every token after it).
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    out["fp32_top2_margin_median"] = float(np.median(top2[..., 1] - top2[..., 0]))
    return out


def memory(built: dict) -> dict:
    """Resident memory of a fresh process serving 1, 10 and 100 tasks, and the bank bytes of each."""
    out = {}
    for count in MEMORY_COUNTS:
        folder = built[f"subset{count}"]
        out[str(count)] = {**measure.resident_memory(folder), "bank_bytes": workloads.bank_bytes(folder)}
    return out


def run_model(name: str, work: Path, mode: dict, threads: int, log) -> dict:
    log(f"[{name}] building model, adapters and artifacts (cached in {work})")
    built = build(name, work, mode)
    log(f"[{name}] loading engines")
    loaded, unavailable = load_engines(built, threads)
    vocab = loaded["spexport"].model.info.vocab_size
    ids = np.random.default_rng(1).integers(0, vocab, (8, mode["prompt"]), dtype=np.int64)
    result = {"weight_bytes_per_step": workloads.weight_bytes_per_step(built["model"]),
              "prompt_bytes_32_virtual_tokens": workloads.bank_bytes(built["artifacts"]["fp32"], 1),
              "export_times_s": built["export_times_s"], "unavailable": unavailable, "engines": list(loaded)}
    figures = {"speed": lambda: speed(loaded, ids, mode),
               "matmul_ceiling": lambda: matmul_ceiling(loaded, built, ids, mode, threads),
               "mixed_batch": lambda: mixed_batch(loaded["spexport"], ids, mode),
               "virtual_token_sweep": lambda: virtual_token_sweep(loaded, ids, mode),
               "task_switch": lambda: task_switch(loaded, ids, mode),
               "drift": lambda: drift(loaded, ids, mode)}
    if name != "gpt2":  # the Llama-style model gets the headline figures; the rest are shown on GPT-2
        figures = {k: figures[k] for k in ("speed", "matmul_ceiling", "drift")}
    for figure, fn in figures.items():
        log(f"[{name}] {figure}")
        result[figure] = fn()
    log(f"[{name}] resident memory")
    loaded.clear()  # free the engines before measuring memory in fresh processes
    result["memory"] = memory(built)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GPT-2 only, fewer repetitions (a few minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spexport-bench")
    args = parser.parse_args(argv)
    mode = MODES["quick" if args.quick else "full"]
    warnings.filterwarnings("ignore")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", file=sys.stderr, flush=True)

    threads = measure.threads()
    results = {"mode": "quick" if args.quick else "full", "config": mode, "machine": environment(threads)}
    log("memory bandwidth")
    results["bandwidth_start"] = measure.bandwidth()
    results["models"] = {name: run_model(name, args.work, mode, threads, log) for name in mode["models"]}
    results["classifier"] = classifier.run(args.work, mode, threads, log)
    results["bandwidth_end"] = measure.bandwidth()
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report.write(results, args.out)
    log(f"wrote {args.out}/results.json, results.md and plots")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
