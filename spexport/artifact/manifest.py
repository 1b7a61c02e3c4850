"""The artifact contract: `spexport.json`, read and written the same way by exporter and runtime.

docs/artifact-format.md describes every field; this module is its executable form.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from spexport.artifact.integrity import MISSING, OK, file_status, inside_folder
from spexport.artifact.locks import editing
from spexport.errors import ArtifactError

MANIFEST = "spexport.json"
FORMAT = "spexport"
FORMAT_VERSION = 1
SEAL = "manifest_sha256"  # spexport.json's own checksum (see seal)
DTYPES = ("float32",)  # what tasks[].dtype may be
MAX_MANIFEST_BYTES = 64 << 20  # thousands of tasks fit in a few MB; more is a damaged or hostile file
MAX_LAYERS = 1 << 16

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
    # layers that attend within a window of this many slots (left out of the manifest when none do)
    sliding_window: int | None = None
    # encoder-decoder models only (left out of the manifest otherwise)
    decoder_start_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None

    @property
    def padding_token(self) -> int:
        """The token that fills padded slots and finished rows: pad_token_id, else the first EOS, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0


SEQ2SEQ_MODEL_FIELDS = ["decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"]


@dataclass
class Task:
    """One task of the artifact; its position in `Manifest.tasks` is its task id."""

    name: str
    method: str
    num_virtual_tokens: int
    tensor: str  # key in the prompt bank: [layers, 2, kv_heads, n, head_dim] (encoders also [n, hidden])
    shape: list[int]
    dtype: str
    source: dict = field(default_factory=dict)
    head: dict | None = None  # encoder tasks: {"graph": path, "kind": "sequence" or "token", "labels": [...]}


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
    encoder_graph: str | None = None  # seq2seq: the encoder; `graph` is then the merged decoder
    # decoder: the frozen model over virtual-token embeddings, for adding tasks without torch
    prefix_graph: str | None = None
    # decoder, unbaked: the main graph without its prefix inputs, which the Python runtime runs
    core_graph: str | None = None
    # decoder, unbaked: the core graph with a KV cache updated in place (ONNX Runtime 1.32+), where every layer's
    # attention allows it
    inplace_graph: str | None = None
    quantization: dict | None = None  # --quantize: how (bits, block size, ...) and the drift report
    # prompt ensembles: name -> its member tasks, trained for one job and run together (left out when none)
    ensembles: dict[str, list[str]] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(self.text())

    def text(self) -> str:
        """The sealed spexport.json, as `write` writes it."""
        document = asdict(self)
        for task in document["tasks"]:
            if task["head"] is None:
                del task["head"]  # decoder tasks have none; readers before encoders know no such field
        optional = [(document, ["encoder_graph", "prefix_graph", "core_graph", "inplace_graph", "quantization"]),
                    (document["model"], ["sliding_window", *SEQ2SEQ_MODEL_FIELDS])]
        for fields_of, keys in optional:
            for key in keys:
                if fields_of[key] is None:
                    del fields_of[key]  # likewise for readers before encoder-decoder models
        if not document["ensembles"]:
            del document["ensembles"]  # and for readers before ensembles
        return json.dumps(seal(document), indent=2) + "\n"

    @classmethod
    def read(cls, folder: Path, sealed: bool = True) -> Manifest:
        """Read and check `folder`'s manifest; anything malformed raises ArtifactError naming the field.

        The SEAL is required; sealed=False lets a manifest without one through (for `reseal` alone). A
        SEAL that is there must match either way."""
        path = Path(folder) / MANIFEST
        try:
            size = path.stat().st_size if path.is_file() else None
        except OSError as e:  # a name too long for the file system, a folder it may not enter
            raise ArtifactError(f"{folder}: cannot be read ({e.strerror})") from None
        if size is None:
            raise ArtifactError(f"{folder}: not a spexport artifact (no {MANIFEST}); run `spexport convert` first")
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path}: {size} bytes is too large for a manifest; it is damaged")
        try:
            raw = json.loads(path.read_bytes())
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ArtifactError(f"{path}: damaged manifest ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a spexport manifest")
        version = raw.get("format_version")  # first: a newer format may seal otherwise
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ArtifactError(f"{path}: artifact format {version!r} is newer than this spexport "
                                f"understands ({FORMAT_VERSION}); upgrade spexport")
        try:
            intact = SEAL not in raw or raw[SEAL] == seal(raw)[SEAL]
        except RecursionError:
            intact = False
        if not intact:
            raise ArtifactError(f"{path}: damaged manifest (its content does not match the {SEAL} it records)")
        manifest = _checked(raw, path)  # first: a malformed field is named even in a manifest without a seal
        if sealed and SEAL not in raw:
            raise ArtifactError(f"{path} has no {SEAL}, so edits to it cannot be detected; if you trust the artifact "
                                f"as it stands, run `spexport reseal {folder}`")
        for rel in manifest.files:  # the graph, the bank and the tokenizer files are among them
            inside_folder(folder, rel)
        return manifest


def reseal(folder: Path) -> tuple[Manifest, bool]:
    """Add the SEAL to a manifest written without one, trusting its content as it stands once every file
    it lists matches its sha256. Returns the manifest and whether a seal was added (False: it had one,
    and it matched). A seal that does not match is refused, never replaced."""
    with editing(folder):  # one writer at a time: add, remove and reseal take turns
        return _reseal(folder)


def _reseal(folder: Path) -> tuple[Manifest, bool]:
    manifest = Manifest.read(folder, sealed=False)
    path = Path(folder) / MANIFEST
    raw = json.loads(path.read_bytes())
    if SEAL in raw:
        return manifest, False
    for rel, status in file_status(folder, manifest.files).items():
        if status != OK:
            raise ArtifactError(f"{folder}: {rel} is {'missing' if status == MISSING else 'damaged or was replaced'}; "
                                "reseal trusts the manifest only when every file it lists is intact")
    temporary = path.with_name(f".{MANIFEST}.reseal")
    try:
        temporary.write_text(json.dumps(seal(raw), indent=2) + "\n")
        temporary.replace(path)  # atomic: a reader sees the old manifest or the sealed one
    except OSError as e:
        temporary.unlink(missing_ok=True)
        raise ArtifactError(f"{path}: cannot write the sealed manifest ({e.strerror})") from None
    return manifest, True


def is_artifact(folder: Path) -> bool:
    """Whether `folder` holds a spexport.json that says it is a spexport manifest, damaged or not: the
    only kind of folder `convert --overwrite` may replace."""
    path = Path(folder) / MANIFEST
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def seal(document: dict) -> dict:
    """`document` with its SEAL: the sha256 of its other fields as canonical JSON. The manifest cannot
    list its own hash among `files`, so it carries this one; any changed byte that still parses
    (a letter of a task name, a digit of a shape) breaks it. `Manifest.read` requires it; manifests
    written before it are sealed by `reseal`."""
    content = {key: value for key, value in document.items() if key != SEAL}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {**content, SEAL: hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()}


def ensemble_problem(name: str, members, tasks: list[Task]) -> str | None:
    """Why ensemble `name` of `members` cannot be in an artifact of `tasks`, or None when it can: an ensemble
    has at least two distinct member tasks, and its name is no task's; a classifier's members share their
    labels and classify sequences (their probabilities are averaged label by label)."""
    by_name = {t.name: t for t in tasks}
    if name in by_name:
        return f"ensemble {name!r} has the name of a task; name it otherwise"
    if not isinstance(members, (list, tuple)) or len(members) < 2 or not all(map(_text, members)):
        return f"ensemble {name!r} needs at least two member task names, got {_show(members)}"
    if len(set(members)) != len(members):
        return f"ensemble {name!r} names a task twice ({', '.join(members)}); each member is a distinct task"
    unknown = [m for m in members if m not in by_name]
    if unknown:
        return f"ensemble {name!r} names {unknown[0]!r}, which is not a task; the tasks are {', '.join(by_name)}"
    heads = [by_name[m].head for m in members]
    if all(h is None for h in heads):  # a generator's tasks: nothing more to share
        return None
    if any(not isinstance(h, dict) or h.get("kind") != "sequence" for h in heads):
        return f"ensemble {name!r}: ensembles of a classifier are of sequence classification tasks"
    if any(h.get("labels") != heads[0].get("labels") for h in heads):
        return f"ensemble {name!r}: its members' labels differ, so their probabilities cannot be averaged"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(value) -> bool:
    # counts past int32 mean a damaged manifest, not a model: refuse them before anything is sized by them
    return _is_int(value) and 0 < value < 1 << 31


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _path(value) -> bool:
    # printable, so that every message naming it stays on one line
    return _text(value) and value.isprintable()


def _paths(value) -> bool:
    return isinstance(value, list) and all(map(_path, value))


_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUIRED = object()


class _Fields:
    """Takes checked fields out of one JSON object; a missing, mistyped or unknown one raises
    ArtifactError naming it (`model.num_layers`, `tasks[2].shape`)."""

    def __init__(self, obj, where: str, path: Path):
        if not isinstance(obj, dict):
            raise ArtifactError(f"{path}: {where} must be an object, got {_show(obj)}")
        self.obj, self.where, self.path, self.taken = obj, where, path, set()

    def take(self, key: str, valid: Callable[[object], bool], want: str, default=_REQUIRED):
        name = f"{self.where}.{key}" if self.where else key
        self.taken.add(key)
        if key not in self.obj:
            if default is _REQUIRED:
                raise ArtifactError(f"{self.path}: field {name} is missing")
            return default
        if not valid(self.obj[key]):
            raise ArtifactError(f"{self.path}: field {name} must be {want}, got {_show(self.obj[key])}")
        return self.obj[key]

    def rest(self, cls) -> dict:
        """The fields no check took that `cls` declares (one added since these checks were written), as read;
        any other field is refused."""
        unknown = sorted(set(self.obj) - self.taken - {f.name for f in fields(cls)})
        if unknown:
            prefix = f"{self.where}." if self.where else ""
            raise ArtifactError(f"{self.path}: unexpected field {prefix + unknown[0]!r}; the artifact is damaged or "
                                "was written by another spexport")
        return {key: value for key, value in self.obj.items() if key not in self.taken}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked(raw: dict, path: Path) -> Manifest:
    """The manifest with every field's type, range and consistency checked."""
    top = _Fields(raw, "", path)
    top.take("format", lambda v: v == FORMAT, repr(FORMAT))
    top.take(SEAL, lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None, "a sha256 hex digest", None)
    version = top.take("format_version", _positive, "a positive integer")
    m = _Fields(top.take("model", lambda v: True, "an object"), "model", path)
    # the runtime names two graph ports per layer before it can compare them with the graph's
    counts = {"num_layers": m.take("num_layers", lambda v: _positive(v) and v <= MAX_LAYERS,
                                   f"a positive integer up to {MAX_LAYERS}")}
    counts |= {key: m.take(key, _positive, "a positive integer")
               for key in ("num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_positions")}
    vocab = counts["vocab_size"]
    model = ModelInfo(
        model_type=m.take("model_type", _text, "a string"), **counts,
        eos_token_ids=m.take("eos_token_ids", lambda v: isinstance(v, list) and all(_is_int(i) and 0 <= i < vocab
                                                                                    for i in v),
                             f"a list of token ids below vocab_size {vocab}", []),
        pad_token_id=m.take("pad_token_id", lambda v: v is None or _is_int(v) and 0 <= v < vocab,
                            f"null or a token id below vocab_size {vocab}", None),
        sliding_window=m.take("sliding_window", _positive, "a positive integer", None),
        **m.rest(ModelInfo))
    tasks, names = [], set()
    for i, obj in enumerate(top.take("tasks", lambda v: isinstance(v, list) and v != [], "a non-empty list")):
        t = _Fields(obj, f"tasks[{i}]", path)
        name = t.take("name", lambda v: _path(v) and v not in names, "a printable name unique among the tasks")
        names.add(name)
        n = t.take("num_virtual_tokens", lambda v: _positive(v) and v < model.max_positions,
                   f"a positive integer below max_positions {model.max_positions}")
        shape = [model.num_layers, 2, model.num_kv_heads, n, model.head_dim]
        # which families' banks may hold embeddings is the family's to say (runtime.load checks it)
        shapes = [shape, [n, model.hidden_size]]
        shape = t.take("shape", lambda v, shapes=shapes: isinstance(v, list) and all(map(_is_int, v)) and v in shapes,
                       f"[num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim] = {shape} or "
                       "[num_virtual_tokens, hidden_size] (an encoder's embeddings)")
        tasks.append(Task(name=name, method=t.take("method", _text, "a string"), num_virtual_tokens=n,
                          tensor=t.take("tensor", _text, "a string"), shape=shape,
                          dtype=t.take("dtype", lambda v: v in DTYPES, " or ".join(map(repr, DTYPES))),
                          source=t.take("source", lambda v: isinstance(v, dict), "an object", {}), **t.rest(Task)))
    baked = top.take("baked", lambda v: isinstance(v, bool), "true or false", False)
    bank = top.take("prompt_bank", (lambda v: v is None) if baked else _path,
                    "null in a baked artifact" if baked else "a path (the artifact is not baked)")
    graph = top.take("graph", _path, "a path")
    prefix_graph = top.take("prefix_graph", _path, "a path", None)
    core_graph = top.take("core_graph", _path, "a path", None)
    inplace_graph = top.take("inplace_graph", _path, "a path", None)
    tokenizer_files = top.take("tokenizer_files", _paths, "a list of paths", [])
    files = top.take("files", lambda v: isinstance(v, dict) and all(_path(k) and isinstance(d, str) and
                                                                   _SHA256.fullmatch(d) for k, d in v.items()),
                     "an object of paths to sha256 hex digests", {})
    ensembles = top.take("ensembles", lambda v: isinstance(v, dict) and all(map(_path, v)), "an object of names", {})
    for name, members in ensembles.items():
        problem = ensemble_problem(name, members, tasks)
        if problem:
            raise ArtifactError(f"{path}: field ensembles: {problem}")
    for rel in [graph, bank, prefix_graph, core_graph, inplace_graph, *tokenizer_files]:
        if rel is not None and rel not in files:
            raise ArtifactError(f"{path}: field files has no sha256 for {rel!r}, so it cannot be checked")
    return Manifest(family=top.take("family", _text, "a string"), model=model, graph=graph, prompt_bank=bank,
                    tasks=tasks, baked=baked, tokenizer_files=tokenizer_files,
                    versions=top.take("versions", lambda v: isinstance(v, dict), "an object", {}), files=files,
                    quantization=top.take("quantization", lambda v: isinstance(v, dict), "an object", None),
                    format_version=version, prefix_graph=prefix_graph, core_graph=core_graph,
                    inplace_graph=inplace_graph,
                    ensembles={name: list(members) for name, members in ensembles.items()}, **top.rest(Manifest))
