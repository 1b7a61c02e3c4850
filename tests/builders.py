"""Tiny random models, tokenizers and adapters, built locally with fixed seeds (no downloads), and adapters
for the real checkpoints that tests/checkpoints.py fetches."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import (
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
)

VOCAB = 160
PAD, UNK, BOS, EOS = 0, 1, 2, 3
# EOS's output row is zero (build_model), so its logit is 0 while some of the other 159 random logits
# lie above it: greedy decoding never picks it and every generation runs its full length. Tests of
# stopping name another token as EOS.
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


SPECIAL = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
LLAMA_LIKE = dict(**SPECIAL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)


def _causal_lm(config):
    return lambda: AutoModelForCausalLM.from_config(config())


# Each family's distinguishing feature is switched on, so the export meets it.
FAMILIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None)),
    # ALiBi: no position embedding, positions come from the attention mask
    "bloom": _causal_lm(lambda: BloomConfig(**SPECIAL, hidden_size=64, n_layer=2, n_head=4)),
    # learned positions offset by 2
    "opt": _causal_lm(lambda: OPTConfig(**SPECIAL, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)),
    # Pythia: rotary on a quarter of each head, parallel attention and MLP
    "gpt_neox": _causal_lm(lambda: GPTNeoXConfig(**SPECIAL, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.25)),
    # fused qkv and gate/up projections
    "phi3": _causal_lm(lambda: Phi3Config(**LLAMA_LIKE)),
    # embeddings scaled by sqrt(hidden), head_dim not hidden/heads
    "gemma": _causal_lm(lambda: GemmaConfig(**LLAMA_LIKE, head_dim=24)),
    # logit soft-capping (attention and final), sliding-window layers, query_pre_attn_scalar
    "gemma2": _causal_lm(lambda: Gemma2Config(**LLAMA_LIKE, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
                                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    # q/k RMS norms
    "qwen3": _causal_lm(lambda: Qwen3Config(**LLAMA_LIKE, head_dim=24)),
    # embedding, attention, residual and logit multipliers
    "granite": _causal_lm(lambda: GraniteConfig(**LLAMA_LIKE, embedding_multiplier=2.0, attention_multiplier=0.2,
                                                residual_multiplier=0.5, logits_scaling=4.0)),
    # norms after attention and MLP, q/k norms over all heads
    "olmo2": _causal_lm(lambda: Olmo2Config(**LLAMA_LIKE)),
}


def build_model(family: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] = 0
    model.save_pretrained(folder)
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


# Adapters for a real chat model (tests/test_real_smollm2.py): what training would start from, so the
# replies stay fluent and greedy choices are rarely near ties.
SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant. You answer in full sentences.<|im_end|>\n"


def build_chat_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    """Prompt tuning initialised from text (PromptTuningInit.TEXT), P-tuning (PEFT's own MLP
    initialisation, seeded) and prefix tuning whose prefix is the model's own keys and values for
    SYSTEM_PROMPT, as if that text preceded every request."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    system_ids = tokenizer(SYSTEM_PROMPT, add_special_tokens=False)["input_ids"]
    configs = {
        "pt-text": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=12,
                                      prompt_tuning_init=PromptTuningInit.TEXT, tokenizer_name_or_path=str(model_dir),
                                      prompt_tuning_init_text="Answer the question briefly and politely."),
        "p-tuning": PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8, encoder_hidden_size=128),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=len(system_ids)),
    }
    adapters = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        if name == "prefix":
            with torch.no_grad():
                cache = peft_model.base_model(input_ids=torch.tensor([system_ids]), use_cache=True).past_key_values
                kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
                # [layers, 2, kv_heads, n, head_dim] -> PEFT's [n, layers * 2 * kv_heads * head_dim]
                peft_model.prompt_encoder["default"].embedding.weight.copy_(
                    kv.permute(3, 0, 1, 2, 4).reshape(len(system_ids), -1))
        adapters[name] = root / name
        peft_model.save_pretrained(adapters[name])
    return adapters
