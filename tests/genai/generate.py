"""Greedy generation with onnxruntime-genai over a spexport artifact, one task's adapter file active.

Runs in onnxruntime-genai's own environment (it needs no spexport): argv is the artifact folder, then a
JSON list of [task, max_new_tokens, token ids]; prints a JSON list of each full sequence.
"""

import json
import sys

import numpy as np
import onnxruntime_genai as og

folder, requests = sys.argv[1], json.loads(sys.argv[2])
model = og.Model(folder)
adapters = og.Adapters(model)
loaded, out = set(), []
for task, new_tokens, ids in requests:
    if task not in loaded:
        adapters.load(f"{folder}/adapters/{task.replace('/', '%2F')}.onnx_adapter", task)
        loaded.add(task)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, task)
    generator.append_tokens(np.array([ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    out.append([int(t) for t in generator.get_sequence(0)])
print(json.dumps(out))
