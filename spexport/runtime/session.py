"""Opening an artifact's files: integrity, ONNX Runtime sessions and their ports, the prompt bank (the tokenizer:
text.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from spexport.artifact import tensorfile
from spexport.artifact.integrity import DAMAGED, MISSING, file_status, inside_folder, sha256
from spexport.artifact.manifest import Manifest
from spexport.errors import ArtifactError
from spexport.runtime.device import Provider, check_started
from spexport.runtime.external_data import external_locations

# ONNX Runtime raises its own pybind types (Fail, InvalidArgument, RuntimeException, ...), all plain Exceptions
ORT_ERRORS = tuple(t for t in vars(_ort_state).values() if isinstance(t, type) and issubclass(t, Exception))
CACHE_ENV = "SPEXPORT_CACHE_DIR"


class VerifiedFiles:
    """Files already hashed and found intact, remembered across processes by their stat signature.

    Writing a file changes its size, mtime or ctime, and replacing it changes its inode, so a file
    whose signature is what it was when it hashed to the manifest's sha256 still does, and a second
    load of a multi-gigabyte graph need not read it again. The cache lives outside the artifact
    (`$SPEXPORT_CACHE_DIR`, else `$XDG_CACHE_HOME/spexport` or `~/.cache/spexport`), keyed by
    absolute path; if it cannot be read or written, every load hashes every file.
    """

    LIMIT = 1024  # files remembered, the most recently verified first to stay
    SETTLE_NS = 2_000_000_000  # a file written this recently could change again within one timestamp tick

    def __init__(self):
        self.path = _cache_path()
        self.entries, self.changed = {}, False
        try:
            entries = json.loads(self.path.read_text()) if self.path else {}
            self.entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            pass

    def intact(self, path: Path, digest: str) -> bool:
        st = path.stat()
        key = str(path)
        signature = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, digest]
        if self.entries.get(key) == signature:
            return True
        if sha256(path) != digest:
            return False
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > self.SETTLE_NS:
            self.entries.pop(key, None)
            self.entries[key] = signature
            self.changed = True
        return True

    def vouch(self, path: Path, digest: str) -> None:
        """Remember `path` as intact without hashing it: a hard link just made to a file verified before
        (linking changes the file's ctime, not its bytes)."""
        st = path.stat()
        self.entries.pop(str(path), None)
        self.entries[str(path)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, digest]
        self.changed = True

    def save(self) -> None:
        if not (self.changed and self.path):
            return
        kept = dict(list(self.entries.items())[-self.LIMIT:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".verified.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f)
            os.replace(temp, self.path)  # atomic: concurrent loads see the old cache or the new one
        except OSError:
            pass


def _cache_path() -> Path | None:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "verified.json"
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spexport" / "verified.json"
    except RuntimeError:  # no home folder to be found
        return None


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Refuse an artifact whose files are missing or differ from what the exporter wrote."""
    verified = VerifiedFiles()
    try:
        status = file_status(folder, manifest.files, verified.intact)
    finally:
        verified.save()
    for rel, state in status.items():
        if state == MISSING:
            raise ArtifactError(f"{folder}: {rel} is missing")
        if state == DAMAGED:
            raise ArtifactError(f"{folder}: {rel} is damaged or was replaced (sha256 differs from the manifest)")


def vouch_for(folder: Path, files: dict[str, str]) -> None:
    """Remember `files` (path -> sha256) of `folder` as verified: hard links to files checked before."""
    verified = VerifiedFiles()
    for rel, digest in files.items():
        verified.vouch(inside_folder(folder, rel), digest)
    verified.save()


def check_external_data(path: Path) -> None:
    """Refuse a graph whose external data lies outside its folder (older ONNX Runtimes would read it)."""
    try:
        locations = external_locations(path)
    except ValueError as e:
        raise ArtifactError(f"{path}: not a readable ONNX graph ({e})") from None
    for location in locations:
        try:
            inside_folder(path.parent, location)
        except ArtifactError:
            raise ArtifactError(f"{path}: the graph's external data {location!r} points outside the artifact; "
                                "it is damaged or hostile") from None


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on.

    ONNX Runtime's default counts the whole machine's cores, which oversubscribes a container or a
    process pinned to a few CPUs; hyper-threads of one core share its vector units, so they count once.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


def session_options() -> ort.SessionOptions:
    """Serving options: every graph optimization, one intra-op thread per usable core, and no
    inter-op pool (a decoder step is one chain of operators, so a second pool only competes for
    the same cores). The CPU memory arena and memory patterns stay on, so steps of the same shape
    reuse their buffers."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = usable_cores()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    return options


def unpacked_options() -> ort.SessionOptions:
    """session_options() for a session that runs once or twice: ONNX Runtime's packing of the weights for its
    products would cost more than it saves, and holds them twice while the session opens."""
    options = session_options()
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the operating system (glibc only; elsewhere nothing).

    Opening a session parses the whole graph and copies its weights out of it; glibc keeps the freed
    parse buffers for reuse, which left a served GPT-2 small 100-150 MB larger than what it holds,
    by an amount that varied from one process to the next.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def open_session(path: Path, providers: list[Provider], options: ort.SessionOptions | None = None
                 ) -> ort.InferenceSession:
    """A session on `providers` (pick_providers' list). ONNX Runtime's own fallback is off: a GPU provider that
    fails to start or to run is an error here, not a silent switch to the CPU."""
    check_external_data(path)
    try:
        session = ort.InferenceSession(str(path), sess_options=options or session_options(), providers=providers,
                                       enable_fallback=0)
    except Exception as e:  # ORT raises its own pybind types for unreadable graphs
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({first_line(e)})") from None
    check_started(session, providers, path)
    return session


def check_ports(session: ort.InferenceSession, path: Path, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """Refuse a graph whose ports do not fit its manifest (a swapped graph, an edited manifest) before a
    request meets the mismatch inside ONNX Runtime. The graph must take exactly `inputs` and give at
    least `outputs`; each expected shape holds None where the graph's axis may be anything."""
    found = {"input": {p.name: p.shape for p in session.get_inputs()},
             "output": {p.name: p.shape for p in session.get_outputs()}}
    unfed = sorted(set(found["input"]) - set(inputs))
    if unfed:
        raise ArtifactError(f"{path}: the graph takes input {unfed[0]!r}, which its manifest does not describe")
    for kind, expected in [("input", inputs), ("output", outputs)]:
        for name, shape in expected.items():
            got = found[kind].get(name)
            fits = got is not None and len(got) == len(shape) and all(
                want is None or not isinstance(axis, int) or axis == want for axis, want in zip(got, shape))
            if not fits:
                raise ArtifactError(f"{path}: the graph's {kind} {name!r} is {'missing' if got is None else got}, "
                                    f"its manifest implies {['?' if a is None else a for a in shape]}; "
                                    "the graph and spexport.json do not belong together")


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_bank(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    bank = tensorfile.load(inside_folder(folder, manifest.prompt_bank))
    for task in manifest.tasks:
        tensor = bank.get(task.tensor)
        if tensor is None or list(tensor.shape) != task.shape or tensor.dtype != np.dtype(task.dtype):
            raise ArtifactError(f"{folder}: prompt bank entry for task {task.name!r} is missing or misshapen")
        if not np.isfinite(tensor).all():
            raise ArtifactError(f"{folder}: prompt bank entry for task {task.name!r} holds NaN or Inf, so every "
                                "answer of the task would be garbage; export the artifact again")
    return bank
