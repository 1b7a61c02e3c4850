"""The in-place graph: load() runs it on the CPU with ONNX Runtime 1.32 or later (the core graph elsewhere), a
generation binds one buffer per layer's key and value as past and present, and the engine's buffers grow as
rows go on. Tokens and logits are the core graph's, which copies its past every step."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from spexport.artifact.ports import CORE_GRAPH, INPLACE_GRAPH
from spexport.runtime import load
from spexport.runtime.device import CPU, runs_inplace_cache
from spexport.runtime.engine import Engine
from spexport.runtime.rowbatch import RowBatch

IDS = np.array([[0, 0, 0, 5, 9, 14], [7, 3, 12, 22, 40, 7], [0, 8, 1, 33, 2, 9]], np.int64)
TASKS = ["pt", "prefix", "pt"]


@pytest.fixture(scope="module")
def models(tiny_llama):
    inplace = load(tiny_llama["artifact"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort, "__version__", "1.31.1")  # PyPI's onnxruntime-gpu as this is written
        core = load(tiny_llama["artifact"])
    return inplace, core


def test_the_cpu_runs_the_inplace_graph_and_an_older_runtime_or_a_gpu_the_core_graph(models):
    inplace, core = models
    assert inplace.step_graph().graph.name == INPLACE_GRAPH and inplace.step_graph().inplace
    assert core.step_graph().graph.name == CORE_GRAPH and not core.step_graph().inplace
    assert runs_inplace_cache([CPU])
    assert not runs_inplace_cache(["CUDAExecutionProvider", CPU])


@pytest.mark.parametrize("kwargs", [{}, {"do_sample": True, "seed": 3, "top_k": 20}, {"repetition_penalty": 1.3}],
                         ids=["greedy", "sampled", "penalized"])
def test_generate_gives_the_core_graphs_tokens(models, kwargs):
    inplace, core = models
    mask = (IDS != 0).astype(np.int64)
    want = core.generate(IDS, mask, task=TASKS, max_new_tokens=24, **kwargs)
    assert np.array_equal(inplace.generate(IDS, mask, task=TASKS, max_new_tokens=24, **kwargs), want)
    np.testing.assert_allclose(inplace.logits(IDS, mask, task=TASKS), core.logits(IDS, mask, task=TASKS),
                               atol=1e-5, rtol=1e-5)


def test_the_engines_buffers_grow_under_long_rows_with_drafts(models, monkeypatch):
    """Rows that join late and draft (prompt lookup: several slots a step, rejected ones masked out) outgrow the
    buffers the batch started with."""
    inplace, core = models
    grown = []
    real_grow = RowBatch._grow
    monkeypatch.setattr(RowBatch, "_grow", lambda batch, *args: grown.append(args) or real_grow(batch, *args))
    prompts = [[5, 9, 14, 5, 9, 14, 5, 9], [22, 40], [7, 3, 12, 7, 3, 12, 7]]
    answers = {}
    for name, model in (("inplace", inplace), ("core", core)):
        engine = Engine(model, background=False, prompt_lookup_num_tokens=3)
        requests = [engine.submit(prompts[0], "pt", max_new_tokens=45)]
        for _ in range(3):
            engine.step()
        requests += [engine.submit(p, t, max_new_tokens=45) for p, t in zip(prompts[1:], ("prefix", "pt"))]
        while engine.step():
            pass
        answers[name] = [request.collect().tokens for request in requests]
    assert answers["inplace"] == answers["core"]
    assert [len(tokens) for tokens in answers["inplace"]] == [45, 45, 45] and grown
