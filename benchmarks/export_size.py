"""Export at a real size: a random-weight model with Llama-3.2-1B's config, spexport convert beside
onnxruntime-genai's model builder, each a child process timed for wall clock and peak resident memory.

    python -m benchmarks.export_size [--work DIR] [--genai-python /tmp/genai11/bin/python]
                                     [--runs fp32,genai,float16,int4] [--out benchmarks/results]

The model (4.9 GB of float32 weights, tied embeddings) and one prompt-tuning task are built once into
--work. genai's builder runs in its own environment (--genai-python: onnxruntime-genai 0.11.4 beside the
locked stack), since spexport's does not hold it. Writes export_size.json and export_size.md into --out,
with the git commit, the package versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import workloads
from benchmarks.real_model import child
from benchmarks.run import environment

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                    tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                  "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})
RUNS = {"fp32": [], "float16": ["--dtype", "float16"], "int4": ["--quantize", "int4"]}


def build_model(folder: Path) -> Path:
    """The random-weight model (HF's own init) and a small tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_3_2_1B, **workloads.NO_SPECIAL_TOKENS))
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    workloads.save_tokenizer(folder)
    workloads.build_prompt_adapter(model, folder, folder.parent / "task", 8, seed=1)
    return folder


def spexport_run(model_dir: Path, out: Path, extra: list[str], log: Path) -> dict:
    return child([sys.executable, "-c", "from spexport.cli import main; main()", "convert", "--model", str(model_dir),
                  "--adapter", f"task={model_dir.parent / 'task'}", "--output", str(out), "--overwrite", "--quiet",
                  *extra], log)


def genai_run(python: str, model_dir: Path, out: Path, log: Path) -> dict:
    return child([python, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
                  "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")], log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spexport-1b")
    parser.add_argument("--genai-python", default="/tmp/genai11/bin/python")
    parser.add_argument("--runs", default="fp32,genai,float16,int4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep", action="store_true", help="keep the other runs of --out's export_size.json")
    args = parser.parse_args(argv)
    model_dir = build_model(args.work / "model")
    weights = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    previous = args.out / "export_size.json"
    figures = json.loads(previous.read_text())["runs"] if args.keep and previous.is_file() else {}
    for run in args.runs.split(","):
        print(f"{time.strftime('%H:%M:%S')} {run}", file=sys.stderr, flush=True)
        out = args.work / run
        if run == "genai":
            figures[run] = genai_run(args.genai_python, model_dir, out, args.work / "genai.log")
            figures[run]["version"] = subprocess.run([args.genai_python, "-c", "import onnxruntime_genai as g; "
                                                      "print(g.__version__)"], capture_output=True,
                                                     text=True).stdout.strip()
        else:
            try:
                figures[run] = spexport_run(model_dir, out, RUNS[run], args.work / f"{run}.log")
            except RuntimeError as e:  # an export killed for memory is a result too
                figures[run] = {"failed": str(e), "commit": commit}
                continue
        figures[run].update(commit=commit, load_average=list(os.getloadavg()))
        figures[run]["peak_rss_over_fp32_weights"] = figures[run]["peak_rss_bytes"] / weights
        print(json.dumps(figures[run]), file=sys.stderr, flush=True)
    if "fp32" in figures and "genai" in figures:
        figures["fp32"]["wall_over_genai"] = figures["fp32"]["wall_s"] / figures["genai"]["wall_s"]
    result = {"commit": commit, "environment": environment(1), "model": LLAMA_3_2_1B, "fp32_weight_bytes": weights,
              "runs": figures}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_size.json").write_text(json.dumps(result, indent=2))
    (args.out / "export_size.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"Llama-3.2-1B config, random weights ({result['fp32_weight_bytes'] / 1e9:.2f} GB fp32), commit "
             f"{result['commit'][:10]}, {result['environment']['cpu']}", "",
             "| export | wall s | peak RSS GB | RSS / fp32 weights | commit |", "|---|---|---|---|---|"]
    for run, figure in result["runs"].items():
        if "failed" in figure:
            lines.append(f"| spexport convert {run} | failed: {figure['failed'][-80:]} | | |")
            continue
        genai = f"onnxruntime-genai {figure.get('version', '')} builder (fp32){run[5:]}"
        name = genai if run.startswith("genai") else f"spexport convert {run}"
        lines.append(f"| {name} | {figure['wall_s']:.1f} | {figure['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{figure['peak_rss_over_fp32_weights']:.2f} | {figure.get('commit', '')[:10]} |")
    if "wall_over_genai" in result["runs"].get("fp32", {}):
        lines += ["", f"spexport fp32 export time / genai builder: {result['runs']['fp32']['wall_over_genai']:.2f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
