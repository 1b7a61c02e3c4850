"""Where a model runs: the ONNX Runtime execution providers asked for, checked against this build, and the
device an I/O binding keeps a provider's tensors on.

Fallback order: the providers run in the order given and CPUExecutionProvider is always appended last.
ONNX Runtime places each node on the first of them that has a kernel for it, so a node the GPU provider
lacks runs on the CPU (the session then copies its inputs and outputs across). A provider this build of
onnxruntime does not have is refused, never dropped: a model asked for the GPU that quietly ran on the CPU
would be tens of times slower with nothing to say why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import onnxruntime as ort

from spexport.errors import InputError

CPU = "CPUExecutionProvider"
Provider = str | tuple[str, dict[str, str]]  # a name, or a name and its provider options (ONNX Runtime's form)

# the OrtValue device name of the memory each provider computes in; any other provider: the host's
DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
# the package that brings a provider, for the one-line error that names the fix
PACKAGES = {"CUDAExecutionProvider": "onnxruntime-gpu", "TensorrtExecutionProvider": "onnxruntime-gpu",
            "DmlExecutionProvider": "onnxruntime-directml", "OpenVINOExecutionProvider": "onnxruntime-openvino",
            "QNNExecutionProvider": "onnxruntime-qnn"}
INPLACE_MIN_ORT = (1, 32)  # the in-place graph's GroupQueryAttention takes query_seqlens from this release
# provider options spexport's graphs cannot run with, and why
REFUSED_OPTIONS = {
    "enable_cuda_graph": "a captured CUDA graph replays fixed shapes at fixed addresses, but every decode step's "
                         "past is one token longer (and requests differ in length); leave enable_cuda_graph out",
}


def pick_providers(requested: Sequence[Provider] | None) -> list[Provider]:
    """The providers to open sessions with: `requested` in order (default: the CPU alone), CPU appended last.

    Each item is a provider name or a (name, options) pair, as ONNX Runtime takes them. A name ONNX Runtime
    does not know, or a provider this onnxruntime build lacks, is an InputError naming the fix.
    """
    if requested is None:
        return [CPU]
    if isinstance(requested, (str, bytes)) or not isinstance(requested, Sequence):
        raise InputError(f"providers must be a list of provider names such as ['CUDAExecutionProvider'], got "
                         f"{requested!r}")
    chosen, names = [], []
    for item in requested:
        name, options = _name_and_options(item)
        _check_available(name)
        if name not in names:
            names.append(name)
            chosen.append((name, options) if options else name)
    if CPU not in names:
        chosen.append(CPU)
    return chosen


def _name_and_options(item) -> tuple[str, dict[str, str]]:
    if isinstance(item, str):
        return item, {}
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping)
            and all(isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in item[1].items())):
        for key, value in item[1].items():
            if key in REFUSED_OPTIONS and str(value).lower() not in ("0", "false"):
                raise InputError(f"provider option {key}={value!r} is not supported: {REFUSED_OPTIONS[key]}")
        return item[0], {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in item[1].items()}
    raise InputError(f"each provider must be a name such as 'CUDAExecutionProvider' or a (name, {{option: value}}) "
                     f"pair, got {item!r}")


def _check_available(name: str) -> None:
    available = ort.get_available_providers()
    if name in available:
        return
    if name not in ort.get_all_providers():
        raise InputError(f"{name!r} is not an ONNX Runtime execution provider; this build has "
                         f"{', '.join(available)}")
    package = PACKAGES.get(name)
    fix = (f"install {package} in place of onnxruntime (pip uninstall -y onnxruntime && pip install {package}: "
           "both provide the onnxruntime module, so only one may be installed)") if package else \
        "install an onnxruntime build that has it"
    raise InputError(f"{name} is not in this onnxruntime {ort.__version__} build (it has {', '.join(available)}); "
                     f"{fix}")


def check_started(session: ort.InferenceSession, providers: Sequence[Provider], path: Path) -> None:
    """Refuse a session that left out a provider it was asked for: onnxruntime-gpu opens a CPU-only session,
    with a message on stderr only, when the GPU, its driver or the CUDA libraries cannot be loaded."""
    started = session.get_providers()
    for provider in providers:
        name = provider if isinstance(provider, str) else provider[0]
        if name not in started:
            raise InputError(f"{path}: ONNX Runtime could not start {name} (the session has {', '.join(started)}); "
                             "the GPU, its driver or the libraries the provider links (for onnxruntime-gpu 1.31: "
                             "CUDA 13's libcudart, libcublas and cuDNN 9) are missing; see docs/gpu.md")


def io_device(session: ort.InferenceSession) -> tuple[str, int]:
    """(OrtValue device name, device id) where `session`'s first provider keeps the tensors it computes: what
    an I/O binding names so that outputs fed back as inputs (a decoder's present/past) stay there."""
    provider = session.get_providers()[0]
    device = DEVICES.get(provider, "cpu")
    if device == "cpu":
        return device, 0
    return device, int(session.get_provider_options().get(provider, {}).get("device_id", 0))


def runs_inplace_cache(providers: Sequence[Provider]) -> bool:
    """Whether a decoder's in-place graph (GroupQueryAttention with query_seqlens: ONNX Runtime 1.32 and later)
    runs here. The CPU provider alone for now: the GPU providers' GroupQueryAttention with an attention bias and
    per-row query lengths is unchecked, and PyPI's onnxruntime-gpu is 1.31."""
    version = tuple(int(part) for part in ort.__version__.split(".")[:2] if part.isdigit())
    return version >= INPLACE_MIN_ORT and all(_name_and_options(item)[0] == CPU for item in providers)
