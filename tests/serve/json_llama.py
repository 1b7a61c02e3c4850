"""A tiny Llama whose tokenizer can spell JSON (byte-level BPE), for structured output (a fixture module: a
conftest.py here would shadow tests/conftest.py, which other test modules import by name)."""

from __future__ import annotations

import pytest
import torch
from builders import EOS, LLAMA_LIKE, build_adapter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from spexport.export import convert

VOCAB = 300
JSON_CORPUS = ['{"label":"pos","score":3}', '{"label":"neg","score":7,"tags":["a","b"]}', '[1,2,3]', "yes no maybe",
               "the cat sat on the mat", '{"name":"x","ok":true,"v":null}'] * 20


def json_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(JSON_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")


@pytest.fixture(scope="session")
def json_llama(tmp_path_factory):
    """{"artifact": path} of a tiny Llama (vocabulary 300, byte-level) with one prompt-tuning task "pt"."""
    root = tmp_path_factory.mktemp("json-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**LLAMA_LIKE, "vocab_size": VOCAB}))
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] = 0  # greedy never ends by itself: only a grammar ends it
    model.save_pretrained(root / "model")
    json_tokenizer().save_pretrained(root / "model")
    adapter = build_adapter(root / "model", "prompt_tuning", root / "pt", 4, seed=1)
    convert(root / "model", [("pt", adapter)], root / "artifact", optimize=False)
    return {"artifact": root / "artifact", "model": root / "model"}
