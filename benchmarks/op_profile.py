"""Where a decode step's time goes: ONNX Runtime's own profiler, summed per operator type.

    python -m benchmarks.op_profile GRAPH.onnx [--past N]

One decode step (batch 1, one new token, a past of N positions) is run `runs` times in a session with
profiling on (after one unprofiled warm-up run, whose events are left out); every node's kernel time
is summed per operator type and divided by the number of runs. Feeds are made from the graph's own
input shapes, so it profiles spexport's graph and onnxruntime-genai's alike: a symbolic dimension
named for the batch or the new tokens is 1, the past is N, the total (past + new) is N + 1, and any
other (spexport's prefix inputs, empty in a decode step) is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

TYPES = {1: np.float32, 7: np.int64, 6: np.int32, 10: np.float16}


def size(dim, past: int, batch: int = 1) -> int:
    if dim.dim_value or not dim.dim_param:
        return dim.dim_value
    name = dim.dim_param
    if name in ("batch_size", "batch"):
        return batch
    if name == "sequence_length":
        return 1
    if "+" in name or name.startswith("total"):
        return past + 1
    return past if "past" in name else 0


def feeds(graph_path: Path, past: int, batch: int = 1) -> dict[str, np.ndarray]:
    import onnx

    out = {}
    for value in onnx.load(graph_path, load_external_data=False).graph.input:
        shape = [size(d, past, batch) for d in value.type.tensor_type.shape.dim]
        dtype = TYPES[value.type.tensor_type.elem_type]
        if value.name == "logits_positions":  # the core graph's: the new token's logits, as generation asks
            out[value.name] = np.zeros([batch, 1], dtype)
        elif value.name == "position_ids":
            out[value.name] = np.full(shape, past, dtype)
        elif value.name in ("input_ids",):
            out[value.name] = np.full(shape, 42, dtype)
        elif np.issubdtype(dtype, np.integer):
            out[value.name] = np.ones(shape, dtype)
        else:
            out[value.name] = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(dtype)
    return out


def profile(graph_path: Path, past: int, threads: int, runs: int = 20, batch: int = 1) -> dict:
    """Per operator type: milliseconds per step, share of the step, kernels per step."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
        inputs = feeds(graph_path, past, batch)
        for _ in range(runs + 1):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    steps = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    first_end = steps[0]["ts"] + steps[0]["dur"]
    per_op, counts = defaultdict(float), defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] > first_end:
            op = event["args"]["op_name"]
            per_op[op] += event["dur"] / runs / 1e3
            counts[op] += 1
    step_ms = float(np.median([e["dur"] for e in steps[1:]])) / 1e3
    total = sum(per_op.values())
    ops = sorted(per_op, key=per_op.get, reverse=True)
    return {"past": past, "batch": batch, "step_ms": step_ms, "kernel_ms": total,
            "kernels": sum(counts.values()) // runs,
            "ops": [{"op": op, "ms": round(per_op[op], 3), "share": round(per_op[op] / total, 3),
                     "kernels": counts[op] // runs} for op in ops]}


def markdown(table: dict, rows: int = 12) -> str:
    lines = ["| operator | ms per step | share | kernels |", "|---|---|---|---|"]
    for entry in table["ops"][:rows]:
        lines.append(f"| {entry['op']} | {entry['ms']:.2f} | {entry['share']:.0%} | {entry['kernels']} |")
    rest = table["ops"][rows:]
    if rest:
        lines.append(f"| {len(rest)} others | {sum(e['ms'] for e in rest):.2f} | "
                     f"{sum(e['share'] for e in rest):.0%} | {sum(e['kernels'] for e in rest)} |")
    lines.append(f"| **kernels, total** | {table['kernel_ms']:.2f} | | {table['kernels']} |")
    lines.append(f"| **step (session.run)** | {table['step_ms']:.2f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("--past", type=int, default=80)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(markdown(profile(args.graph, args.past, args.threads, batch=args.batch)))


if __name__ == "__main__":
    main()
