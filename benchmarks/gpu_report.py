"""benchmarks/gpu.py's results as files, named gpu-<sizes run> (gpu-rehearsal for the CPU rehearsal): .json
(everything), .md (tables and the issue's targets) and .png (decode ms/token by batch, per engine and size)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.measure import median, paired_ratio

ONE, MIXED, PEFT, GENAI = ("spexport, one task", "spexport, mixed tasks", "peft+pytorch, one task",
                           "onnxruntime-genai (base model)")


def targets(model: dict) -> list[dict]:
    """The issue's four targets, where this run has what each needs."""
    batches = model.get("speed", {}).get("batches", {})
    found = []

    def add(name, value, limit, at_least):
        found.append({"target": name, "value": value, "limit": limit,
                      "met": bool(value >= limit if at_least else value <= limit)})

    one = batches.get("1", {})
    if GENAI in one:
        add("decode ms/token at batch 1, × onnxruntime-genai's", paired_ratio(one[ONE], one[GENAI], "step_s"),
            1.0, False)
    if PEFT in one:
        add("decode speed at batch 1, × PyTorch + PEFT's", paired_ratio(one[PEFT], one[ONE], "step_s"), 3.0, True)
    wide = batches.get("32", {})
    if GENAI in wide:
        add("tokens/s at batch 32 with mixed tasks, × onnxruntime-genai's (one task)",
            paired_ratio(wide[MIXED], wide[GENAI], "tokens_per_s"), 1.3, True)
    floor_ms = model.get("floor", {}).get("floor_ms_at_peak")
    if floor_ms and one:
        add("decode step at batch 1, × the HBM bandwidth floor", median(one[ONE], "step_s") * 1e3 / floor_ms,
            1.5, False)
    return found


def markdown(results: dict) -> str:
    env = results["environment"]
    gpu = env.get("gpu") or {}
    lines = [f"# spexport on {gpu.get('name', 'the CPU')} ({results['mode']})", "",
             f"{env['when']}; commit {env['commit']}; driver/clocks: {gpu.get('nvidia_smi', '-')}; "
             f"providers: {', '.join(env['available_providers'])}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v) + "."]
    for size, model in results["models"].items():
        lines += ["", f"## {size}", ""]
        for stage in ("build", "parity", "speed", "floor"):
            if isinstance(model.get(stage), dict) and "error" in model[stage]:
                lines.append(f"- {stage} failed: {model[stage]['error']}")
        parity = model.get("parity", {})
        if "max_relative_logits" in parity:
            lines.append(f"- parity against {parity['reference']}: max |Δlogits| / max |logits| "
                         f"{parity['max_relative_logits']:.2e} (bound {parity['bound']['relative_logits']}); "
                         f"greedy tokens identical on {parity['greedy_identical_rows']} of {len(parity['rows'])} rows "
                         f"over {parity['bound']['greedy_steps']} steps (bound {parity['bound']['greedy_rows']}); "
                         f"{'passed' if parity['passed'] else 'FAILED'}")
        speed = model.get("speed", {})
        if speed.get("batches"):
            lines += ["", f"Prompt {speed['prompt_tokens']} tokens, {speed['new_tokens']} new tokens, medians:", "",
                      "| batch | engine | TTFT ms | decode ms/token | tokens/s |", "| --- | --- | --- | --- | --- |"]
            for batch, runs in speed["batches"].items():
                for engine, r in runs.items():
                    lines.append(f"| {batch} | {engine} | {median(r, 'ttft_s') * 1e3:.2f} | "
                                 f"{median(r, 'step_s') * 1e3:.3f} | {median(r, 'tokens_per_s'):.0f} |")
            lines += ["", f"Engines that failed: {speed['failed']}"] if speed.get("failed") else []
            lines += ["", f"Node placement (a short generation's profile): {speed.get('placement')}",
                      f"Host work per step on float32 logits: {speed.get('host_work_per_step_ms')}"]
        if model.get("floor", {}).get("floor_ms_at_peak"):
            floor = model["floor"]
            lines.append(f"- HBM floor at batch 1: {floor['weight_bytes_fp16'] / 1e9:.2f} GB of fp16 weights, "
                         f"{floor['floor_ms_at_peak']:.3f} ms at peak, {floor['floor_ms_at_copy_rate']:.3f} ms at "
                         "the measured copy rate")
        rows = targets(model)
        if rows:
            lines += ["", "| target | value | limit | met |", "| --- | --- | --- | --- |"]
            lines += [f"| {t['target']} | {t['value']:.2f} | {t['limit']} | {'yes' if t['met'] else 'no'} |"
                      for t in rows]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [(s, m["speed"]["batches"]) for s, m in results["models"].items() if m.get("speed", {}).get("batches")]
    if not sizes:
        return
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, (size, batches) in zip(axes[0], sizes):
        engines = sorted({e for runs in batches.values() for e in runs})
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            xs = [j + i * width for j, runs in enumerate(batches.values()) if engine in runs]
            ys = [median(runs[engine], "step_s") * 1e3 for runs in batches.values() if engine in runs]
            ax.bar(xs, ys, width, label=engine)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("decode ms/token, log scale (lower is better)")
        ax.set_title(size)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stem(results: dict) -> str:
    return "gpu-rehearsal" if results["mode"] == "cpu rehearsal" else "gpu-" + "+".join(results["models"])


def write(results: dict, out: Path) -> None:
    for model in results["models"].values():
        model["targets"] = targets(model)
    name = stem(results)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    try:
        plot(results, out / f"{name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
