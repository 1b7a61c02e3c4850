"""A trained chat model: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, byte-level BPE, a ChatML
template), with prompt tuning initialised from text, P-tuning and prefix tuning, against PeftModel and
transformers' tokenizer.

Logits are compared relative to their scale: a trained model's logits reach ~40, and through 30 layers
float32 rounding moves them by 1e-4 to 6e-4 (up to 1.7e-5 of max|logits|), most of it torch's own: PEFT's
float32 forward is further from a float64 forward than the artifact is.
"""

import numpy as np
import pytest
from builders import build_chat_adapters
from parity import assert_chat_is_transformers, chat_ids, peft_generate, peft_logits, peft_model
from transformers import AutoTokenizer

from spexport.export import convert
from spexport.runtime import load

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]

RELATIVE_BOUND = 1e-4  # max|Δlogits| <= RELATIVE_BOUND * max|logits|
GREEDY_TOKENS = 32
# answers that run past GREEDY_TOKENS for every adapter (checked below, so a change shows)
LONG_CHATS = [[{"role": "user", "content": "Write a short poem about the sea."}],
              [{"role": "system", "content": "You are a storyteller."},
               {"role": "user", "content": "Tell me a story about a robot who learns to paint."}]]
CHATS = LONG_CHATS + [[{"role": "user", "content": "What is the capital of France?"}],
                      [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                       {"role": "user", "content": "Translate 'thank you' into Japanese: ありがとう?"}]]


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    adapters = build_chat_adapters(smollm2, root)
    convert(smollm2, list(adapters.items()), root / "artifact")
    return {"model": smollm2, "adapters": adapters, "runtime": load(root / "artifact"),
            "tokenizer": AutoTokenizer.from_pretrained(smollm2)}


@pytest.fixture(scope="module")
def pefts(smol):
    return {name: peft_model(smol["model"], path) for name, path in smol["adapters"].items()}


def _chat_ids(smol, chat) -> np.ndarray:
    return np.array([chat_ids(smol["tokenizer"], chat, add_generation_prompt=True)])


def test_chat_ids_and_text_are_transformers(smol):
    runtime, tokenizer = smol["runtime"], smol["tokenizer"]
    assert_chat_is_transformers(runtime, tokenizer, CHATS)
    text = "The capital of France is Paris. ありがとう 🎉"
    assert runtime.tokenizer.encode(text).ids == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("task", ["pt-text", "p-tuning", "prefix"])
def test_logits_match_peft_relative_to_their_scale(smol, pefts, task):
    for chat in CHATS:
        ids = _chat_ids(smol, chat)
        want = peft_logits(pefts[task], ids)
        got = smol["runtime"].logits(ids, task=task)
        scale = float(np.abs(want).max())
        assert scale > 10  # a trained model's logits: the bound below is relative to them
        assert float(np.abs(got - want).max()) <= RELATIVE_BOUND * scale


@pytest.mark.parametrize("task", ["pt-text", "p-tuning", "prefix"])
def test_chat_replies_are_peft_greedy_tokens(smol, pefts, task):
    """32+ greedy tokens identical to PEFT's (greedy over its forward: parity.peft_generate), and chat's text is
    transformers' decode of them."""
    for chat in LONG_CHATS:
        ids = _chat_ids(smol, chat)
        want = peft_generate(pefts[task], ids, GREEDY_TOKENS)
        assert want.shape[1] - ids.shape[1] == GREEDY_TOKENS  # no early EOS: every token is compared
        np.testing.assert_array_equal(smol["runtime"].generate(ids, task=task, max_new_tokens=GREEDY_TOKENS), want)
    reply = smol["runtime"].chat(chat, task=task, max_new_tokens=GREEDY_TOKENS)
    assert reply == smol["tokenizer"].decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_mixed_task_batch_of_different_lengths_equals_each_row_alone(smol):
    runtime = smol["runtime"]
    tasks = ["pt-text", "p-tuning", "prefix", "pt-text"]
    together = runtime.chat(CHATS, task=tasks, max_new_tokens=16)
    assert together == [runtime.chat(chat, task=task, max_new_tokens=16) for chat, task in zip(CHATS, tasks)]
    assert len({len(runtime.apply_chat_template(chat)) for chat in CHATS}) == len(CHATS)
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
    together = runtime.generate_text(texts, task=["prefix", "p-tuning"], max_new_tokens=12)
    assert together == [runtime.generate_text(t, task=task, max_new_tokens=12)[0]
                        for t, task in zip(texts, ["prefix", "p-tuning"])]


def test_stream_pieces_join_to_the_reply_and_stop_at_a_stop_string(smol):
    runtime, chat = smol["runtime"], LONG_CHATS[0]
    reply = runtime.chat(chat, task="prefix", max_new_tokens=GREEDY_TOKENS)
    pieces = list(runtime.stream(chat, task="prefix", max_new_tokens=GREEDY_TOKENS))
    assert "".join(pieces) == reply and len(pieces) > 10
    assert "\n" in reply  # a poem: the first line ends before GREEDY_TOKENS
    first_line = reply[:reply.index("\n")]
    assert runtime.chat(chat, task="prefix", max_new_tokens=GREEDY_TOKENS, stop=["\n", "zzz"]) == first_line
    assert "".join(runtime.stream(chat, task="prefix", max_new_tokens=GREEDY_TOKENS, stop="\n")) == first_line


def test_repetition_penalty_is_transformers(smol, pefts):
    ids = _chat_ids(smol, LONG_CHATS[0])
    want = peft_generate(pefts["pt-text"], ids, 16, repetition_penalty=1.3)
    got = smol["runtime"].generate(ids, task="pt-text", max_new_tokens=16, repetition_penalty=1.3)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, smol["runtime"].generate(ids, task="pt-text", max_new_tokens=16))
