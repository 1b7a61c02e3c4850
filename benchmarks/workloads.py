"""The benchmark's models and tasks: random weights at real sizes, built locally (nothing is downloaded).

GPT-2 small (124M) and a Llama-style model (~150M, grouped-query attention, rotary positions).
Tasks are PEFT prompt-tuning adapters saved as PEFT saves them, so PEFT itself can load them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MODELS = {
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    "llama": dict(model_type="llama", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000,
                  tie_word_embeddings=False),
}
# No EOS: random weights would stop rows at different points and every engine would time a different amount of work.
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_model(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised model `name` (HF's own init) to `folder`, once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    spec = dict(MODELS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, **NO_SPECIAL_TOKENS)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def save_tokenizer(folder: Path) -> None:
    """A small BPE tokenizer, so tools that insist on one (onnxruntime-genai's builder) find it.

    The benchmark feeds token ids; the tokenizer's vocabulary is a small subset of the model's. transformers 5
    names its class TokenizersBackend, which the peers' transformers 4 cannot load; PreTrainedTokenizerFast reads
    the same tokenizer.json in both.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))


def build_prompt_adapter(base, model_dir: Path, folder: Path, num_virtual_tokens: int, seed: int) -> Path:
    """A PEFT prompt-tuning adapter with random virtual-token embeddings at the word embeddings' scale."""
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                                base_model_name_or_path=str(model_dir))
    peft_model = get_peft_model(base, config)
    scale = float(base.get_input_embeddings().weight.std())
    for param in peft_model.prompt_encoder.parameters():
        torch.nn.init.normal_(param, std=scale)
    peft_model.save_pretrained(folder)
    return folder


def task_specs(virtual_token_sweep: list[int]) -> list[tuple[str, int]]:
    """8 tasks of 32 virtual tokens (mixed batches), then one task per length of the sweep."""
    return [(f"t32_{i}", 32) for i in range(8)] + [(f"vt{n}", n) for n in virtual_token_sweep]


def build_adapters(model_dir: Path, root: Path, specs: list[tuple[str, int]]) -> list[tuple[str, Path]]:
    from transformers import AutoModelForCausalLM

    missing = [(name, n) for name, n in specs if not (root / name / "adapter_config.json").is_file()]
    if missing:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        for i, (name, n) in enumerate(missing):
            build_prompt_adapter(base, model_dir, root / name, n, seed=1000 + i)
            base = AutoModelForCausalLM.from_pretrained(model_dir) if i + 1 < len(missing) else None
    return [(name, root / name) for name, _ in specs]


def raw_prompts(root: Path, count: int, num_virtual_tokens: int, hidden: int, scale: float = 0.02) -> list:
    """`count` bare [n, hidden] prompt tensors (.npy): the cheap way to fill a bank of 100 tasks."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = root / f"p{i}.npy"
        if not path.is_file():
            np.save(path, (rng.standard_normal((num_virtual_tokens, hidden)) * scale).astype(np.float32))
        paths.append((f"p{i}", path))
    return paths


def weight_bytes_per_step(model_dir: Path) -> int:
    """Bytes of weights a decode step reads: every parameter except the embedding rows not looked up.

    GPT-2 ties its output projection to the token embeddings, so that matrix is read once per step
    (by the LM head); position embeddings and an untied input embedding contribute one row each.
    """
    from safetensors import safe_open

    total = 0
    with safe_open(model_dir / "model.safetensors", "np") as f:
        keys = list(f.keys())
        untied = any(key.endswith("lm_head.weight") for key in keys)
        for key in keys:
            shape = f.get_slice(key).get_shape()
            looked_up = key.endswith("wpe.weight") or (untied and key.endswith(("wte.weight", "embed_tokens.weight")))
            total += 4 * (shape[-1] if looked_up else int(np.prod(shape)))
    return total


def spexport_source() -> str:
    """A digest of the installed spexport's Python sources: an artifact cached by an earlier run is
    rebuilt when the code that would write it has changed since."""
    import spexport

    digest = hashlib.sha256()
    root = Path(spexport.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def built_by_this_source(artifact: Path) -> bool:
    """Whether `artifact` is complete and was written by the spexport now installed."""
    stamp = artifact.with_name(artifact.name + ".source")
    return (artifact / "spexport.json").is_file() and stamp.is_file() and stamp.read_text() == spexport_source()


def stamp_source(artifact: Path) -> None:
    artifact.with_name(artifact.name + ".source").write_text(spexport_source())


def served_graph(artifact: Path) -> tuple[Path, bool]:
    """The decoder graph spexport's runtime runs on the CPU (the in-place graph, else the core graph, else the main
    one), and whether its past and present are one buffer (the in-place graph's)."""
    from spexport.artifact.manifest import Manifest

    manifest = Manifest.read(artifact)
    graph = manifest.inplace_graph or manifest.core_graph or manifest.graph
    return artifact / graph, manifest.inplace_graph is not None


def subset_artifact(source: Path, target: Path, count: int) -> Path:
    """`source` serving only its first `count` tasks: the same graph (hard-linked), a smaller bank.

    Used for the resident-memory figures, so that 1, 10 and 100 tasks share one export.
    """
    import dataclasses
    import os
    import shutil

    from spexport.artifact import tensorfile
    from spexport.artifact.integrity import sha256
    from spexport.artifact.manifest import Manifest

    manifest = Manifest.read(source)
    if (target / "spexport.json").is_file():
        existing = Manifest.read(target)
        if len(existing.tasks) == count and existing.files.get(manifest.graph) == manifest.files.get(manifest.graph):
            return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    tasks = manifest.tasks[:count]
    bank = tensorfile.load(source / manifest.prompt_bank)
    tensorfile.save({t.tensor: bank[t.tensor] for t in tasks}, target / manifest.prompt_bank)
    files = {manifest.prompt_bank: sha256(target / manifest.prompt_bank)}
    for rel, digest in manifest.files.items():
        if rel != manifest.prompt_bank and "/" not in rel:  # the graph, configs, tokenizer; not per-task files
            os.link(source / rel, target / rel)
            files[rel] = digest
    dataclasses.replace(manifest, tasks=tasks, files=files).write(target)
    return target


def bank_bytes(artifact: Path, count: int | None = None) -> int:
    """Bytes of the first `count` tasks' KV prefixes (float32), from the manifest."""
    from spexport.artifact.manifest import Manifest

    tasks = Manifest.read(artifact).tasks[:count]
    return sum(4 * int(np.prod(t.shape)) for t in tasks)
