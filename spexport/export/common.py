"""What every family's exporter shares: reading the model folder and the adapters, staging the
artifact beside `--output`, sealing its manifest and moving it into place atomically."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from spexport import __version__
from spexport.artifact.files import BANK, CHAT_TEMPLATE, GRAPH, MODEL_FILES, TOKENIZER_FILES  # noqa: F401
from spexport.artifact.folders import replace_artifact, staging_folder
from spexport.artifact.integrity import sha256
from spexport.artifact.manifest import Manifest, ModelInfo, is_artifact
from spexport.converters import SoftPrompt, check_task_names, convert_adapter, exists, parse_adapters  # noqa: F401
from spexport.converters.bank import adapter_prompts
from spexport.ensembles import check_ensembles
from spexport.errors import ModelError, OptionError, OutputError, SpexportWarning
from spexport.families import Family
from spexport.runtime.chat import check_template_file

WRITERS = ("auto", "direct", "trace")


@dataclass(frozen=True)
class ExportOptions:
    """How `convert` builds an artifact; `families.Family.check` has refused what a family cannot do.

    bake: put the prompt bank into the graph as constants, selected by a `task_ids` input.
    optimize: fuse norms, activations and rotary embeddings into ONNX Runtime operators (without it, plain ONNX).
    writer: how a decoder's core graph is made: "direct" (written from the model's weights by direct.py, with
    ONNX Runtime's fused operators), "trace" (torch.onnx, then fused when optimizing) or "auto" (direct where
    spexport knows the layers and fused operators are wanted, else traced).
    quantize: "int8", "int4" or "int4-exact" block-wise weights for every matrix product (export/passes/quantize.py),
    with a drift report against float32 in the manifest. dtype: "float16" for GPU providers.
    trust_remote_code: run Python code that the model folder ships (config.json's auto_map).
    """

    bake: bool = False
    optimize: bool = True
    writer: str = "auto"
    quantize: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    ensembles: dict[str, list[str]] = field(default_factory=dict)  # {name: member tasks}, checked in `finish`
    on_step: Callable[[str], None] = field(default=lambda step: None, compare=False)

    def __post_init__(self) -> None:
        if self.writer not in WRITERS:
            raise OptionError(f"writer={self.writer!r} is not one of {', '.join(WRITERS)}")
        if self.writer == "direct" and not self.optimize:
            raise OptionError("the direct writer writes ONNX Runtime's fused operators; for plain ONNX operators "
                              "(--no-optimize) use --writer trace or leave --writer out")

    @property
    def weights(self) -> str:
        """The weights' type: the quantization, else the dtype."""
        return self.quantize or self.dtype


def versions() -> dict[str, str]:
    found = {"spexport": __version__}
    for dist in ["torch", "transformers", "peft", "onnx", "onnx-ir", "onnxruntime"]:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def read_configs(model_dir: Path, trust_remote_code: bool):
    """config.json and generation_config.json (None when there is none). Python code shipped in the
    model folder (config.json's auto_map) runs only with trust_remote_code; without it the folder is
    refused, rather than loaded as the stock architecture its authors chose to replace."""
    from transformers import AutoConfig, GenerationConfig

    _, auto_map = read_model_type(model_dir)
    if auto_map and not trust_remote_code:
        raise ModelError(f"{model_dir}: the model ships its own Python code (auto_map in config.json), which "
                         "spexport runs only with --trust-remote-code; read the code, pass the flag if you trust it")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{model_dir}: unreadable model config ({first_line(e)})") from None
    try:
        generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        generation_config = None
    return config, generation_config


def pretrained(auto_class, model_dir: Path, trust_remote_code: bool, **kwargs):
    """The model's float32 weights through a transformers auto class, in eval mode."""
    try:
        with quiet_tracing():
            model = auto_class.from_pretrained(model_dir, local_files_only=True, dtype="float32",
                                               trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: cannot load the model weights ({first_line(e)})") from None
    return model.eval()


def within_vocab(info: ModelInfo) -> ModelInfo:
    """Drop special token ids outside the vocabulary (some configs say pad_token_id -1): no token
    the model makes can match them, and the runtime feeds pad_token_id back into the graph."""
    def valid(token):
        return 0 <= token < info.vocab_size

    pad = info.pad_token_id if info.pad_token_id is not None and valid(info.pad_token_id) else None
    return dataclasses.replace(info, eos_token_ids=[t for t in info.eos_token_ids if valid(t)], pad_token_id=pad)


def read_model_type(model_dir: Path) -> tuple[str, dict]:
    """The config's model_type and auto_map (empty unless the folder ships its own code)."""
    if not exists(model_dir):
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


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def quiet_tracing():
    """The tracer's warnings speak to exporter developers, not to users; parity tests guard us. Nor do
    loading's progress bars (transformers 5 draws one per model) belong in a one-line CLI."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def convert_adapters(adapters: list[tuple[str, Path]], info: ModelInfo, family: Family,
                     model_dir: Path) -> dict[str, SoftPrompt]:
    """Every task that the adapters yield, by name (see `adapter_tasks`)."""
    return {task: prompt for _, tasks in adapter_tasks(adapters, info, family, model_dir)
            for task, prompt in tasks.items()}


def adapter_tasks(adapters: list[tuple[str, Path]], info: ModelInfo, family: Family,
                  model_dir: Path) -> list[tuple[str, dict[str, SoftPrompt]]]:
    """Each adapter's name and the tasks it yields, all checked (their names too) before any model loads
    (converters.bank.adapter_prompts); an adapter that names another base model than `model_dir` is
    converted with a SpexportWarning naming both, since its shapes fit."""
    found = adapter_prompts(adapters, info, family)
    for name, tasks in found:
        base = next(iter(tasks.values())).source.get("base_model")
        if base and not same_model(base, model_dir):
            warnings.warn(f"adapter {name} was trained on {base}, not on {model_dir.resolve().name} (by name; its "
                          "shapes fit): if that is another model, its prompt means something else here",
                          SpexportWarning, stacklevel=2)
    return found


def same_model(base: str, model_dir: Path) -> bool:
    """Whether the base model an adapter names is `model_dir`, by name: the folder's, or the one its
    config.json records (`_name_or_path`)."""
    names = {model_dir.resolve().name.lower()}
    try:
        recorded = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError, RecursionError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        names.add(Path(recorded).name.lower())
    return Path(base).name.lower() in names


def check_output(output: Path, sources: list[Path], overwrite: bool) -> Path:
    """Refuse an output folder that convert must not write or replace; return it as an absolute path
    ('..' resolved by name, as a shell would)."""
    folder = Path(os.path.abspath(output))
    try:
        _check_output_folder(output, folder, sources, overwrite)
    except OSError as e:  # a name too long for the file system, a folder it may not enter
        raise OutputError(f"--output {output}: cannot be written ({e.strerror})") from None
    return folder


def _check_output_folder(output: Path, folder: Path, sources: list[Path], overwrite: bool) -> None:
    cwd = Path.cwd()
    if folder == cwd or folder in cwd.parents:
        raise OutputError(f"--output {output} is the current folder or holds it; name a folder for the artifact, "
                          f"such as --output {os.path.join(output, 'artifact')}")
    if folder.is_symlink():
        raise OutputError(f"--output {output} is a symbolic link; name the folder it points to, or another")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{output} is a file; --output must be a folder")
    for source in sources:
        if folder.resolve() in [source.resolve(), *source.resolve().parents]:
            raise OutputError(f"{output} holds the input {source}; write the artifact to another folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise OutputError(f"{output} exists and is not empty; pass --overwrite to replace it")
        if not is_artifact(folder):
            raise OutputError(f"{output} is not a spexport artifact (its spexport.json does not say so) and is not "
                              "empty; --overwrite replaces only an artifact, so move its files or pick another "
                              "--output")


@contextlib.contextmanager
def building(output: Path):
    """A staging folder beside `output` to build the artifact in. If anything fails inside, the folder
    (and any parent folder made for it) is removed, and an OSError becomes a one-line SpexportError."""
    staging, made = staging_folder(output)
    try:
        yield staging
    except BaseException as e:
        shutil.rmtree(made or staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"writing {output} failed ({e})") from e
        raise


def finish(staging: Path, output: Path, model_dir: Path, **fields) -> Manifest:
    """Copy the model's tokenizer and config files into `staging`, write the manifest (`fields` plus
    every file's sha256), and move the artifact into place at `output`. Ensembles are checked against the
    tasks first."""
    check_ensembles(fields.get("ensembles", {}), fields["tasks"])
    copied = [f for f in TOKENIZER_FILES + MODEL_FILES if (model_dir / f).is_file()]
    for f in copied:
        shutil.copy2(model_dir / f, staging / f)
    if CHAT_TEMPLATE not in copied and _write_chat_template(model_dir, staging / CHAT_TEMPLATE):
        copied.append(CHAT_TEMPLATE)
    check_template_file(staging)  # a template that hangs or floods is refused before it is in an artifact
    files = {p.relative_to(staging).as_posix(): sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
    manifest = Manifest(**fields, tokenizer_files=[f for f in copied if f in TOKENIZER_FILES], versions=versions(),
                        files=files)
    manifest.write(staging)
    Manifest.read(staging)  # what the runtime would refuse must fail here, not at the first load
    replace_artifact(staging, output)
    return manifest


def _write_chat_template(model_dir: Path, path: Path) -> bool:
    """Write the chat template that tokenizer_config.json holds (older model folders keep it there, not in
    chat_template.jinja) to `path`: a string, or of a list of named templates the one named "default",
    which transformers' apply_chat_template uses. False when there is none."""
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if not isinstance(template, str):
        return False
    path.write_text(template, encoding="utf-8")
    return True
