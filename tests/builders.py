"""Tiny random models, tokenizers and adapters, built locally with fixed seeds (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 160
PAD, UNK, BOS, EOS = 0, 1, 2, 3
# EOS is an id the random models rarely pick, so 12+ tokens get generated; tests of stopping set it.
CORPUS = ["the cat sat on the mat", "a dog ran in the park", "red green blue yellow",
          "one two three four five six", "spexport runs soft prompts on onnx runtime"] * 20


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def save_tokenizer(folder: Path) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(folder)


LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                  pad_token_id=PAD)
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None)),
}


def build_model(family: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    FAMILIES[family]().save_pretrained(folder)
    save_tokenizer(folder)
    return folder


METHODS = {
    "prompt_tuning": lambda n: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n),
    "p_tuning_mlp": lambda n: PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                                  encoder_hidden_size=32),
    "p_tuning_lstm": lambda n: PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, encoder_hidden_size=32,
        encoder_reparameterization_type=PromptEncoderReparameterizationType.LSTM),
    "prefix_tuning": lambda n: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n),
    "prefix_projection": lambda n: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                                      prefix_projection=True, encoder_hidden_size=32),
}


# MPT holds several tasks in one adapter, so it is tested on its own (tests/test_multitask.py).
MULTITASK = {"multitask": lambda n: MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                                                num_tasks=3, num_ranks=2)}


def build_adapter(model_dir: Path, method: str, folder: Path, num_virtual_tokens: int = 5, seed: int = 1) -> Path:
    """A PEFT adapter with random (not zero) prompt weights, saved as PEFT saves it."""
    return save_adapter(model_dir, {**METHODS, **MULTITASK}[method](num_virtual_tokens), folder, seed)


def save_adapter(model_dir: Path, config, folder: Path, seed: int, auto_class=AutoModelForCausalLM) -> Path:
    """`config`'s PEFT adapter on the model, with random (not zero) prompt weights, saved as PEFT saves it."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(auto_class.from_pretrained(model_dir), config)
    for param in peft_model.prompt_encoder.parameters():
        torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(folder)
    return folder
