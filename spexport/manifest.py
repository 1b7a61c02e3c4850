"""The artifact contract: `spexport.json`, read and written the same way by exporter and runtime.

docs/artifact-format.md describes every field; this module is its executable form.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from spexport.errors import ArtifactError

MANIFEST = "spexport.json"
FORMAT = "spexport"
FORMAT_VERSION = 1

# Graph input/output names (optimum-onnx's decoder-with-past names plus spexport's prefix inputs).
KV_PREFIX = "kv_prefix"  # [batch, layers, 2, kv_heads, n_prefix, head_dim]
PREFIX_MASK = "prefix_mask"  # [batch, n_prefix], 1 where a row has a virtual token
TASK_IDS = "task_ids"  # [batch], baked graphs only: index into the manifest's task list
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"


@dataclass
class ModelInfo:
    """What the runtime needs to know about the frozen model."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None


@dataclass
class Task:
    """One task of the artifact; its position in `Manifest.tasks` is its task id."""

    name: str
    method: str
    num_virtual_tokens: int
    tensor: str  # key in the prompt bank: [layers, 2, kv_heads, n, head_dim]
    shape: list[int]
    dtype: str
    source: dict = field(default_factory=dict)


@dataclass
class Manifest:
    family: str
    model: ModelInfo
    graph: str
    prompt_bank: str | None  # None when the bank is baked into the graph
    tasks: list[Task]
    baked: bool = False
    tokenizer_files: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # relative path -> sha256
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def write(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2)
        (Path(folder) / MANIFEST).write_text(text + "\n")

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{folder}: not a spexport artifact (no {MANIFEST}); run `spexport convert` first")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{path}: damaged manifest ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a spexport manifest")
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(f"{path}: artifact format {version!r} is newer than this spexport "
                                f"understands ({FORMAT_VERSION}); upgrade spexport")
        try:
            manifest = cls(**{**raw, "model": ModelInfo(**raw["model"]),
                              "tasks": [Task(**t) for t in raw["tasks"]]})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: manifest is missing or has unexpected fields ({e})") from None
        for rel in [manifest.graph, manifest.prompt_bank or manifest.graph, *manifest.files]:
            inside_folder(folder, rel)
        return manifest


def stack_prefixes(prefixes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-task KV prefixes [layers, 2, kv_heads, n, head_dim] into the graph's layout.

    Returns kv [count, layers, 2, kv_heads, longest, head_dim] and mask [count, longest]; shorter
    prefixes are left-padded with zero slots whose mask is 0, so every row sees only its own.
    """
    longest = max(p.shape[3] for p in prefixes)
    layers, _, heads, _, head_dim = prefixes[0].shape
    kv = np.zeros((len(prefixes), layers, 2, heads, longest, head_dim), np.float32)
    mask = np.zeros((len(prefixes), longest), np.int64)
    for row, prefix in enumerate(prefixes):
        n = prefix.shape[3]
        kv[row, :, :, :, longest - n:] = prefix
        mask[row, longest - n:] = 1
    return kv, mask


def inside_folder(folder: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing any that escapes the artifact folder."""
    root = Path(folder).resolve()
    path = (root / rel).resolve()
    if root != path and root not in path.parents:
        raise ArtifactError(f"{folder}: manifest path {rel!r} points outside the artifact")
    return path


OK, DAMAGED, MISSING = "ok", "DAMAGED", "missing"


def file_status(folder: Path, manifest: Manifest) -> dict[str, str]:
    """ok, DAMAGED or missing for every file the manifest lists, checked against its sha256."""
    status = {}
    for rel, digest in manifest.files.items():
        path = inside_folder(folder, rel)
        status[rel] = MISSING if not path.is_file() else OK if sha256(path) == digest else DAMAGED
    return status


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
