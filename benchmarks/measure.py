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


def generation(engine, ids: np.ndarray, tasks: list[str], new_tokens: int) -> Callable[[], dict]:
    """A case: TTFT (a one-token generate) and decode speed (the extra time of `new_tokens` more)."""
    def run() -> dict:
        start = time.perf_counter()
        engine.generate(ids, tasks, 1)
        ttft = time.perf_counter() - start
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
