"""onnxruntime-genai in a process of its own (run by edge_speed.py with the Python of a venv that has the release
under test): loads each model folder named on the command line, then answers one JSON line per request on stdin,
`{"model": i, "ids": [...], "new_tokens": n}`, with `{"ms_per_token": ...}`: the time of a 1 + n-token greedy
generate minus a 1-token one, over n, after an untimed 1-token one. Imports only onnxruntime_genai and numpy."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import onnxruntime_genai as og


def generate(model, ids: np.ndarray, new_tokens: int) -> float:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(ids[None].astype(np.int32))
    for _ in range(new_tokens):
        generator.generate_next_token()
    return time.perf_counter() - start


def main() -> None:
    folders = sys.argv[2:]
    models = [og.Model(folder) for folder in folders]  # threads: set in each genai_config.json by edge_speed.py
    print(json.dumps({"ready": og.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        model, ids, n = models[request["model"]], np.array(request["ids"], np.int64), request["new_tokens"]
        generate(model, ids, 1)  # untimed: the first call after another engine's case runs cold (edge_speed.py)
        first = generate(model, ids, 1)
        total = generate(model, ids, 1 + n)
        print(json.dumps({"ms_per_token": 1000 * max(total - first, 1e-9) / n, "ttft_ms": 1000 * first}), flush=True)


if __name__ == "__main__":
    main()
