"""The runtime imports and runs where torch, transformers, peft and optimum cannot be imported."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BLOCKED = ("torch", "transformers", "peft", "optimum", "safetensors")

PRELUDE = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
from spexport.runtime import load
m = load(sys.argv[1])
result = {{}}
"""
REPORT = """
result["heavy"] = [n for n in sys.modules if n.split('.')[0] in {blocked!r} and sys.modules[n]]
print(json.dumps(result))
"""


def run_without_torch(artifact: Path, body: str) -> dict:
    """Run `body` with `m = load(artifact)` in a Python that cannot import torch and friends; `body`
    fills the dict `result`, which comes back (with "heavy": the blocked modules that got imported)."""
    script = PRELUDE.format(blocked=BLOCKED) + body + REPORT.format(blocked=BLOCKED)
    done = subprocess.run([sys.executable, "-c", script, str(artifact)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_runtime_without_torch(built, runtime_model):
    result = run_without_torch(built["artifact"], """
ids = np.array([[5, 9, 14, 22, 40, 7]], np.int64)
result.update({"tasks": m.tasks,
               "logits": m.logits(ids, task=m.tasks[0]).tolist(),
               "tokens": m.generate(ids, task=m.tasks[-1], max_new_tokens=5).tolist(),
               "text": m.generate_text(["the cat"], task=m.tasks[0], max_new_tokens=3)})
""")
    ids = np.array([[5, 9, 14, 22, 40, 7]], np.int64)
    assert result["heavy"] == []
    assert result["tasks"] == runtime_model.tasks
    np.testing.assert_allclose(result["logits"], runtime_model.logits(ids, task=runtime_model.tasks[0]), atol=1e-6)
    assert result["tokens"] == runtime_model.generate(ids, task=runtime_model.tasks[-1], max_new_tokens=5).tolist()
    assert isinstance(result["text"][0], str)
