"""The drift report: how far a quantized artifact's answers move from float32's, per task.

For each task and each fixed prompt (a user turn through the model's chat template, or text through
its tokenizer; fixed random token ids without one), the reference (the float32 graph at convert
time, PEFT in `spexport validate`) writes its own greedy continuation. Both models then read
prompt + continuation in one pass (teacher forcing): agreement is the share of continuation tokens
where the quantized model's top-1 token is the reference's, and max |Δlogits| the largest logit
difference at those positions. Encoders report label agreement over the prompts instead (every
token's label for token classifiers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from spexport.artifact.manifest import ModelInfo, Task

PROMPTS = [
    "Tell me about the moon and why it has phases.",
    "Write two sentences about a friendly robot who learns to paint.",
    "How do I keep a small vegetable garden healthy in summer?",
    "What should I pack for a weekend trip to the beach?",
]
NEW_TOKENS = 16
REFERENCE = ".float32"  # staging subfolder of the float32 graph while the drift is measured, removed before sealing


class Reference(Protocol):
    def continuation(self, ids: np.ndarray, task: str, new_tokens: int) -> np.ndarray: ...

    def logits(self, ids: np.ndarray, task: str) -> np.ndarray: ...


@dataclass
class TaskDrift:
    task: str
    agreement: float  # share of compared positions with the same top-1 token (label, for encoders)
    max_abs_diff: float  # largest |Δlogit| there
    positions: int  # how many positions (rows, for sequence classifiers) were compared

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "task"}


class Served:
    """A runtime model (decoder-only) as a drift reference or candidate: one row at a time."""

    def __init__(self, model):
        self.model = model

    def continuation(self, ids: np.ndarray, task: str, new_tokens: int) -> np.ndarray:
        return self.model.generate(ids[None], task=task, max_new_tokens=new_tokens)[0, len(ids):]

    def logits(self, ids: np.ndarray, task: str) -> np.ndarray:
        return self.model.logits(ids[None], task=task)[0]


class TextEncoder:
    """Fixed texts as token ids, the way a request would send them: a user turn through the model's chat
    template when its folder has one (transformers' apply_chat_template), else tokenizer.json as the
    runtime reads it, without its padding. `available` is False when the folder has no tokenizer."""

    def __init__(self, model_dir: Path):
        self.tokenizer, self.chat = None, None
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            return
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception:  # the tokenizers library raises a bare Exception for a file it cannot parse
            return
        self.tokenizer.no_padding()
        try:
            from transformers import AutoTokenizer

            chat = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.chat = chat if getattr(chat, "chat_template", None) else None
        except Exception:  # no transformers tokenizer for this folder: plain text is what a client sends
            self.chat = None

    @property
    def available(self) -> bool:
        return self.tokenizer is not None

    def ids(self, text: str, reply_follows: bool = True) -> list[int]:
        if self.chat is not None:
            return list(self.chat.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                      add_generation_prompt=reply_follows, return_dict=False))
        return self.tokenizer.encode(text).ids


def prompt_rows(text: TextEncoder | None, info: ModelInfo, tasks: list[Task], reserve: int,
                seed: int = 0) -> list[np.ndarray]:
    """The drift prompts' token ids, each short enough that every task's virtual tokens and `reserve` more
    positions still fit the model's; fixed random ids without a tokenizer."""
    longest = max(1, info.max_positions - max(t.num_virtual_tokens for t in tasks) - reserve)
    if text is None or not text.available:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, info.vocab_size, max(1, min(longest, 12)), dtype=np.int64) for _ in PROMPTS]
    rows = [np.array(text.ids(prompt)[-longest:], np.int64) for prompt in PROMPTS]
    return [row for row in rows if len(row)] or [np.zeros(1, np.int64)]


def decoder_drift(reference: Reference, candidate: Reference, tasks: list[str], rows: list[np.ndarray],
                  eos: list[int], new_tokens: int = NEW_TOKENS) -> list[TaskDrift]:
    """Teacher-forced top-1 agreement and max |Δlogits| of `candidate` along `reference`'s own greedy text."""
    return compared_with(candidate, reference_texts(reference, tasks, rows, eos, new_tokens))


def reference_texts(reference: Reference, tasks: list[str], rows: list[np.ndarray], eos: list[int],
                    new_tokens: int = NEW_TOKENS) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per task, each row with `reference`'s greedy text after it, and the reference's logits at the positions
    that chose that text: all compared_with needs, so the reference need not be loaded beside the candidate."""
    texts = {}
    for task in tasks:
        texts[task] = []
        for ids in rows:
            continuation = reference.continuation(ids, task, new_tokens)
            stop = next((i + 1 for i, token in enumerate(continuation) if token in eos), len(continuation))
            sequence = np.concatenate([ids, continuation[:stop]])
            compared = slice(len(ids) - 1, len(sequence) - 1)  # the positions that chose each new token
            texts[task].append((sequence, reference.logits(sequence, task)[compared].copy()))
    return texts


def compared_with(candidate: Reference, texts: dict[str, list[tuple[np.ndarray, np.ndarray]]]) -> list[TaskDrift]:
    """decoder_drift's report of `candidate` on `reference_texts`'s texts."""
    report = []
    for task, rows in texts.items():
        same, total, worst = 0, 0, 0.0
        for sequence, theirs in rows:
            ours = candidate.logits(sequence, task)[-1 - len(theirs):-1]  # where the reference chose its text
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ours)
            worst = max(worst, float(np.abs(ours - theirs).max())) if len(ours) else worst
        report.append(TaskDrift(task, same / total if total else 1.0, worst, total))
    return report


def encoder_drift(reference, candidate, tasks: list[str], ids: np.ndarray, mask: np.ndarray) -> list[TaskDrift]:
    """Label agreement and max |Δlogits| of two encoder runtimes on the same rows: one label per row for
    sequence classifiers, one per unmasked token for token classifiers."""
    report = []
    for task in tasks:
        ours, theirs = (model.logits(ids, attention_mask=mask, task=task) for model in (candidate, reference))
        if ours.ndim == 3:  # token classification: compare the caller's real tokens only
            ours, theirs = ours[mask.astype(bool)], theirs[mask.astype(bool)]
        same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        report.append(TaskDrift(task, same / len(ours), float(np.abs(ours - theirs).max()), len(ours)))
    return report


def as_record(report: list[TaskDrift], reference: str, prompts: int, new_tokens: int | None) -> dict:
    record = {"reference": reference, "prompts": prompts, "tasks": {d.task: d.as_dict() for d in report}}
    if new_tokens is not None:
        record["new_tokens"] = new_tokens
    return record


def table(report: list[TaskDrift], what: str = "top-1 agreement") -> list[list[str]]:
    """Rows for a printed table: task, agreement, max |Δlogits|, positions."""
    return [["task", what, "max |Δlogits|", "positions"]] + [
        [d.task, f"{d.agreement:.3f}", f"{d.max_abs_diff:.3g}", str(d.positions)] for d in report]
