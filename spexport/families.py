"""Model families described as data: model types, what each family's artifacts can do, its exporter and its
served class, and how a config reads. This is the one seam: code elsewhere asks a `Family` record what it can
do (`generates`, `takes_added_tasks`, ...) and never compares a family's name (tests/test_layout.py checks).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from spexport.artifact.manifest import ModelInfo
from spexport.errors import ArtifactError, ModelError, OptionError

NO_POSITION_LIMIT = (1 << 31) - 1  # relative positions (T5) or ALiBi (BLOOM): any length fits


def _attribute(reference: str):
    """`module:name`, imported when first used: the exporters need torch, and the runtime and the exporters
    both import this module, so the record names them instead of importing them."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Family:
    name: str  # as the manifest's "family" field records it
    display_name: str  # how messages name the family's artifacts, e.g. "decoder-only"
    model_types: frozenset[str]  # each verified against PEFT in tests/
    task_types: tuple[str, ...]  # PEFT task_type of the adapters its artifacts take
    exporter_ref: str  # `module:function` of convert(model_dir, adapters, output, options) -> Manifest
    runtime_ref: str  # `module:class` of the ServedArtifact subclass that serves its artifacts
    generates: bool = False  # generate, generate_text, stream, chat; the server's completions routes
    classifies: bool = False  # classify; the server's /v1/classify
    takes_added_tasks: bool = False  # spexport add / remove on an unbaked artifact, without torch
    why_tasks_are_fixed: str = ""  # when it takes none: the reason, for the one-line refusal
    embeddings_in_bank: bool = False  # its bank stores a prompt's embeddings as they are (no KV prefix computed)
    adapter_files: bool = False  # each unbaked task also as adapters/TASK.onnx_adapter, for native clients
    bake: bool = False  # --bake: the prompt bank as graph constants, picked by task_ids
    quantize: tuple[str, ...] = ()  # --quantize values
    dtypes: tuple[str, ...] = ("float32",)  # --dtype values
    writes_directly: bool = False  # --writer direct / trace: some of its graphs are written without the tracer
    # onnxruntime.transformers' optimizer model type whose fusions match these graphs; None: no fusions
    fusion_type: str | None = None
    positions_after_pad: frozenset[str] = frozenset()  # model types counting positions from pad_token_id + 1

    @property
    def exporter(self):
        """The family's `convert(model_dir, adapters, output, options)` (imports torch)."""
        return _attribute(self.exporter_ref)

    @property
    def runtime(self) -> type:
        """The `ServedArtifact` subclass that serves the family's artifacts."""
        return _attribute(self.runtime_ref)

    def check(self, bake: bool, quantize: str | None, dtype: str, writer: str = "auto") -> None:
        """Refuse an option this family's artifacts cannot have, before anything is loaded."""
        if writer != "auto" and not self.writes_directly:
            raise OptionError(f"--writer is for decoder-only models; {self.name} graphs are always traced, so "
                              "leave --writer out")
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
DECODER = Family("decoder", "decoder-only",
                 frozenset({"gpt2", "llama", "qwen2", "mistral", "bloom", "opt", "gpt_neox", "phi3", "gemma", "gemma2",
                            "qwen3", "granite", "olmo2"}), ("CAUSAL_LM",),
                 "spexport.export.decoder:convert", "spexport.runtime.decoder:DecoderModel",
                 generates=True, takes_added_tasks=True, adapter_files=True,
                 bake=True, quantize=("int8", "int4", "int4-exact"), dtypes=("float32", "float16"),
                 writes_directly=True, fusion_type="gpt2")
# SEQ_CLS / TOKEN_CLS classifiers whose transformers class takes inputs_embeds (export/encoder).
ENCODER = Family("encoder", "encoder", frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra",
                                                  "deberta-v2"}), ("SEQ_CLS", "TOKEN_CLS"),
                 "spexport.export.encoder:convert", "spexport.runtime.encoder:EncoderModel",
                 classifies=True, embeddings_in_bank=True, quantize=("int8", "int4"),
                 why_tasks_are_fixed="an encoder artifact's tasks carry head graphs that only `spexport convert` "
                                     "builds",
                 positions_after_pad=frozenset({"roberta", "xlm-roberta"}))
# SEQ_2_SEQ_LM encoder-decoder models (export/seq2seq describes each model type's layout). They stay float32:
# no real encoder-decoder checkpoint is at hand to measure a quantized one's drift on, and T5's activations
# are known to outgrow 8-bit ranges, so --quantize is refused rather than shipped unmeasured.
SEQ2SEQ = Family("seq2seq", "encoder-decoder", frozenset({"t5", "mt5", "bart", "mbart"}), ("SEQ_2_SEQ_LM",),
                 "spexport.export.seq2seq:convert", "spexport.runtime.seq2seq:Seq2SeqModel",
                 generates=True, takes_added_tasks=True, embeddings_in_bank=True)
FAMILIES = [DECODER, ENCODER, SEQ2SEQ]


def family_named(name: object, where: object = "this artifact") -> Family:
    """The family a manifest's "family" field names; any other is an ArtifactError naming `where`."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ArtifactError(f"{where}: family {name!r} is not served by this spexport; it serves "
                        f"{', '.join(f.name for f in FAMILIES)}")


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


def default_dtype(model_dir: Path, device: str, quantize: str | None) -> str:
    """`convert`'s --dtype when none is given: float16 for a GPU ("cuda") where the model's family exports it (a
    decode step reads half the bytes), else float32 (quantized weights start from it). A config that cannot be
    read is left for `convert` to report."""
    if device != "cuda" or quantize is not None:
        return "float32"
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return "float32"
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    return "float16" if family is not None and "float16" in family.dtypes else "float32"
