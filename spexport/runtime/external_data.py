"""The files an ONNX graph reads beside itself (external data), found without the onnx package.

A tensor stored outside the graph file names its file in an `external_data` entry with the key
"location", relative to the graph's folder. A hostile graph could name `../../home/me/.ssh/id_rsa`,
so the runtime checks every location before ONNX Runtime opens the graph. The runtime has no onnx
package, so this walks the protobuf wire format, following only the fields that can lead to a
TensorProto (field numbers from onnx.proto).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

MODEL, GRAPH, NODE, ATTRIBUTE, TENSOR, SPARSE, FUNCTION, TRAINING, ENTRY = range(9)
# message -> {field number: the message that field holds}
FIELDS = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},  # external_data: repeated StringStringEntryProto
}
LOCATION = b"location"


def external_locations(path: Path) -> list[str]:
    """Every external-data location the graph at `path` names; ValueError if it is not a readable ModelProto."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            # the key is stored as plain bytes, so a graph without it has no external data (the common case)
            if data.find(LOCATION) < 0:
                return []
            return _walk(data)


def _walk(data) -> list[str]:
    locations, todo = [], [(MODEL, 0, len(data))]
    while todo:
        message, begin, end = todo.pop()
        entry = {}
        for number, value in _fields(data, begin, end):
            if message == ENTRY:
                entry[number] = value
            elif number in FIELDS[message] and isinstance(value, tuple):
                todo.append((FIELDS[message][number], *value))
        if message == ENTRY and entry.get(1) and data[slice(*entry[1])] == LOCATION:
            value = entry.get(2, (0, 0))
            locations.append(bytes(data[slice(*value)]).decode("utf-8"))
    return locations


def _fields(data, pos: int, end: int):
    """(field number, (begin, end) of a length-delimited value, or None) for each field in data[pos:end]."""
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        value = None
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if pos >= end:
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("protobuf varint longer than 64 bits")
