"""`spexport convert`: frozen model + soft-prompt adapters -> one ONNX artifact folder.

Needs the `[export]` extra (torch, transformers, peft, optimum-onnx, onnx).
"""

from __future__ import annotations

import os

# Converting never touches the network: a model or tokenizer must come from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

from spexport import __version__, ort_adapters, speedups, tensorfile  # noqa: E402
from spexport.converters import CONVERTERS, SoftPrompt, convert_adapter  # noqa: E402
from spexport.errors import AdapterError, ModelError, SpexportError  # noqa: E402
from spexport.families import DECODER, family_for, model_info  # noqa: E402
from spexport.manifest import Manifest, ModelInfo, Task, sha256, stack_prefixes  # noqa: E402

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json"]
MODEL_FILES = ["config.json", "generation_config.json"]
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,127}$")
GRAPH = "model.onnx"
BANK = "prompts.safetensors"


def _versions() -> dict[str, str]:
    found = {"spexport": __version__}
    for dist in ["torch", "transformers", "peft", "optimum-onnx", "optimum", "onnx", "onnxruntime"]:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def parse_adapters(specs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    seen = set()
    for name, path in specs:
        if not TASK_NAME.match(name):
            raise AdapterError(f"task name {name!r} is not allowed: use letters, digits, '_', '-', '.', '/'")
        if name in seen:
            raise AdapterError(f"task name {name!r} is given twice; every --adapter needs its own name")
        seen.add(name)
        if not Path(path).exists():
            raise AdapterError(f"adapter {name}: {path} does not exist")
    if not specs:
        raise AdapterError("no adapters given; pass at least one --adapter NAME=PATH")
    return list(specs)


def _load_model(model_dir: Path, trust_remote_code: bool = False):
    """The model's family, the model, and its ModelInfo."""
    from transformers import AutoModelForCausalLM

    # Checked before transformers reads it: transformers would guess a model type from the folder's name.
    model_type, auto_map = _model_type(model_dir)
    try:
        family = family_for(SimpleNamespace(model_type=model_type))
    except ModelError as e:
        raise ModelError(f"{model_dir}: {e}") from None
    if family is not DECODER:
        raise ModelError(f"{model_dir}: a {family.name} model; this step serves decoder-only models")
    config, generation_config = _read_configs(model_dir, auto_map, trust_remote_code)
    model = _pretrained(AutoModelForCausalLM, model_dir, trust_remote_code)
    return family, model, _within_vocab(model_info(config, generation_config))


def _read_configs(model_dir: Path, auto_map: dict, trust_remote_code: bool):
    """config.json and generation_config.json (None when there is none). Python code shipped in the
    model folder (config.json's auto_map) runs only with trust_remote_code; without it the folder is
    refused, rather than loaded as the stock architecture its authors chose to replace."""
    from transformers import AutoConfig, GenerationConfig

    if auto_map and not trust_remote_code:
        raise ModelError(f"{model_dir}: the model ships its own Python code (auto_map in config.json), which "
                         "spexport runs only with --trust-remote-code; read the code, pass the flag if you trust it")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model_dir}: unreadable model config ({_first_line(e)})") from None
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation_config = None
    return config, generation_config


def _pretrained(auto_class, model_dir: Path, trust_remote_code: bool, **kwargs):
    """The model's float32 weights through a transformers auto class, in eval mode."""
    try:
        with _quiet_tracing():
            model = auto_class.from_pretrained(model_dir, local_files_only=True, dtype="float32",
                                               trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: cannot load the model weights ({_first_line(e)})") from None
    return model.eval()


def _within_vocab(info: ModelInfo) -> ModelInfo:
    """Drop special token ids outside the vocabulary (some configs say pad_token_id -1): no token
    the model makes can match them, and the runtime feeds pad_token_id back into the graph."""
    def valid(token):
        return 0 <= token < info.vocab_size

    pad = info.pad_token_id if info.pad_token_id is not None and valid(info.pad_token_id) else None
    return dataclasses.replace(info, eos_token_ids=[t for t in info.eos_token_ids if valid(t)], pad_token_id=pad)


def _model_type(model_dir: Path) -> tuple[str, dict]:
    """The config's model_type and auto_map (empty unless the folder ships its own code)."""
    if not model_dir.exists():
        raise ModelError(f"{model_dir}: no such model folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{config_path}: not readable JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{config_path}: not a Hugging Face model config (no model_type)")
    return config["model_type"], config.get("auto_map") or {}


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def embeddings_to_kv(model, embeddings: np.ndarray) -> np.ndarray:
    """Run the frozen model once over virtual-token embeddings; return their per-layer KV.

    Virtual tokens come first and attend only to each other, so their keys and values do not
    depend on anything a request sends: computing them here is exact.
    """
    import torch

    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(embeddings)[None], use_cache=True)
    cache = out.past_key_values
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return np.stack([np.stack([k[0].numpy(), v[0].numpy()]) for k, v in layers]).astype(np.float32)


def _kv_prefix(model, prompt: SoftPrompt) -> np.ndarray:
    return embeddings_to_kv(model, prompt.tensor) if prompt.kind == "embeddings" else prompt.tensor


@contextlib.contextmanager
def _quiet_tracing():
    """The tracer's warnings speak to exporter developers, not to users; parity tests guard us."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _export_graph(model_dir: Path, info: ModelInfo, family, out: Path, speed: speedups.Speed, bank=None,
                  trust_remote_code: bool = False) -> None:
    import onnx
    from optimum.exporters.onnx import main_export

    from spexport.graph import add_prefix_inputs

    with tempfile.TemporaryDirectory() as raw, _quiet_tracing():
        main_export(str(model_dir), output=raw, task=family.optimum_task, do_validation=False,
                    local_files_only=True, trust_remote_code=trust_remote_code)
        speed.build(onnx.load(Path(raw) / GRAPH), info, out / GRAPH,
                    lambda model: add_prefix_inputs(model, info.num_layers, info.num_kv_heads, info.head_dim, bank))


def convert(model_dir: Path, adapters: list[tuple[str, Path]], output: Path, overwrite: bool = False,
            bake: bool = False, on_step: Callable[[str], None] = lambda step: None,
            optimize: bool = True, quantize: str | None = None, dtype: str = "float32",
            trust_remote_code: bool = False) -> Manifest:
    """Export `model_dir` with every adapter into one artifact at `output`, atomically.

    bake: put the prompt bank into the graph as constants, selected by a `task_ids` input.
    optimize: fuse norms, activations and rotary embeddings into ONNX Runtime operators (faster;
    the graph then needs ONNX Runtime). quantize="int8": int8 weights for every matrix product.
    dtype="float16": fp16 weights and compute, for GPU providers. Prompts and the graph's inputs
    and outputs stay float32 either way.
    trust_remote_code: run Python code that the model folder ships (config.json's auto_map).
    """
    model_dir, output = Path(model_dir), Path(output)
    from spexport.export_encoder import convert_encoder, is_encoder

    if is_encoder(model_dir):
        return convert_encoder(model_dir, adapters, output, overwrite, bake, on_step, trust_remote_code,
                               quantize=quantize, dtype=dtype)
    from spexport.export_seq2seq import convert_seq2seq, is_seq2seq

    if is_seq2seq(model_dir):
        return convert_seq2seq(model_dir, adapters, output, overwrite, bake, on_step, trust_remote_code,
                               quantize=quantize, dtype=dtype)
    speed = speedups.Speed(optimize, quantize, dtype)
    adapters = parse_adapters(adapters)
    _check_output(output, [model_dir] + [Path(path) for _, path in adapters], overwrite)
    on_step("loading the frozen model")
    family, model, info = _load_model(model_dir, trust_remote_code)
    on_step("converting adapters")
    prompts = _convert_adapters(adapters, info)
    with _building(output) as staging:
        bank, tasks = {}, []
        for name, prompt in prompts.items():
            on_step(f"computing the KV prefix of {name}")
            bank[name] = _kv_prefix(model, prompt)
            tasks.append(Task(name=name, method=prompt.method, num_virtual_tokens=prompt.num_virtual_tokens,
                              tensor=name, shape=list(bank[name].shape), dtype="float32",
                              source={**prompt.source, "kind": prompt.kind}))
        if not bake:
            tensorfile.save(bank, staging / BANK)
            ort_adapters.write_adapters(bank, staging)
        on_step("exporting the frozen model to ONNX")
        _export_graph(model_dir, info, family, staging, speed, stack_prefixes(list(bank.values())) if bake else None,
                      trust_remote_code)
        return _finish(staging, output, model_dir, family=family.name, model=info, graph=GRAPH,
                       prompt_bank=None if bake else BANK, tasks=tasks, baked=bake)


def _convert_adapters(adapters: list[tuple[str, Path]], info: ModelInfo,
                      converters: dict = CONVERTERS) -> dict[str, SoftPrompt]:
    """Every task that the adapters yield, by name; a name given twice is refused."""
    prompts: dict[str, SoftPrompt] = {}
    for name, path in adapters:
        for task, prompt in convert_adapter(name, path, info, converters).items():
            if task in prompts:
                raise AdapterError(f"task name {task!r} is given twice; every task needs its own name")
            prompts[task] = prompt
    return prompts


def _check_output(output: Path, sources: list[Path], overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise SpexportError(f"{output} is a file; --output must be a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise SpexportError(f"{output} exists and is not empty; pass --overwrite to replace it")
    for source in sources:
        if output.resolve() in [source.resolve(), *source.resolve().parents]:
            raise SpexportError(f"{output} holds the input {source}; write the artifact to another folder")


@contextlib.contextmanager
def _building(output: Path):
    """A staging folder beside `output` to build the artifact in. If anything fails inside, the folder
    (and any parent folder made for it) is removed, and an OSError becomes a one-line SpexportError."""
    staging, made = _staging_folder(output)
    try:
        yield staging
    except BaseException as e:
        shutil.rmtree(made or staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise SpexportError(f"writing {output} failed ({e})") from e
        raise


def _finish(staging: Path, output: Path, model_dir: Path, **fields) -> Manifest:
    """Copy the model's tokenizer and config files into `staging`, write the manifest (`fields` plus
    every file's sha256), and move the artifact into place at `output`."""
    copied = [f for f in TOKENIZER_FILES + MODEL_FILES if (model_dir / f).is_file()]
    for f in copied:
        shutil.copy2(model_dir / f, staging / f)
    files = {p.relative_to(staging).as_posix(): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = Manifest(**fields, tokenizer_files=[f for f in copied if f in TOKENIZER_FILES], versions=_versions(),
                        files=files)
    manifest.write(staging)
    Manifest.read(staging)  # what the runtime would refuse must fail here, not at the first load
    _replace(staging, output)
    return manifest


def _staging_folder(output: Path) -> tuple[Path, Path | None]:
    """A hidden folder beside `output` to build in, and the top-most parent folder created for it."""
    made = next((p for p in reversed(output.parents) if not p.exists()), None)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the artifact from other users, e.g. a server's
        return staging, made
    except OSError as e:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise SpexportError(f"cannot create {output} ({e})") from None


def _replace(staging: Path, output: Path) -> None:
    """Move the finished artifact into place; an old one is swapped out, then removed."""
    if not output.exists():
        staging.rename(output)
        return
    trash = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(trash)
    try:
        staging.rename(output)
    except BaseException:
        trash.rename(output)
        raise
    try:
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:  # Ctrl-C: the new artifact is in place; finish removing the old one, then stop
        shutil.rmtree(trash, ignore_errors=True)
        raise
