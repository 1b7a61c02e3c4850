"""Text in and out (spexport/runtime/text.py): tokenizer settings that never change a result, truncation,
streaming that never splits a character, stop strings, every EOS id, and the repetition penalty."""

import json
import shutil

import numpy as np
import pytest
from builders import EOS, build_adapter, build_model
from parity import peft_generate, peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from spexport.errors import InputError
from spexport.export import convert
from spexport.runtime import load
from spexport.runtime.text import TextCodec, TextStream

TEXTS = ["the cat sat on the mat", "one two", "red green blue yellow one two three"]


@pytest.fixture(scope="module")
def padded_tokenizer_artifact(tiny_llama, tmp_path_factory):
    """tiny_llama's model with a tokenizer.json that pads every text to 40 tokens and truncates at 4, as
    sentence-transformers' tokenizers do; its artifact must serve exactly what tiny_llama's serves."""
    root = tmp_path_factory.mktemp("padded")
    model = root / "model"
    shutil.copytree(tiny_llama["model"], model)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.enable_padding(length=40, pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(4)
    tokenizer.save(str(model / "tokenizer.json"))
    convert(model, list(tiny_llama["adapters"].items()), root / "artifact")
    return load(root / "artifact")


def test_the_tokenizers_own_padding_and_truncation_change_nothing(tiny_llama, padded_tokenizer_artifact):
    plain = load(tiny_llama["artifact"])
    kwargs = dict(task=["pt", "prefix", "pt"], max_new_tokens=6)
    assert padded_tokenizer_artifact.generate_text(TEXTS, **kwargs) == plain.generate_text(TEXTS, **kwargs)
    hf = AutoTokenizer.from_pretrained(tiny_llama["model"])
    assert [padded_tokenizer_artifact.tokenizer.encode(t).ids for t in TEXTS] == hf(TEXTS)["input_ids"]


def test_too_long_text_is_refused_unless_truncation_is_asked(tiny_llama):
    model = load(tiny_llama["artifact"])
    text = "one two three four five six " * 12  # ~72 tokens; 64 positions less 6 virtual tokens leave 58
    with pytest.raises(InputError, match=r"^text 0 is \d+ tokens, more than the model takes .*\(58\); "
                                         r"shorten it or pass truncation=True$"):
        model.generate_text(text, task="prefix", max_new_tokens=2)
    hf = AutoTokenizer.from_pretrained(tiny_llama["model"])
    ids = np.array(hf(text, truncation=True, max_length=58)["input_ids"])[None]
    expected = model.generate(ids, task="prefix", max_new_tokens=2)[0, ids.shape[1]:]
    assert model.generate_text(text, task="prefix", max_new_tokens=2, truncation=True) == \
        [model.tokenizer.decode(expected.tolist(), skip_special_tokens=True)]


def test_stream_pieces_never_split_a_character(tmp_path):
    """A byte-level tokenizer spreads one character over several tokens: no piece shows half of one."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["plain words and more words"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    codec = TextCodec.load(tmp_path, ["tokenizer.json"])
    text = "née 日本語 🎉👍🏽 words"
    ids = codec.tokenizer.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters took several tokens each
    stream = TextStream(codec, [])
    pieces = [stream.push(token) for token in ids] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)
    stream, pieces = TextStream(codec, ["本語", "🎉"]), []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert "".join(pieces) + stream.finish() == "née 日" and stream.finish() == ""


def test_stop_strings_end_each_row_at_its_first_stop(tiny_llama):
    model = load(tiny_llama["artifact"])
    tasks = ["pt", "prefix", "pt"]
    full = model.generate_text(TEXTS, task=tasks, max_new_tokens=12)
    words = [text.split() for text in full]
    stop = [words[0][2], words[1][1]]  # a word each of rows 0 and 1 produce
    got = model.generate_text(TEXTS, task=tasks, max_new_tokens=12, stop=stop)
    for text, reply in zip(full, got):
        cuts = [text.find(s) for s in stop if s in text]
        assert reply == (text[:min(cuts)] if cuts else text)
    assert got[0] != full[0] and got[1] != full[1]
    assert "".join(model.stream(TEXTS[0], task="pt", max_new_tokens=12, stop=stop)) == got[0]
    assert "".join(model.stream(TEXTS[1], task="prefix", max_new_tokens=12)) == full[1]


@pytest.mark.parametrize("stop", [3, [None], ["ok", b"x"], [""], {"a": 1}])
def test_a_stop_that_is_not_a_string_is_refused(tiny_llama, stop):
    with pytest.raises(InputError, match=r"^stop must be a string or a list of non-empty strings, got"):
        load(tiny_llama["artifact"]).generate_text("the cat", task="pt", stop=stop)


@pytest.mark.parametrize("task", ["pt", "prefix"])
def test_repetition_penalty_is_transformers(tiny_llama, task):
    ids = np.array([[5, 9, 14, 22, 40, 7, 9, 9]], np.int64)
    reference = peft_model(tiny_llama["model"], tiny_llama["adapters"][task])
    model = load(tiny_llama["artifact"])
    for penalty in (1.5, 0.7):
        want = peft_generate(reference, ids, 10, repetition_penalty=penalty)
        np.testing.assert_array_equal(model.generate(ids, task=task, max_new_tokens=10,
                                                     repetition_penalty=penalty), want)
    for penalty in (0, -1.0, "2", float("nan")):
        with pytest.raises(InputError, match="^repetition_penalty must be a number > 0"):
            model.generate(ids, task=task, repetition_penalty=penalty)


def test_every_eos_id_of_generation_config_stops_a_row(tmp_path):
    model_dir = build_model("llama", tmp_path / "model")
    adapter = build_adapter(model_dir, "prompt_tuning", tmp_path / "pt", 5, seed=1)
    convert(model_dir, [("pt", adapter)], tmp_path / "plain")
    ids = np.array([[5, 9, 14, 22, 40, 7]], np.int64)
    free = load(tmp_path / "plain").generate(ids, task="pt", max_new_tokens=10)[0, ids.shape[1]:]
    second_eos = int(free[1])  # the model's second new token becomes an EOS too
    assert EOS not in free[:2] and free[0] != second_eos
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [EOS, second_eos]}))
    convert(model_dir, [("pt", adapter)], tmp_path / "two-eos")
    model = load(tmp_path / "two-eos")
    assert model.info.eos_token_ids == [EOS, second_eos]
    got = model.generate(ids, task="pt", max_new_tokens=10)
    np.testing.assert_array_equal(got[0, ids.shape[1]:], free[:2])
    np.testing.assert_array_equal(got, peft_generate(peft_model(model_dir, adapter), ids, 10))
