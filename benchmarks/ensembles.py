"""Prompt ensembles against their members run alone, on real models (issue 27, item 2).

- MiniLM (all-MiniLM-L6-v2, fp32, tests/checkpoints.py) with five random prompt-tuning classifiers in one
  ensemble: classifying one text with the ensemble (one batch of five rows) against the five members one
  after another. Target: <= 0.6x.
- SmolLM2-135M-Instruct (fp32) with five random prompt-tuning tasks in one ensemble: greedy generation with
  the ensemble (five rows, one shared continuation) against one member alone, per generated token, and the
  prompt (TTFT) alone. Target: <= 2x.

Cases are interleaved (benchmarks/measure.py) and ratios taken pair by pair. Run once, bounded:

    nice -n 10 python -m benchmarks.ensembles [--work /tmp/spexport-ensembles] [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import measure, workloads
from benchmarks.environment import environment

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = [f"m{i}" for i in range(5)]
VIRTUAL_TOKENS = 16
TEXT = "The film was long, but the acting and the music made every minute of it worth watching."
PROMPT = ("Rewrite the following sentence in plain words, then say what it means: the committee deferred its "
          "decision on the proposal until the next quarterly meeting, citing incomplete budget figures.")
NEW_TOKENS = 32


def _checkpoints():
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints

    return checkpoints


def build_classifier(work: Path) -> Path:
    """MiniLM with five random prompt-tuning sequence classifiers (2 labels), the five in ensemble "ens"."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from spexport.export import convert

    model_dir, artifact = _checkpoints().minilm(), work / "minilm-artifact"
    if (artifact / "spexport.json").is_file():
        return artifact
    adapters = []
    for i, name in enumerate(MEMBERS):
        folder = work / "minilm-adapters" / name
        if not (folder / "adapter_config.json").is_file():
            torch.manual_seed(i)
            base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
            peft = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS,
                                                           num_virtual_tokens=VIRTUAL_TOKENS))
            for param in peft.parameters():
                if param.requires_grad:
                    torch.nn.init.normal_(param, std=0.05)
            peft.save_pretrained(folder)
        adapters.append((name, folder))
    convert(model_dir, adapters, artifact, overwrite=True, ensembles={"ens": MEMBERS})
    return artifact


def build_generator(work: Path) -> Path:
    """SmolLM2 with five random prompt-tuning tasks, the five in ensemble "ens"."""
    from transformers import AutoModelForCausalLM

    from spexport.export import convert

    model_dir, artifact = _checkpoints().smollm2(), work / "smollm2-artifact"
    if (artifact / "spexport.json").is_file():
        return artifact
    adapters = [(name, workloads.build_prompt_adapter(AutoModelForCausalLM.from_pretrained(model_dir), model_dir,
                                                       work / "smollm2-adapters" / name, VIRTUAL_TOKENS, seed=10 + i))
                for i, name in enumerate(MEMBERS)]
    convert(model_dir, adapters, artifact, overwrite=True, ensembles={"ens": MEMBERS})
    return artifact


def classify_cases(model) -> dict:
    def timed(fn):
        def run() -> dict:
            start = time.perf_counter()
            fn()
            return {"s": time.perf_counter() - start}
        return run

    return {"ensemble, one batch": timed(lambda: model.classify(TEXT, task="ens")),
            "members one after another": timed(lambda: [model.classify(TEXT, task=t) for t in MEMBERS]),
            "one member": timed(lambda: model.classify(TEXT, task=MEMBERS[0]))}


def generate_cases(model) -> dict:
    ids = np.array([model.apply_chat_template([{"role": "user", "content": PROMPT}])])

    def case(task: str):
        def run() -> dict:
            start = time.perf_counter()
            model.generate(ids, task=task, max_new_tokens=1)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, task=task, max_new_tokens=NEW_TOKENS)
            total = time.perf_counter() - start
            new = out[0, ids.shape[1]:].tolist()
            eos = [i for i, t in enumerate(new) if t in model.info.eos_token_ids]
            steps = eos[0] + 1 if eos else len(new)
            return {"ttft_s": ttft, "total_s": total, "tokens": steps, "s_per_token": total / steps,
                    "decode_s_per_token": max(total - ttft, 1e-9) / max(steps - 1, 1)}
        return run

    return {"ensemble of 5": case("ens"), "one member": case(MEMBERS[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-ensembles"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ensembles.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from spexport.runtime import load

    result = {"machine": environment(measure.threads()), "members": len(MEMBERS), "virtual_tokens": VIRTUAL_TOKENS}
    classifier = load(build_classifier(args.work))
    runs = measure.interleaved(classify_cases(classifier), args.reps)
    result["classify"] = {
        "text": TEXT, "median_s": {name: measure.median(r, "s") for name, r in runs.items()},
        "ensemble_over_members_in_turn": measure.paired_ratio(runs["ensemble, one batch"],
                                                              runs["members one after another"], "s"),
        "target": "<= 0.6"}
    del classifier
    generator = load(build_generator(args.work))
    runs = measure.interleaved(generate_cases(generator), args.reps)
    ens, one = runs["ensemble of 5"], runs["one member"]
    result["generate"] = {
        "new_tokens": NEW_TOKENS, "runs": runs,
        "ensemble_over_member_per_token": measure.paired_ratio(ens, one, "s_per_token"),
        "ensemble_over_member_decode_step": measure.paired_ratio(ens, one, "decode_s_per_token"),
        "ensemble_over_member_ttft": measure.paired_ratio(ens, one, "ttft_s"),
        "target": "<= 2 (per generated token, prompt included)"}
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str)[:3000])


if __name__ == "__main__":
    main()
