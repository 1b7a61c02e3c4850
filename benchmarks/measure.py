"""Timing, memory bandwidth and resident memory, measured the same way for every engine.

Comparators are interleaved: each repetition runs every case once, in an order that rotates from
one repetition to the next, so a noisy neighbour slows all of them alike. Figures are medians, and
ratios are taken pair by pair within a repetition before their median is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np


def threads() -> int:
    """Cores this process may run on (the container's 2 here); every engine gets this many threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def interleaved(cases: dict[str, Callable[[], dict]], reps: int) -> dict[str, list[dict]]:
    """Run each case `reps` times, rotating the order; each call returns a dict of figures."""
    names = list(cases)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            runs[name].append(cases[name]())
    return runs


def median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over repetitions of a[key] / b[key], each ratio within one repetition."""
    return float(np.median([x[key] / y[key] for x, y in zip(a, b)]))


def generation(engine, ids: np.ndarray, tasks: list[str], new_tokens: int, ttft_calls: int = 3) -> Callable[[], dict]:
    """A case: TTFT (the median of `ttft_calls` one-token generates: one call is short enough for a
    noisy neighbour to double it) and decode speed (the extra time of `new_tokens` more)."""
    def run() -> dict:
        calls = []
        for _ in range(ttft_calls):
            start = time.perf_counter()
            engine.generate(ids, tasks, 1)
            calls.append(time.perf_counter() - start)
        ttft = float(np.median(calls))
        start = time.perf_counter()
        engine.generate(ids, tasks, 1 + new_tokens)
        total = time.perf_counter() - start
        step = max(total - ttft, 1e-9) / new_tokens
        return {"ttft_s": ttft, "step_s": step, "tokens_per_s": len(ids) / step}
    return run


def bandwidth(megabytes: int = 512, reps: int = 5) -> dict:
    """Memory bandwidth with numpy, several ways; `best_gbs` (the fastest) sets the floor.

    The arrays are far larger than the last-level cache, so every pass goes to DRAM. A copy moves
    its bytes twice (read and write); a two-array dot product reads both.
    """
    a = np.ones(megabytes * 2**20 // 4, np.float32)
    b = np.ones_like(a)
    halves_a, halves_b = np.split(a, 2), np.split(b, 2)

    def two_threads(fn):
        workers = [threading.Thread(target=fn, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    kernels = {
        "copy (read+write)": (2 * a.nbytes, lambda: np.copyto(b, a)),
        "copy, 2 threads": (2 * a.nbytes, lambda: two_threads(lambda i: np.copyto(halves_b[i], halves_a[i]))),
        "dot of two arrays (BLAS)": (2 * a.nbytes, lambda: a.dot(b)),
        "sum, 2 threads": (a.nbytes, lambda: two_threads(lambda i: halves_a[i].sum())),
    }
    rates = {}
    for name, (moved, fn) in kernels.items():
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rates[name] = moved / float(np.median(times)) / 1e9
    return {"gbs": rates, "best_gbs": max(rates.values())}


def resident_memory(artifact: Path) -> dict:
    """RSS of a fresh process after importing the runtime, after load(), and after one request."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", str(artifact)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_ceiling(graph_path: Path, threads: int, reps: int = 10) -> Callable[[], dict]:
    """A case: ONNX Runtime's own best at batch 1, every weight matrix of `graph_path` read once.

    The graph holds one MatMul per weight (the shapes of the artifact's MatMul/Gemm weights, random
    values, fed a [1, K] row each) and nothing else, so its run time is what ONNX Runtime's matrix
    kernels need to stream the weights on this machine: a decode step cannot beat it. Each call
    returns the median of `reps` runs as `step_s`.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(graph_path, load_external_data=False)
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    transposed = {n.output[0]: dims[n.input[0]][::-1] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in dims and len(dims[n.input[0]]) == 2}
    shapes = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            shape = dims.get(node.input[1]) or transposed.get(node.input[1])
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            if shape and len(shape) == 2:
                shapes.append(shape[::-1] if trans_b else shape)
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for i, (k, n) in enumerate(shapes):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n), np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{k}", f"w{i}"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]))
    widths = sorted({k for k, _ in shapes})
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k])
                                                 for k in widths], outputs, inits)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in widths}
    session.run(None, feeds)
    weight_bytes = int(sum(4 * k * n for k, n in shapes))

    def run() -> dict:
        return {**step_seconds(lambda: session.run(None, feeds), reps), "matrices": len(shapes),
                "bytes": weight_bytes}
    return run


def step_seconds(step, reps: int) -> dict:
    """The median (`step_s`) and the shortest (`best_s`) wall time of `reps` calls of `step`: on a shared host the
    shortest is the steadiest estimate of a few-millisecond step's own cost."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times)), "best_s": float(np.min(times))}
