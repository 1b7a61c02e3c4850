"""A real BERT: all-MiniLM-L6-v2 (6 layers, WordPiece) with its own tokenizer.json, which pads every text to
128 tokens and truncates there. A P-tuning v2 (prefix tuning) sentiment adapter trained briefly on it must
classify real text, and sentence pairs, as the PEFT model in transformers' pipeline does."""

import json

import numpy as np
import pytest
import torch
from parity import skip_unless_peft_runs
from peft import PrefixTuningConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from spexport.errors import InputError
from spexport.export import convert
from spexport.runtime import load

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]

N_VIRTUAL = 10
TRAIN = [("I loved every minute of this film.", 1), ("The service was slow and the food was cold.", 0),
         ("What a wonderful, heartfelt story.", 1), ("This is the worst purchase I have ever made.", 0),
         ("The hotel staff were friendly and helpful.", 1), ("The plot made no sense and the acting was wooden.", 0),
         ("Great value for the price, highly recommended.", 1), ("It broke after two days; a waste of money.", 0)]
TEXTS = ["The battery life of this phone is wonderful.", "I would not recommend this restaurant to anyone.",
         "An okay film, though a little long.", "Ünïcödé, emoji 🎉 and  extra   spaces\tdo not matter."]
PAIRS = [("The cat sat on the mat.", "A cat was sitting on a mat."),
         ("Is it going to rain today?", "The forecast says sunshine all week, with warm afternoons.")]


@pytest.fixture(scope="module")
def bert(minilm, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    labels = {0: "negative", 1: "positive"}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2, id2label=labels,
                                                              label2id={v: k for k, v in labels.items()})
    peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=N_VIRTUAL))
    batch = tokenizer([text for text, _ in TRAIN], padding=True, return_tensors="pt")
    skip_unless_peft_runs(peft, tokenizer(TRAIN[0][0], return_tensors="pt"))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft.train()
    for _ in range(30):
        loss = peft(**batch, labels=torch.tensor([label for _, label in TRAIN])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft.eval()
    peft.save_pretrained(root / "sentiment")
    base.config.save_pretrained(root / "sentiment")  # the label names travel with the adapter
    convert(minilm, [("sentiment", root / "sentiment")], root / "artifact")
    return {"peft": peft, "tokenizer": tokenizer, "runtime": load(root / "artifact"), "folder": minilm,
            "pipeline": pipeline("text-classification", model=peft, tokenizer=tokenizer)}


def _assert_same(ours: list[dict], theirs: list[dict]) -> None:
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert max(abs(o["score"] - t["score"]) for o, t in zip(ours, theirs)) <= 1e-5


def test_classify_is_peft_whatever_the_tokenizer_pads_to(bert):
    """tokenizer.json pads to 128: the artifact's own tokenizer must not attend to that padding."""
    padding = json.loads((bert["folder"] / "tokenizer.json").read_text())["padding"]
    assert padding["strategy"] == {"Fixed": 128}
    runtime = bert["runtime"]
    theirs = bert["pipeline"](TEXTS)
    assert max(t["score"] for t in theirs) > 0.75  # trained: scores far from a coin toss, so a fault shows
    _assert_same(runtime.classify(TEXTS, task="sentiment"), theirs)
    _assert_same([runtime.classify(text, task="sentiment")[0] for text in TEXTS], theirs)
    assert runtime.tokenizer.padding is None and runtime.tokenizer.truncation is None


def test_sentence_pairs_are_encoded_with_token_types(bert):
    runtime, tokenizer = bert["runtime"], bert["tokenizer"]
    first, second = zip(*PAIRS)
    encoded = tokenizer(list(first), list(second), padding=True, return_tensors="pt")
    assert encoded["token_type_ids"].any()
    with torch.no_grad():
        want = bert["peft"](**encoded).logits.numpy()
    got = runtime.logits(encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), task="sentiment",
                         token_type_ids=encoded["token_type_ids"].numpy())
    assert float(np.abs(got - want).max()) <= 1e-5
    theirs = bert["pipeline"]([{"text": a, "text_pair": b} for a, b in PAIRS])
    _assert_same(runtime.classify(PAIRS, task="sentiment"), theirs)
    _assert_same(runtime.classify([{"text": a, "text_pair": b} for a, b in PAIRS], task="sentiment"), theirs)
    without_types = runtime.logits(encoded["input_ids"].numpy(), encoded["attention_mask"].numpy(), task="sentiment")
    assert float(np.abs(without_types - want).max()) > 1e-4  # the types matter, so the test above means something


def test_too_long_text_is_refused_or_truncated_as_asked(bert):
    runtime, tokenizer = bert["runtime"], bert["tokenizer"]
    text = "The battery life of this phone is wonderful, and the screen is bright. " * 60
    with pytest.raises(InputError, match=r"text 0 is \d+ tokens, .*pass truncation=True"):
        runtime.classify(text, task="sentiment")
    budget = 512 - N_VIRTUAL
    encoded = tokenizer(text, truncation=True, max_length=budget, return_tensors="pt")
    with torch.no_grad():
        want = bert["peft"](**encoded).logits.numpy()
    got = runtime.logits(encoded["input_ids"].numpy(), task="sentiment")
    assert float(np.abs(got - want).max()) <= 1e-5
    ours = runtime.classify(text, task="sentiment", truncation=True)[0]
    probabilities = np.exp(want[0]) / np.exp(want[0]).sum()
    assert ours["label"] == ["negative", "positive"][int(want.argmax())]
    assert abs(ours["score"] - probabilities.max()) <= 1e-5
