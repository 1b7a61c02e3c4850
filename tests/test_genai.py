"""onnxruntime-genai opens a decoder artifact (its genai_config.json) and, with a task's adapter file active,
generates exactly the tokens spexport.runtime generates for that task, added tasks included.

genai runs in an environment of its own (its onnxruntime may differ from this one's): the Python named by
$SPEXPORT_GENAI_PYTHON, else .venv-genai/bin/python in the repository (.ci/run makes it). Without one the
test is skipped, and says how to make it.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from builders import build_adapter

from spexport.runtime import load
from spexport.tasks import add_tasks

ROOT = Path(__file__).parents[1]
GENAI_PYTHON = Path(os.environ.get("SPEXPORT_GENAI_PYTHON") or ROOT / ".venv-genai" / "bin" / "python")


@pytest.fixture(scope="module")
def genai_python():
    if not GENAI_PYTHON.is_file():
        missing = (pytest.fail if os.environ.get("SPEXPORT_REQUIRE_GENAI") else pytest.skip)
        missing(f"no onnxruntime-genai environment at {GENAI_PYTHON}: python3 -m venv .venv-genai && "
                ".venv-genai/bin/pip install onnxruntime-genai numpy (or set SPEXPORT_GENAI_PYTHON)")
    return GENAI_PYTHON


def test_genai_generates_the_runtimes_tokens_per_task(genai_python, tiny_llama, tmp_path):
    artifact = tmp_path / "artifact"
    shutil.copytree(tiny_llama["artifact"], artifact)
    add_tasks(artifact, [("topic/mlp", build_adapter(tiny_llama["model"], "p_tuning_mlp", tmp_path / "mlp", 3, 7))])
    m = load(artifact)
    prompts = [[5, 9, 14, 22, 40, 7], [11], list(range(4, 40))]
    requests = [[task, 12, ids] for task in m.tasks for ids in prompts]
    done = subprocess.run([str(genai_python), str(ROOT / "tests" / "genai" / "generate.py"), str(artifact),
                           json.dumps(requests)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    for (task, new_tokens, ids), tokens in zip(requests, got):
        expected = m.generate(np.array([ids]), task=task, max_new_tokens=new_tokens)[0].tolist()
        assert tokens == expected, task
    assert len({tuple(t) for t in got[::len(prompts)]}) == len(m.tasks)  # the tasks really differ
