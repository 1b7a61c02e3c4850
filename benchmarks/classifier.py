"""The encoder workload: a BERT-base classifier (random weights) with a P-tuning v2 task.

P-tuning v2 is PEFT's prefix tuning on a sequence classifier: a KV prefix in every layer and a
trained head. spexport's EncoderModel and PEFT + PyTorch classify the same token ids, batch 1 and 8,
interleaved; the export time is measured when the artifact is built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import measure, workloads

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
TASK, VIRTUAL_TOKENS, LABELS = "sentiment", 32, 2


def build(root: Path) -> dict:
    """The base model, its P-tuning v2 adapter and the artifact, each once; export time as measured."""
    import torch
    from peft import PrefixTuningConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    model_dir, adapter, artifact = root / "model", root / "adapters" / TASK, root / "artifact-fp32"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=LABELS)).save_pretrained(model_dir)
        workloads.save_tokenizer(model_dir)
    if not (adapter / "adapter_config.json").is_file():
        torch.manual_seed(1)
        base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=LABELS)
        peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=VIRTUAL_TOKENS))
        for param in peft.parameters():
            if param.requires_grad:  # the prefix and the head, at the scale of trained ones
                torch.nn.init.normal_(param, std=0.02)
        peft.save_pretrained(adapter)
    times_path = root / "export_times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    if not workloads.built_by_this_source(artifact):
        from spexport.export import convert

        start = time.perf_counter()
        convert(model_dir, [(TASK, adapter)], artifact, overwrite=True)
        times["spexport convert (fp32, 1 task)"] = time.perf_counter() - start
        workloads.stamp_source(artifact)
        times_path.write_text(json.dumps(times, indent=2))
    return {"model": model_dir, "adapter": adapter, "artifact": artifact, "export_times_s": times}


class Spexport:
    def __init__(self, artifact: Path):
        from spexport.runtime import load

        self.model = load(artifact)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model.logits(ids, task=TASK)


class Peft:
    def __init__(self, model_dir: Path, adapter: Path, threads: int):
        import torch
        from peft import PeftModel
        from transformers import BertForSequenceClassification

        torch.set_num_threads(threads)
        self.torch = torch
        base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=LABELS).eval()
        self.model = PeftModel.from_pretrained(base, adapter).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(ids)
            return self.model(input_ids=x, attention_mask=self.torch.ones_like(x)).logits.numpy()


def run(work: Path, mode: dict, threads: int, log) -> dict:
    """Latency of one classification call at batch 1 and 8 (`classifier_seq` tokens), and agreement with PEFT."""
    log("[bert] building model, P-tuning v2 adapter and artifact")
    built = build(work / "bert")
    engines = {"spexport": Spexport(built["artifact"]), "peft+pytorch": Peft(built["model"], built["adapter"], threads)}
    ids = np.random.default_rng(2).integers(5, BERT_BASE["vocab_size"], (8, mode["classifier_seq"]), dtype=np.int64)
    log("[bert] classification latency")

    def case(engine, rows):
        def timed() -> dict:
            start = time.perf_counter()
            engine.logits(rows)
            return {"latency_s": time.perf_counter() - start}
        return timed

    latency = {f"batch{b}": measure.interleaved({name: case(e, ids[:b]) for name, e in engines.items()}, mode["reps"])
               for b in (1, 8)}
    ours, theirs = engines["spexport"].logits(ids), engines["peft+pytorch"].logits(ids)
    return {"virtual_tokens": VIRTUAL_TOKENS, "seq": mode["classifier_seq"], "latency": latency,
            "max_abs_logits_vs_peft": float(np.abs(ours - theirs).max()),
            "same_label_as_peft": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "export_times_s": built["export_times_s"]}
