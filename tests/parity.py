"""PEFT in PyTorch is the definition of correct: helpers comparing it with an artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM

from spexport.validate import peft_greedy


def peft_model(model_dir: Path, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()


def peft_logits(model: PeftModel, input_ids: np.ndarray) -> np.ndarray:
    """Logits of the caller's tokens (PEFT's prompt tuning also returns the virtual positions)."""
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(input_ids)).logits.numpy()
    return logits[:, -input_ids.shape[1]:]


def peft_generate(model: PeftModel, input_ids: np.ndarray, max_new_tokens: int, eos_token_ids=None,
                  pad_token_id=None, repetition_penalty: float | None = None, **forward) -> np.ndarray:
    """Greedy tokens over PEFT's forward, stopping at the model's EOS unless told other ids, with
    transformers' own repetition penalty if given, as PeftModel.generate would (spexport.validate.peft_greedy
    says why it is not used)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    config = model.get_base_model().generation_config
    if eos_token_ids is None:
        eos = config.eos_token_id
        eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        pad_token_id = config.pad_token_id
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty is not None else None
    return peft_greedy(model, input_ids, max_new_tokens, eos_token_ids, pad_token_id, penalty, **forward)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def assert_chat_is_transformers(runtime, tokenizer, chats: list[list[dict]]) -> None:
    """The artifact renders and encodes each conversation as transformers' tokenizer.apply_chat_template does,
    with and without the generation prompt, as ids and as text, one at a time and as a batch."""
    for chat in chats:
        for prompt in (True, False):
            assert runtime.apply_chat_template(chat, add_generation_prompt=prompt) == \
                chat_ids(tokenizer, chat, add_generation_prompt=prompt)
            assert runtime.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == \
                tokenizer.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
    assert runtime.apply_chat_template(chats) == [chat_ids(tokenizer, c, add_generation_prompt=True) for c in chats]


# PEFT's known refusals on transformers 5, by message: BERT-family encoders there take no past key values, so
# PEFT cannot run prefix tuning (P-tuning v2) on them. Anything else PEFT raises fails the test.
KNOWN_PEFT_REFUSALS = {5: ("Model does not support past key values which are required for prefix tuning",)}


def skip_unless_peft_runs(peft: PeftModel, inputs) -> None:
    """Skip a test that trains with PEFT where PEFT refuses the adapter with one of its known refusals on this
    transformers major version (prefix tuning of an encoder classifier under transformers 5); the transformers 4
    stack runs it (docs/install.md). Any other error fails the test."""
    try:
        with torch.no_grad():
            peft(**inputs)
    except ValueError as e:
        major = int(transformers.__version__.split(".")[0])
        if any(message in str(e) for message in KNOWN_PEFT_REFUSALS.get(major, ())):
            pytest.skip(f"PEFT on transformers {major} refuses this adapter ({e})")
        raise


def chat_ids(tokenizer, chat: list[dict], **options) -> list[int]:
    """transformers' token ids for a conversation (transformers 5 returns a dict unless told not to)."""
    return tokenizer.apply_chat_template(chat, return_dict=False, **options)
