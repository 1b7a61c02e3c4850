"""Calibration for GPTQ: a few fixed texts through the artifact's own tokenizer (as chat turns where
the model has a chat template; fixed random token ids when there is no tokenizer), run through the
float32 graph to collect the activations each weight multiplies. Nothing is downloaded; the texts
differ from the drift report's prompts (drift.py), so the report does not measure the quantizer on
what it was fitted to."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from wine making. Books became cheaper, literacy spread, "
    "and ideas travelled faster than ever before across Europe.",
    "To make a simple tomato sauce, warm two tablespoons of olive oil in a pan, add a chopped onion and a clove of "
    "garlic, and cook until soft. Stir in a can of crushed tomatoes, a pinch of salt and some basil, then simmer "
    "for twenty minutes.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "print([fibonacci(i) for i in range(10)])",
    "Photosynthesis, respiration and the water cycle are taught early in school because they explain how energy and "
    "matter move through living things. Plants capture light, animals eat plants, and decomposers return nutrients "
    "to the soil.",
    "Dear team, thank you for your hard work this quarter. Sales grew by 12 percent, customer complaints fell, and "
    "we shipped the new mobile app on time. Next month we will focus on reliability and documentation.",
    "Q: What is 17 multiplied by 3?\nA: 17 times 3 is 51.\nQ: Which planet is closest to the sun?\nA: Mercury is "
    "the closest planet to the sun.",
    "The mountain trail climbs steeply through pine forest before opening onto a wide ridge. On clear days hikers "
    "can see three lakes, a distant glacier and the small village where the journey began that morning.",
    "In economics, inflation describes a general rise in prices over time. Central banks raise interest rates to "
    "slow it down, which makes borrowing more expensive and encourages saving instead of spending.",
]


def token_rows(text, texts: list[str], vocab_size: int, longest: int, seed: int = 0) -> list[np.ndarray]:
    """Each text's token ids (at most `longest`) from `text` (drift.TextEncoder: a chat template's user turn
    where the model has one), or, without a tokenizer, as many rows of fixed random ids."""
    if text is None or not text.available:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab_size, min(longest, 32), dtype=np.int64) for _ in texts]
    rows = [np.array(text.ids(t, reply_follows=False)[:longest], np.int64) for t in texts]
    return [row for row in rows if len(row)]


def activations(graph: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The float32 graph's input to every MatMul or Gemm with a constant weight, over `feeds`, by value name:
    [rows, K] with every row of every feed (what GPTQ's H = 2·XᵀX/rows is made of)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(graph)
    constants = {init.name for init in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node
                  if node.op_type == "Identity" and node.input[0] in constants}  # optimum's shared initializers
    names = sorted({node.input[0] for node in model.graph.node
                    if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in constants})
    outputs = {out.name for out in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in names if name not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "calibrate.onnx"
        onnx.save(model, path, save_as_external_data=True, location="calibrate.onnx.data")
        del model
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                collected[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(values) for name, values in collected.items()}
