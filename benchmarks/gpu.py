"""spexport on one GPU: fp16 parity against PEFT in PyTorch, and decode speed beside onnxruntime-genai-cuda
and PyTorch + PEFT, at SmolLM2-135M's and Llama-3.2-1B's configs (random weights, 8 prompt-tuning tasks).

    python -m benchmarks.gpu --out DIR [--sizes smollm2-135m,llama-3.2-1b] [--reps 3]
    python -m benchmarks.gpu --out DIR --cpu-rehearsal      # every path but CUDA, on the CPU, in a minute

benchmarks/gpu/run_on_device.sh installs onnxruntime-gpu and onnxruntime-genai-cuda on the device machine and
runs this. Everything is built there (nothing model-sized travels). DIR receives gpu-<sizes>.json (written after
each stage, so a run cut short still reports what it measured), .md and .png (benchmarks/gpu_report.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from benchmarks import gpu_engines as engines
from benchmarks import gpu_report, measure

# Llama-architecture configs (random weights): SmolLM2-135M's, Llama-3.2-1B's, and a tiny one for the rehearsal.
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                       "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=True),
}
EOS = 2  # its embedding row (tied: its output row) is zeroed, so greedy decoding never ends a row early
TASKS = [(f"task{i}", n) for i, n in enumerate([8, 12, 16, 20, 8, 12, 16, 20])]
# The parity bound: fp16 logits within 1% of the reference logits' scale (the largest |logit| of the row),
# and the same greedy tokens over 32 steps on at least 6 of the 8 rows (a row of random weights whose two best
# logits lie closer than fp16's rounding may go its own way, and then differs from there on).
RELATIVE_BOUND, GREEDY_STEPS, GREEDY_ROWS = 0.01, 32, 6
MODES = {
    "gpu": dict(sizes=["smollm2-135m", "llama-3.2-1b"], batches=[1, 8, 32], prompt=128, new_tokens=32, reps=3,
                device="cuda"),
    "rehearsal": dict(sizes=["tiny"], batches=[1, 8], prompt=16, new_tokens=4, reps=1, device="cpu"),
}
# peak HBM bandwidth by the device's name (bytes/s), for the floor; the measured copy rate is reported beside it
GENAI, GENAI_GRAPH = "onnxruntime-genai (base model)", "onnxruntime-genai (base model, CUDA graph)"
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12}


def build(size: str, work: Path, device: str, log) -> dict:
    """The model (random weights, fp32 on disk), its 8 adapters, spexport's fp16 artifact and genai's build."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from benchmarks.workloads import build_prompt_adapter, save_tokenizer
    from spexport.export import convert

    root = work / size
    model_dir, artifact = root / "model", root / "artifact-fp16"
    times = {}
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(**CONFIGS[size], bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            model.get_input_embeddings().weight[EOS] = 0
        model.save_pretrained(model_dir)
        save_tokenizer(model_dir)
        for i, (name, n) in enumerate(TASKS):
            build_prompt_adapter(model, model_dir, root / name, n, seed=100 + i)
        del model
    adapters = [(name, root / name) for name, _ in TASKS]
    if not (artifact / "spexport.json").is_file():
        log(f"[{size}] spexport convert --dtype float16")
        start = time.perf_counter()
        convert(model_dir, adapters, artifact, dtype="float16")
        times["spexport_convert_s"] = time.perf_counter() - start
    genai, why = engines.build_genai(model_dir, root / "genai", root / "genai-cache", device, log)
    return {"model": model_dir, "adapters": adapters, "artifact": artifact, "genai": genai,
            "genai_unavailable": why, "times": times}


def parity(built: dict, mode: dict, log) -> dict:
    """spexport fp16 on the device against PEFT on the same device: logits relative to their scale, greedy
    tokens over GREEDY_STEPS steps, one row per task. PEFT runs in fp16 on a GPU and in fp32 on the CPU."""
    ours = engines.Spexport(built["artifact"], mode["device"])
    peft = engines.Peft(built["model"], built["adapters"], mode["device"])
    rng = np.random.default_rng(0)
    vocab = ours.model.info.vocab_size
    ids = rng.integers(3, vocab, (len(TASKS), 24))
    tasks = [name for name, _ in TASKS]
    rows = []
    for i, task in enumerate(tasks):
        mine, theirs = ours.logits(ids[i:i + 1], [task]), peft.logits(ids[i:i + 1], [task])
        rows.append({"task": task, "max_abs": float(np.abs(mine - theirs).max()),
                     "scale": float(np.abs(theirs).max())})
    new = GREEDY_STEPS if mode["device"] == "cuda" else mode["new_tokens"] * 2
    mine = ours.generate(ids, tasks, new)
    same = []
    for i, task in enumerate(tasks):
        theirs = peft.generate(ids[i:i + 1], [task], new)[0]
        differ = np.flatnonzero(mine[i] != theirs)
        same.append(int(differ[0]) if len(differ) else None)
    relative = max(r["max_abs"] / r["scale"] for r in rows)
    identical = sum(s is None for s in same)
    result = {"bound": {"relative_logits": RELATIVE_BOUND, "greedy_rows": f"{GREEDY_ROWS} of {len(TASKS)}",
                        "greedy_steps": new},
              "reference": f"PEFT + PyTorch, {peft.dtype}, {mode['device']}", "rows": rows,
              "max_relative_logits": relative, "greedy_identical_rows": identical,
              "first_difference_per_row": same, "providers": ours.model.providers,
              "passed": bool(relative <= RELATIVE_BOUND and identical >= min(GREEDY_ROWS, len(TASKS)))}
    log(f"  parity: max |Δlogits| / scale {relative:.2e} (bound {RELATIVE_BOUND}), greedy {identical}/{len(TASKS)}"
        f" rows identical over {new} steps")
    peft.close()
    return result


def speed(built: dict, mode: dict, log) -> dict:
    """TTFT and decode time per token, batch by batch, each engine's cases interleaved (benchmarks/measure.py)."""
    out = {"prompt_tokens": mode["prompt"], "new_tokens": mode["new_tokens"], "batches": {}}
    loaded = {"spexport": engines.Spexport(built["artifact"], mode["device"]),
              "peft+pytorch": engines.Peft(built["model"], built["adapters"], mode["device"])}
    if built["genai"] is not None:
        loaded[GENAI] = engines.Genai(built["genai"])
        if mode["device"] == "cuda":
            try:
                loaded[GENAI_GRAPH] = engines.Genai(engines.genai_with_cuda_graph(built["genai"]))
            except Exception as e:  # reported beside the timings; the other engines still run
                out["failed"] = {GENAI_GRAPH: f"{type(e).__name__}: {e}"}
    vocab = loaded["spexport"].model.info.vocab_size
    names = [name for name, _ in TASKS]
    for batch in mode["batches"]:
        ids = np.random.default_rng(batch).integers(3, vocab, (batch, mode["prompt"]))
        one, mixed = [names[0]] * batch, [names[i % len(names)] for i in range(batch)]
        cases = {"spexport, one task": measure.generation(loaded["spexport"], ids, one, mode["new_tokens"]),
                 "spexport, mixed tasks": measure.generation(loaded["spexport"], ids, mixed, mode["new_tokens"]),
                 "peft+pytorch, one task": measure.generation(loaded["peft+pytorch"], ids, one, mode["new_tokens"])}
        for name in (GENAI, GENAI_GRAPH):
            if name in loaded:
                cases[name] = measure.generation(loaded[name], ids, one, mode["new_tokens"])
        for name, case in list(cases.items()):  # warm-up: CUDA kernels load, cuBLAS picks algorithms, arenas grow
            try:
                case()
            except Exception as e:  # an engine that cannot serve this batch is reported, not fatal to the rest
                out.setdefault("failed", {})[f"{name}, batch {batch}"] = f"{type(e).__name__}: {e}"
                del cases[name]
        runs = measure.interleaved(cases, mode["reps"])
        out["batches"][str(batch)] = runs
        log(f"  batch {batch}: " + ", ".join(f"{name} {measure.median(r, 'step_s') * 1e3:.2f} ms/token"
                                             for name, r in runs.items()))
    out["host_work_per_step_ms"] = {str(b): engines.host_work_ms(b, vocab) for b in mode["batches"]}
    out["placement"] = engines.placement(built["artifact"], mode["device"])
    loaded["peft+pytorch"].close()
    return out


def floor(built: dict, device: str) -> dict:
    """The HBM bandwidth floor of a batch-1 decode step: fp16 weights read once (a tied head reads the
    embedding table once; other embedding rows are looked up, not read), at the device's peak and at the rate
    a device-to-device copy reaches."""
    from safetensors import safe_open

    weights = 0
    for path in sorted(built["model"].glob("*.safetensors")):
        with safe_open(path, "np") as f:
            weights += sum(2 * int(np.prod(f.get_slice(key).get_shape())) for key in f.keys())
    name, copy_bps = engines.device_bandwidth(device)
    peak = next((bps for key, bps in PEAK_BANDWIDTH.items() if key in name), None)
    return {"weight_bytes_fp16": weights, "device": name, "peak_bytes_per_s": peak, "copy_bytes_per_s": copy_bps,
            "floor_ms_at_peak": weights / peak * 1e3 if peak else None,
            "floor_ms_at_copy_rate": weights / copy_bps * 1e3 if copy_bps else None}


def environment(device: str) -> dict:
    import onnxruntime as ort

    versions = {}
    for package in ["numpy", "onnx", "onnx-ir", "torch", "transformers", "peft", "onnxruntime-genai-cuda",
                    "onnxruntime-genai"]:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["onnxruntime (imported)"] = f"{ort.__version__} from {Path(ort.__file__).parent}"
    commit = os.environ.get("SPEXPORT_COMMIT")
    if not commit:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
        commit = done.stdout.strip() if done.returncode == 0 else "unknown (set SPEXPORT_COMMIT)"
    return {"device": device, "gpu": engines.gpu_facts(device), "commit": commit,
            "available_providers": ort.get_available_providers(), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "versions": versions,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_size(size: str, work: Path, mode: dict, entry: dict, save, log) -> None:
    """Build, parity, speed and floor for one size into `entry`, saving after each stage. A failed stage is a
    result too (its error is recorded) and the stages after it still run, where the build allows."""
    def stage(name: str, fn, *args):
        log(f"[{size}] {name}")
        try:
            entry[name] = fn(*args)
        except Exception as e:
            entry[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  {name} failed: {entry[name]['error']}")
        save()
        return entry[name]

    built = stage("build", build, size, work, mode["device"], log)
    if "error" in built:
        return
    entry["build"] = {"times": built["times"], "genai_unavailable": built["genai_unavailable"]}
    stage("parity", parity, built, mode, log)
    stage("speed", speed, built, mode, log)
    stage("floor", floor, built, mode["device"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-gpu-work"))
    parser.add_argument("--sizes", help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--reps", type=int)
    parser.add_argument("--cpu-rehearsal", action="store_true", help="the tiny config on the CPU provider")
    args = parser.parse_args(argv)
    mode = dict(MODES["rehearsal" if args.cpu_rehearsal else "gpu"])
    mode["sizes"] = args.sizes.split(",") if args.sizes else mode["sizes"]
    mode["reps"] = args.reps or mode["reps"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", flush=True)

    results = {"mode": "cpu rehearsal" if args.cpu_rehearsal else "gpu", "environment": environment(mode["device"]),
               "models": {}}
    log(f"on {results['environment']['gpu'].get('name', 'the CPU')}, onnxruntime "
        f"{results['environment']['versions']['onnxruntime (imported)']}")
    for size in mode["sizes"]:
        results["models"][size] = {"config": CONFIGS[size], "tasks": dict(TASKS)}
        run_size(size, args.work, mode, results["models"][size], lambda: gpu_report.write(results, args.out), log)
    log(f"done; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
