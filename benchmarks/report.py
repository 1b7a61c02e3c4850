"""results.json -> results.md (tables, targets met or not) and PNG plots.

    .venv/bin/python -m benchmarks.report benchmarks/results   # re-render from a saved results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.measure import median, paired_ratio


def floor_step_s(results: dict, model: dict) -> float:
    """The physical floor of one decode step: weight bytes over the best bandwidth seen in the run."""
    best = max(results["bandwidth_start"]["best_gbs"], results["bandwidth_end"]["best_gbs"])
    return model["weight_bytes_per_step"] / (best * 1e9)


def _total(runs: list[dict], new_tokens: int) -> list[dict]:
    return [{"total_s": r["ttft_s"] + new_tokens * r["step_s"]} for r in runs]


def targets(results: dict) -> list[dict]:
    """The issue's targets on GPT-2 small: each with its measured value and whether it is met."""
    model = results["models"].get("gpt2")
    if not model:
        return []
    n = results["config"]["new_tokens"]
    b1, b8 = model["speed"]["batch1"], model["speed"]["batch8"]
    sweep, mixed, memory = model["virtual_token_sweep"], model["mixed_batch"], model["memory"]
    rows = []

    def add(name: str, value: float, limit: float, at_least: bool, unit: str = "×") -> None:
        met = value >= limit if at_least else value <= limit
        rows.append({"target": name, "measured": value, "limit": limit, "at_least": at_least, "unit": unit,
                     "met": met})

    add("decode tokens/s at batch 1 vs PEFT+PyTorch", paired_ratio(b1["spexport"], b1["peft+pytorch"],
                                                                    "tokens_per_s"), 1.7, True)
    step = median(b1["spexport"], "step_s")
    add("decode step at batch 1 vs the bandwidth floor", step / floor_step_s(results, model), 1.25, False)
    add(f"time for the prompt + {n} tokens vs ORTModelForCausalLM (batch 1)",
        paired_ratio(_total(b1["spexport"], n), _total(b1["optimum-ort"], n), "total_s"), 1.1, False)
    add(f"time for the prompt + {n} tokens vs ORTModelForCausalLM (batch 8)",
        paired_ratio(_total(b8["spexport"], n), _total(b8["optimum-ort"], n), "total_s"), 1.1, False)
    if "spexport|128" in sweep and "spexport|8" in sweep:
        add("TTFT with 128 virtual tokens vs with 8", paired_ratio(sweep["spexport|128"], sweep["spexport|8"],
                                                                   "ttft_s"), 1.1, False)
    add("8 rows of 8 tasks vs 8 rows of 1 task (prompt + decode time)",
        paired_ratio(_total(mixed["8 tasks"], n), _total(mixed["1 task"], n), "total_s"), 1.05, False)
    if "spexport int8" in b1:
        add("int8 decode tokens/s at batch 1 vs PEFT+PyTorch", paired_ratio(b1["spexport int8"], b1["peft+pytorch"],
                                                                            "tokens_per_s"), 2.5, True)
        # int8's agreement target is measured on a trained checkpoint: benchmarks/quantization.py
    one, hundred = memory["1"], memory["100"]
    model_only = one["rss_served"] - one["bank_bytes"]
    add("resident memory with 100 tasks vs model + 1.1 × their prompt bytes",
        hundred["rss_served"] / (model_only + 1.1 * hundred["bank_bytes"]), 1.0, False)
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def markdown(results: dict) -> str:
    machine, cfg = results["machine"], results["config"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    bandwidth = max(results["bandwidth_start"]["best_gbs"], results["bandwidth_end"]["best_gbs"])
    lines = [f"Machine: {machine['cpu']}, {machine['threads']} threads for every engine, {machine['memory_gib']} GiB; "
             f"load average {machine['load_average_at_start'][0]:.1f} at start, "
             f"{machine['load_average_at_end'][0]:.1f} at end (1-minute averages; the run's own threads count).",
             f"Versions: {versions}. Run {machine.get('date', '(date not recorded)')} at commit "
             f"{machine.get('git_commit', '(not recorded)')}.",
             f"Mode `{results['mode']}`: prompt {cfg['prompt']} tokens, {cfg['new_tokens']} new tokens, "
             f"median of {cfg['reps']} interleaved repetitions; memory bandwidth {bandwidth:.1f} GB/s "
             f"(best numpy kernel, measured at start and end). Whole run: {results['wall_s'] / 60:.1f} min.", ""]
    rows = targets(results)
    if rows:
        lines += ["**Targets (GPT-2 small, fp32 unless stated)**", ""]
        lines += _table(["target", "measured", "limit", "met"],
                        [[r["target"], f"{r['measured']:.2f}{r['unit']}",
                          f"{'≥' if r['at_least'] else '≤'} {r['limit']}{r['unit']}", "yes" if r["met"] else "**no**"]
                         for r in rows])
        lines.append("")
    for name, model in results["models"].items():
        lines += _model_section(results, name, model)
    if results.get("classifier"):
        lines += _classifier_section(results["classifier"])
    return "\n".join(lines) + "\n"


def _classifier_section(bert: dict) -> list[str]:
    latency = bert["latency"]
    lines = [f"### bert (BERT-base classifier, a P-tuning v2 task of {bert['virtual_tokens']} virtual tokens, "
             f"{bert['seq']} tokens per row)", ""]
    lines += _table(["engine", "latency b1 (ms)", "latency b8 (ms)", "b1 speed vs PEFT", "b8 speed vs PEFT"],
                    [[e, _ms(median(latency["batch1"][e], "latency_s")), _ms(median(latency["batch8"][e], "latency_s")),
                      f"{paired_ratio(latency['batch1']['peft+pytorch'], latency['batch1'][e], 'latency_s'):.2f}",
                      f"{paired_ratio(latency['batch8']['peft+pytorch'], latency['batch8'][e], 'latency_s'):.2f}"]
                     for e in latency["batch1"]])
    lines += ["", f"Against PEFT: max |Δlogits| {bert['max_abs_logits_vs_peft']:.1e}, same label for "
              f"{bert['same_label_as_peft']:.0%} of rows. Export time: "
              + "; ".join(f"{k} {v:.0f} s" for k, v in bert["export_times_s"].items()) + ".", ""]
    return lines


def _model_section(results: dict, name: str, model: dict) -> list[str]:
    b1, b8 = model["speed"]["batch1"], model["speed"]["batch8"]
    floor = floor_step_s(results, model)
    lines = [f"### {name} ({model['weight_bytes_per_step'] / 1e6:.0f} MB of fp32 weights read per decode step; "
             f"floor {_ms(floor)} ms/step = {1 / floor:.1f} tokens/s at batch 1)", ""]
    rows = []
    for engine in b1:
        rows.append([engine, _ms(median(b1[engine], "ttft_s")), f"{median(b1[engine], 'tokens_per_s'):.1f}",
                     _ms(median(b1[engine], "step_s")), f"{median(b1[engine], 'step_s') / floor:.2f}",
                     _ms(median(b8[engine], "ttft_s")), f"{median(b8[engine], 'tokens_per_s'):.1f}",
                     f"{paired_ratio(b1[engine], b1['peft+pytorch'], 'tokens_per_s'):.2f}"])
    lines += _table(["engine", "TTFT b1 (ms)", "tokens/s b1", "ms/step b1", "× fp32 floor", "TTFT b8 (ms)",
                     "tokens/s b8", "b1 speed vs PEFT"], rows)
    lines.append("")
    ceiling = model.get("matmul_ceiling")
    if ceiling:
        alone = ceiling["onnxruntime matmuls only"]
        step = median(alone, "step_s")
        lines += [f"ONNX Runtime's MatMul kernels alone, reading the same {alone[0]['matrices']} weight matrices once "
                  f"at batch 1 (nothing else in the graph): {_ms(step)} ms = {step / floor:.2f}× the floor "
                  f"({alone[0]['bytes'] / step / 1e9:.1f} GB/s). spexport's decode step, measured beside it: "
                  f"{paired_ratio(ceiling['spexport'], alone, 'step_s'):.2f}× that.", ""]
    if model.get("drift"):
        tokens = results["config"]["drift_tokens"]
        lines += _table(["engine", "compared with", "max abs Δlogits", f"greedy agreement ({tokens} tokens, 8 rows)",
                         "same next token along the reference's text", "tokens/s b1", "b1 speed vs PEFT"],
                        [[k, d["against"], f"{d['max_abs_logits']:.2e}", f"{d['greedy_agreement']:.3f}",
                          f"{d['teacher_forced_agreement']:.3f}" if "teacher_forced_agreement" in d else "",
                          f"{median(b1[k], 'tokens_per_s'):.1f}",
                          f"{paired_ratio(b1[k], b1['peft+pytorch'], 'tokens_per_s'):.2f}"]
                         for k, d in model["drift"].items() if isinstance(d, dict)])
        if "fp32_top2_margin_median" in model["drift"]:
            lines += ["", f"Median gap between the best and second-best logit (fp32, random weights): "
                      f"{model['drift']['fp32_top2_margin_median']:.3f}; a drift larger than that can flip a greedy "
                      "choice, and every token after a flip differs."]
        lines.append("")
    if model.get("mixed_batch"):
        mixed = model["mixed_batch"]
        ttft = [_ms(median(mixed[k], "ttft_s")) for k in ("8 tasks", "1 task")]
        rate = [f"{median(mixed[k], 'tokens_per_s'):.1f}" for k in ("8 tasks", "1 task")]
        lines.append(f"Mixed batch (8 rows, 8 tasks vs 1 task): TTFT {ttft[0]} vs {ttft[1]} ms, "
                     f"decode {rate[0]} vs {rate[1]} tokens/s.")
    if model.get("virtual_token_sweep"):
        sweep = model["virtual_token_sweep"]
        counts = sorted({int(k.split("|")[1]) for k in sweep})
        lines += ["", "Virtual tokens (batch 1): TTFT ms / decode tokens/s", ""]
        lines += _table(["engine", *map(str, counts)],
                        [[engine] + [f"{_ms(median(sweep[f'{engine}|{n}'], 'ttft_s'))} / "
                                     f"{median(sweep[f'{engine}|{n}'], 'tokens_per_s'):.1f}" for n in counts]
                         for engine in ("spexport", "peft+pytorch")])
    if model.get("task_switch"):
        switch = model["task_switch"]
        lines += ["", "Switching task between requests (one-token request, batch 1):", ""]
        lines += _table(["engine", "after the same task (ms)", "after another task (ms)", "switch cost (ms)"],
                        [[e, _ms(median(switch[f"{e}|same task"], "latency_s")),
                          _ms(median(switch[f"{e}|switched"], "latency_s")),
                          _ms(median(switch[f"{e}|switched"], "latency_s") - median(switch[f"{e}|same task"],
                                                                                    "latency_s"))]
                         for e in ("spexport", "peft+pytorch")])
    memory = model["memory"]
    lines += ["", f"Resident memory of a process serving the artifact (prompt bytes per 32-token task: "
              f"{model['prompt_bytes_32_virtual_tokens'] / 2**20:.2f} MiB):", ""]
    lines += _table(["tasks", "RSS after load (MiB)", "RSS after a request (MiB)", "bank (MiB)"],
                    [[k, f"{m['rss_loaded'] / 2**20:.0f}", f"{m['rss_served'] / 2**20:.0f}",
                      f"{m['bank_bytes'] / 2**20:.1f}"] for k, m in memory.items()])
    lines += ["", "Export times: " + "; ".join(f"{k} {v:.0f} s" for k, v in model["export_times_s"].items()) + "."]
    if model["unavailable"]:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in model["unavailable"].items()) + "."]
    return lines + [""]


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, model in results["models"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        floor = floor_step_s(results, model)
        for ax, batch in zip(axes, ("batch1", "batch8")):
            runs = model["speed"][batch]
            engines = list(runs)
            ax.barh(engines, [median(runs[e], "tokens_per_s") for e in engines], color="tab:blue")
            if batch == "batch1":
                ax.axvline(1 / floor, color="tab:red", linestyle="--", label="fp32 bandwidth floor")
                ax.legend(loc="lower right")
            ax.set_xlabel("decode tokens/s")
            ax.set_title(f"{name}: {batch.replace('batch', 'batch ')}")
        fig.tight_layout()
        written.append(out / f"{name}_decode.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        sweep = model.get("virtual_token_sweep")
        if sweep:
            counts = sorted({int(k.split("|")[1]) for k in sweep})
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for engine in ("spexport", "peft+pytorch"):
                axes[0].plot(counts, [median(sweep[f"{engine}|{n}"], "ttft_s") * 1000 for n in counts], "o-",
                             label=engine)
                axes[1].plot(counts, [median(sweep[f"{engine}|{n}"], "tokens_per_s") for n in counts], "o-",
                             label=engine)
            axes[0].set_ylabel("TTFT (ms), batch 1")
            axes[1].set_ylabel("decode tokens/s, batch 1")
            for ax in axes:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("virtual tokens of the task")
                ax.legend()
            fig.suptitle(f"{name}: a longer soft prompt")
            fig.tight_layout()
            written.append(out / f"{name}_virtual_tokens.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def write(results: dict, out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    try:
        plots(results, out)
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    write(json.loads((folder / "results.json").read_text()), folder)
