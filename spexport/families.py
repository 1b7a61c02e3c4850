"""Model families described as data: model types, what each family's artifacts can do, and how a
config reads. `spexport.export` and `spexport.runtime` each map a family's name to its exporter and
its served class; nothing else branches on the family.
"""

from __future__ import annotations

from dataclasses import dataclass

from spexport.artifact.manifest import ModelInfo
from spexport.errors import ModelError, OptionError

NO_POSITION_LIMIT = (1 << 31) - 1  # relative positions (T5) or ALiBi (BLOOM): any length fits


@dataclass(frozen=True)
class Family:
    name: str
    model_types: frozenset[str]  # each verified against PEFT in tests/
    task_types: tuple[str, ...]  # PEFT task_type of the adapters its artifacts take
    bake: bool = False  # --bake: the prompt bank as graph constants, picked by task_ids
    quantize: tuple[str, ...] = ()  # --quantize values
    dtypes: tuple[str, ...] = ("float32",)  # --dtype values
    # onnxruntime.transformers' optimizer model type whose fusions match these graphs; None: no fusions
    fusion_type: str | None = None
    positions_after_pad: frozenset[str] = frozenset()  # model types counting positions from pad_token_id + 1

    def check(self, bake: bool, quantize: str | None, dtype: str) -> None:
        """Refuse an option this family's artifacts cannot have, before anything is loaded."""
        if bake and not self.bake:
            raise OptionError(f"--bake is not available for {self.name} artifacts, which keep their prompts in "
                              "prompts.safetensors; leave out --bake")
        if quantize is not None and quantize not in self.quantize:
            offered = f"use one of {', '.join(self.quantize)}" if self.quantize else "export them in float32"
            raise OptionError(f"quantize={quantize!r} is not supported for {self.name} artifacts; {offered}")
        if dtype not in self.dtypes:
            raise OptionError(f"dtype={dtype!r} is not supported for {self.name} artifacts; use one of "
                              f"{', '.join(self.dtypes)}")
        if quantize is not None and dtype != "float32":
            raise OptionError(f"{quantize} quantization starts from float32 weights; leave dtype at float32")


# onnxruntime.transformers' optimizer has no llama type. Its gpt2 fusions are written for decoders
# in general (layer norms, RMS norms, skip connections, GELU) and match these.
DECODER = Family("decoder", frozenset({"gpt2", "llama", "qwen2", "mistral", "bloom", "opt", "gpt_neox", "phi3",
                                       "gemma", "gemma2", "qwen3", "granite", "olmo2"}), ("CAUSAL_LM",),
                 bake=True, quantize=("int8", "int4", "int4-exact"), dtypes=("float32", "float16"), fusion_type="gpt2")
# SEQ_CLS / TOKEN_CLS classifiers whose transformers class takes inputs_embeds (export/encoder).
ENCODER = Family("encoder", frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta-v2"}),
                 ("SEQ_CLS", "TOKEN_CLS"), quantize=("int8", "int4"),
                 positions_after_pad=frozenset({"roberta", "xlm-roberta"}))
# SEQ_2_SEQ_LM encoder-decoder models (export/seq2seq describes each model type's layout). They stay float32:
# no real encoder-decoder checkpoint is at hand to measure a quantized one's drift on, and T5's activations
# are known to outgrow 8-bit ranges, so --quantize is refused rather than shipped unmeasured.
SEQ2SEQ = Family("seq2seq", frozenset({"t5", "mt5", "bart", "mbart"}), ("SEQ_2_SEQ_LM",))
FAMILIES = [DECODER, ENCODER, SEQ2SEQ]


def family_for(model_type: str) -> Family:
    """The family that exports `model_type`; any other gets a one-line error naming the supported ones."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise ModelError(f"model type {model_type!r} is not supported; spexport exports {supported}")


def model_info(config, generation_config) -> ModelInfo:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = config.eos_token_id if eos is None else eos
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = getattr(generation_config, "pad_token_id", None)
    pad = getattr(config, "pad_token_id", None) if pad is None else pad
    return ModelInfo(
        model_type=config.model_type,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or NO_POSITION_LIMIT,
        eos_token_ids=eos,
        pad_token_id=pad,
        sliding_window=getattr(config, "sliding_window", None) or None,
    )
