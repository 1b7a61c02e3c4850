"""Time to add one task to a SmolLM2 artifact with `spexport add` (no torch), against exporting again.

    .venv/bin/python -m benchmarks.add_task --model /path/to/smollm2 [--work DIR] [--optimize]

Exports the model once with two tasks (timed: that is what adding a task cost before), then times
`spexport add` of a prompt-tuning task (20 virtual tokens, run through the prefix graph) and of a
prefix-tuning task (stored as it is), each as a fresh `spexport` process, as a user would run it, and
in-process. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.environment import environment


def adapter(model_dir: Path, kind: str, out: Path, n: int, seed: int) -> Path:
    if out.is_dir():
        return out
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type=TaskType.CAUSAL_LM,
                                                                              num_virtual_tokens=n)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    for param in model.prompt_encoder.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(out)
    return out


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-add-bench"))
    parser.add_argument("--optimize", action="store_true", help="export with fusions (default: --no-optimize)")
    parser.add_argument("--reuse", action="store_true", help="time only the adds, on the artifact in --work")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    first = [("pt", adapter(args.model, "prompt", work / "pt", 20, 1)),
             ("prefix", adapter(args.model, "prefix", work / "prefix", 20, 2))]
    new = {"pt-new": adapter(args.model, "prompt", work / "pt-new", 20, 3),
           "prefix-new": adapter(args.model, "prefix", work / "prefix-new", 20, 4)}
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    spexport = [sys.executable, "-m", "spexport.cli"]
    artifact = work / "artifact"
    convert = [*spexport, "convert", "--model", str(args.model), "--output", str(artifact), "--overwrite", "--quiet",
               *(a for name, path in first for a in ("--adapter", f"{name}={path}"))]
    convert += [] if args.optimize else ["--no-optimize"]
    results = {"model": str(args.model), "optimize": args.optimize, "cores": len(os.sched_getaffinity(0)),
               "environment": environment(2)}
    if not (args.reuse and artifact.is_dir()):
        results["convert_2_tasks_s"] = round(timed(convert, env), 2)
    from spexport.runtime import load

    load(artifact)  # verifies the files once, as serving would; later loads and adds use the stat cache
    time.sleep(2.1)  # files written this recently are not remembered as verified (runtime.session.VerifiedFiles)
    for name, path in new.items():
        results[f"add_{name}_cli_s"] = round(timed([*spexport, "add", str(artifact), "--quiet", "--adapter",
                                                    f"{name}={path}"], env), 2)
        results[f"remove_{name}_cli_s"] = round(timed([*spexport, "remove", str(artifact), "--quiet", name], env), 2)
    from spexport.tasks import add_tasks, remove_tasks

    for name, path in new.items():
        start = time.perf_counter()
        add_tasks(artifact, [(name, path)])
        results[f"add_{name}_in_process_s"] = round(time.perf_counter() - start, 2)
        remove_tasks(artifact, [name])
    model = load(artifact)
    for name, path in new.items():
        start = time.perf_counter()
        model.add_task(name, path)
        results[f"add_task_{name}_live_s"] = round(time.perf_counter() - start, 2)
    results["artifact_bytes"] = {p.name: p.stat().st_size for p in sorted(artifact.iterdir()) if p.is_file()}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
