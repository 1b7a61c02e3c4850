"""`spexport validate`: an artifact against PEFT on the same inputs, like optimum's export-time check.

PEFT in PyTorch is the definition of correct. For every task that an adapter gave the artifact,
both run a few fixed rows of random token ids (seeded, so a failure can be reproduced): the
logits must agree within `atol` and greedy generation must pick the same tokens.

Needs the `[export]` extra (torch, transformers, peft).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spexport.artifact.manifest import Manifest, ModelInfo
from spexport.converters import read_peft_adapter
from spexport.errors import AdapterError, InputError, ModelError
from spexport.export import drift
from spexport.export.common import parse_adapters, quiet_tracing, read_model_type
from spexport.export.decoder import load_model
from spexport.families import DECODER, family_for, family_named
from spexport.runtime import load
from spexport.runtime.inputs import is_whole

MULTITASK = "MULTITASK_PROMPT_TUNING"
MIN_AGREEMENT = 0.9  # a quantized task passes validate at this teacher-forced top-1 agreement with PEFT


@dataclass
class TaskCheck:
    """How one task of the artifact compares with PEFT."""

    task: str
    max_abs_diff: float  # largest |artifact logit - PEFT logit| over every row and position
    greedy_agreement: float  # fraction of generated tokens that are the same in both
    passed: bool
    # quantized artifacts: the drift report's terms against PEFT, and what convert recorded against float32
    agreement: float | None = None
    recorded_agreement: float | None = None


def validate_quantized(runtime, model_dir: str | Path, adapters: list[tuple[str, Path]], min_agreement: float,
                       trust_remote_code: bool = False) -> list[TaskCheck]:
    """A quantized artifact against PEFT in float32, in its drift report's terms (export/drift.py): on the
    same fixed prompts, PEFT writes its greedy continuation and the artifact's top-1 token is compared
    with PEFT's at every position of it. A task passes at `min_agreement`; max |Δlogits| is reported."""
    recorded = (runtime.manifest.quantization.get("drift") or {}).get("tasks", {})
    info = runtime.info
    rows = drift.prompt_rows(drift.TextEncoder(Path(model_dir)), info, runtime.manifest.tasks, drift.NEW_TOKENS)
    checks = []
    for name, folder in parse_adapters(adapters):
        tasks = _artifact_tasks(name, Path(folder), runtime.tasks)
        reference = _peft_model(Path(model_dir), Path(folder), trust_remote_code)
        for task, task_id in tasks:
            peft = _PeftReference(reference, task_id, info)
            (found,) = drift.decoder_drift(peft, drift.Served(runtime), [task], rows, info.eos_token_ids)
            checks.append(TaskCheck(task, found.max_abs_diff, found.agreement, found.agreement >= min_agreement,
                                    found.agreement, recorded.get(task, {}).get("agreement")))
    return checks


class _PeftReference:
    """PEFT as export/drift.py's reference: one row at a time, its own greedy continuation (over its
    forward, as peft_greedy decodes)."""

    def __init__(self, model, task_id: int | None, info: ModelInfo):
        self.model, self.info = model, info
        self.extra = {} if task_id is None else {"task_ids": np.array([task_id])}

    def _forward(self) -> dict:
        import torch

        return {name: torch.from_numpy(value) for name, value in self.extra.items()}

    def continuation(self, ids: np.ndarray, task: str, new_tokens: int) -> np.ndarray:
        with quiet_tracing():
            tokens = peft_greedy(self.model, ids[None], new_tokens, self.info.eos_token_ids, self.info.pad_token_id,
                                 **self._forward())
        return tokens[0, len(ids):]

    def logits(self, ids: np.ndarray, task: str) -> np.ndarray:
        import torch

        with torch.no_grad(), quiet_tracing():
            return self.model(input_ids=torch.from_numpy(ids[None]), **self._forward()).logits[0, -len(ids):].numpy()


def sample_ids(vocab_size: int, rows: int = 3, length: int = 8, seed: int = 0) -> np.ndarray:
    """Fixed random token rows [rows, length]: the same for every task and every run with this seed."""
    return np.random.default_rng(seed).integers(0, vocab_size, (rows, length), dtype=np.int64)


def validate(artifact: str | Path, model_dir: str | Path, adapters: list[tuple[str, Path]], atol: float = 1e-4,
             new_tokens: int = 12, rows: int = 3, length: int = 8, seed: int = 0,
             trust_remote_code: bool = False, min_agreement: float = MIN_AGREEMENT) -> list[TaskCheck]:
    """Compare every task that `adapters` (NAME, PEFT adapter folder) gave `artifact` with PEFT.

    A multitask adapter NAME is checked as its tasks NAME/0, NAME/1, ... against PEFT with
    task_ids=[i]. A task passes when max |Δlogits| <= atol and every greedy token agrees.
    A quantized artifact is compared in the terms of its drift report instead (validate_quantized).
    trust_remote_code: run Python code that the model folder ships, as `convert` does.
    """
    if not is_whole(new_tokens) or new_tokens < 0:
        raise InputError(f"new_tokens must be a whole number >= 0, got {new_tokens!r}")
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not 0 <= atol < float("inf"):
        raise InputError(f"atol must be a number >= 0, got {atol!r}")
    family = family_named(Manifest.read(Path(artifact)).family, artifact)
    if family is not DECODER:
        raise InputError(f"{artifact}: a {family.name} artifact; spexport validate compares "
                         f"{DECODER.display_name} artifacts with PEFT (the test suite compares the others)")
    runtime = load(artifact)
    if runtime.manifest.quantization is not None:
        return validate_quantized(runtime, model_dir, adapters, min_agreement, trust_remote_code)
    ids = sample_ids(runtime.info.vocab_size, rows, length, seed)
    checks = []
    # every adapter is checked against the artifact before PEFT loads the model for the first
    planned = [(folder, _artifact_tasks(name, Path(folder), runtime.tasks))
               for name, folder in parse_adapters(adapters)]
    for folder, tasks in planned:
        reference = _peft_model(Path(model_dir), Path(folder), trust_remote_code)
        for task, task_id in tasks:
            expected_logits, expected_tokens = _peft_outputs(reference, ids, task_id, new_tokens, runtime.info)
            logits = runtime.logits(ids, task=task)
            tokens = runtime.generate(ids, task=task, max_new_tokens=new_tokens)
            diff = float(np.abs(logits - expected_logits).max())
            agreement = _agreement(tokens[:, length:], expected_tokens[:, length:])
            checks.append(TaskCheck(task, diff, agreement, bool(diff <= atol and agreement == 1.0)))
    return checks


def _artifact_tasks(name: str, folder: Path, tasks: list[str]) -> list[tuple[str, int | None]]:
    """(artifact task, PEFT task id) pairs for one adapter; the task id is None unless multitask."""
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(f"{folder}: validate compares with PEFT and needs a PEFT adapter folder "
                           "(with adapter_config.json)")
    config, _ = read_peft_adapter(folder)
    if config.get("peft_type") == MULTITASK:
        count = config.get("num_tasks")
        if not is_whole(count) or count < 1:
            raise AdapterError(f"{folder}: adapter_config.json: num_tasks must be a whole number > 0, got {count!r}")
        wanted = [(f"{name}/{i}", i) for i in range(count)]
    else:
        wanted = [(name, None)]
    for task, _ in wanted:
        if task not in tasks:
            raise InputError(f"the artifact has no task {task!r} (it has: {', '.join(tasks)}); "
                             f"pass the NAME it was converted with")
    return wanted


def _peft_model(model_dir: Path, folder: Path, trust_remote_code: bool):
    from peft import PeftModel

    model_type, _ = read_model_type(model_dir)
    try:
        family = family_for(model_type)
    except ModelError as e:
        raise ModelError(f"{model_dir}: {e}") from None
    if family is not DECODER:
        raise ModelError(f"{model_dir}: a {family.display_name} model; validate compares {DECODER.display_name} "
                         "models with PEFT")
    base = load_model(model_dir, trust_remote_code)
    try:
        with quiet_tracing():
            return PeftModel.from_pretrained(base, folder, is_trainable=False).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{folder}: PEFT cannot load it onto {model_dir} ({str(e).strip().splitlines()[0]})") \
            from None


def _peft_outputs(model, ids: np.ndarray, task_id: int | None, new_tokens: int,
                  info: ModelInfo) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's logits for the caller's tokens (prompt tuning also returns the virtual positions)
    and its greedy continuation, stopping at the model's EOS as the artifact does."""
    import torch

    extra = {} if task_id is None else {"task_ids": torch.full((len(ids),), task_id)}
    with torch.no_grad(), quiet_tracing():
        logits = model(input_ids=torch.from_numpy(ids), **extra).logits[:, -ids.shape[1]:].numpy()
        tokens = peft_greedy(model, ids, new_tokens, info.eos_token_ids, info.pad_token_id, **extra)
    return logits, tokens


def peft_greedy(model, input_ids: np.ndarray, new_tokens: int, eos_token_ids=(), pad_token_id: int | None = None,
                logits_processor=None, **forward) -> np.ndarray:
    """Greedy decoding over a PeftModel's forward, as transformers' generate decodes: input followed by
    new tokens; a row stops at EOS and holds the pad token (else the first EOS) after it.
    logits_processor: applied to each step's scores as generate applies one (sequence, scores) -> scores,
    e.g. transformers' RepetitionPenaltyLogitsProcessor.

    Each step runs the whole sequence through PEFT's forward, which defines the model. PeftModel.generate
    is not the reference: under transformers 5, PEFT 0.21 looks for the cache under its 4.x name
    (past_key_values), so it puts the prompt in front again at every step of prompt tuning and P-tuning.
    """
    import torch

    eos = torch.tensor(list(eos_token_ids), dtype=torch.int64)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    sequence = torch.from_numpy(input_ids)
    finished = torch.zeros(len(sequence), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new_tokens):
            scores = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), **forward).logits[:, -1]
            if logits_processor is not None:
                scores = logits_processor(sequence, scores)
            chosen = torch.where(finished, pad, scores.argmax(-1))
            sequence = torch.cat([sequence, chosen[:, None]], dim=1)
            finished |= torch.isin(chosen, eos)
            if finished.all():
                break
    return sequence.numpy()


def _agreement(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Share of generated slots holding the same token; a slot one side never generated disagrees."""
    width = max(ours.shape[1], theirs.shape[1])
    if width == 0:
        return 1.0
    ours, theirs = (np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=-1) for t in (ours, theirs))
    return float((ours == theirs).mean())
