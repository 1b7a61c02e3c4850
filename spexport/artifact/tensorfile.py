"""Read and write safetensors files with numpy alone.

The format is tiny (an 8-byte header length, a JSON header, raw little-endian data), and the
runtime must not need torch, so the prompt bank is read here rather than through a framework.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from spexport.errors import ArtifactError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_READ_ONLY = {"BF16": np.uint16}  # read as float32: bfloat16 is float32's upper 16 bits


def save(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    blobs = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"cannot store dtype {array.dtype} for tensor {name!r}")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def load(path: Path) -> dict[str, np.ndarray]:
    """Return every tensor of a safetensors file; a damaged file raises ArtifactError."""
    data = Path(path).read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = np.dtype({**_DTYPES, **_READ_ONLY}[info["dtype"]]).newbyteorder("<")
            shape = tuple(info["shape"])
            if not 0 <= begin <= end <= len(body) or end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name!r} does not fit in the file")
            tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
            if info["dtype"] in _READ_ONLY:
                tensors[name] = (tensors[name].astype(np.uint32) << 16).view(np.float32)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors
