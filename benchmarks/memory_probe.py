"""Run in a fresh process: resident memory of serving one artifact. Prints one JSON line.

    python -m benchmarks.memory_probe ARTIFACT
"""

from __future__ import annotations

import json
import sys

import numpy as np


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(artifact: str) -> None:
    from spexport.runtime import load

    before = rss_bytes()
    model = load(artifact)
    loaded = rss_bytes()
    model.logits(np.arange(16)[None] % model.info.vocab_size, task=model.tasks[0])
    served = rss_bytes()
    print(json.dumps({"tasks": len(model.tasks), "rss_before": before, "rss_loaded": loaded, "rss_served": served}))


if __name__ == "__main__":
    main(sys.argv[1])
