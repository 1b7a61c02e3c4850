"""Calibration activations for `--quantize int4`: what each of the frozen model's Linear layers reads on a few
fixed texts, so GPTQ (passes/blockwise.py) can round every weight against the inputs it will meet.

The texts are not the drift report's prompts (export/drift.py): the drift report measures on text the
calibration never saw. Each Linear's inputs are kept once per distinct input tensor (q, k and v read the
same one) and found again from an ONNX weight by the bytes of its first or last output column, which are a
Linear's first or last row however the exporter packs (q|k|v) or scales (q) its weights.
"""

from __future__ import annotations

import numpy as np

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when movable type changed how books "
    "were made and who could read them.",
    "To make a simple tomato sauce, warm olive oil, add garlic, then crushed tomatoes, salt and a little sugar, "
    "and let it simmer for twenty minutes.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Please summarize the main causes of the First World War in three short paragraphs.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts.",
    "Dear team, the meeting moves to Thursday at 10:00; bring the quarterly numbers and your questions.",
    "What are three good exercises for strengthening the lower back, and how often should I do them?",
    "In 1969, Apollo 11 landed on the Moon; Neil Armstrong and Buzz Aldrin walked on its surface.",
]
NEW_TOKENS = 24  # each text's own greedy continuation joins it: activations of the model's own text too


class Activations:
    """Inputs of the model's Linear (and GPT-2 Conv1D) layers over the calibration rows: [tokens, in_features]
    float32 each."""

    def __init__(self):
        self.by_row: dict[bytes, np.ndarray] = {}

    def __len__(self) -> int:
        return len({id(x) for x in self.by_row.values()})

    def inputs_of(self, weight: np.ndarray) -> np.ndarray | None:
        """The inputs of the MatMul whose weight [K, N] this is, or None when no Linear's row matches."""
        for column in (weight[:, 0], weight[:, -1]):
            found = self.by_row.get(np.ascontiguousarray(column, np.float32).tobytes())
            if found is not None and found.shape[1] == weight.shape[0]:
                return found
        return None

    @classmethod
    def collect(cls, model, rows: list[np.ndarray]) -> Activations:
        """Run the torch `model` over each row (plus its greedy continuation) and keep every Linear's inputs."""
        import torch

        found, seen = cls(), {}
        parts: dict[int, list[np.ndarray]] = {}
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]

        def hook(module, args):
            if not collecting:
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:  # the first Linear to read a tensor keeps it; the others share it
                seen[key] = (id(module), x)  # holding x: its memory cannot pass to another tensor meanwhile
                parts.setdefault(id(module), []).append(x.reshape(-1, x.shape[-1]).float().numpy().copy())
            owners[id(module)] = seen[key][0]

        owners: dict[int, int] = {}
        collecting = False
        handles = [m.register_forward_pre_hook(hook) for m in linears]
        try:
            with torch.no_grad():
                for ids in rows:
                    tokens = torch.from_numpy(np.asarray(ids, np.int64))[None]
                    sequence = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                              max_new_tokens=NEW_TOKENS, pad_token_id=0)
                    seen.clear()
                    collecting = True
                    model(sequence)
                    collecting = False
        finally:
            seen.clear()
            for handle in handles:
                handle.remove()
        stacked = {owner: np.concatenate(chunks) for owner, chunks in parts.items()}
        for module in linears:
            inputs = stacked.get(owners.get(id(module)))
            if inputs is None:
                continue
            weight = module.weight.detach().float().numpy()
            if not isinstance(module, torch.nn.Linear):  # GPT-2's Conv1D keeps its weight as [in, out]
                weight = weight.T
            for row in (weight[0], weight[-1]):
                found.by_row[np.ascontiguousarray(row).tobytes()] = inputs
        return found


def rows_of(text, vocab_size: int, max_positions: int, seed: int = 0) -> list[np.ndarray]:
    """The calibration texts as token ids (a drift.TextEncoder: a user turn through the chat template when
    the model has one), or fixed random ids without a tokenizer; each leaves room for its continuation."""
    longest = max(1, max_positions - NEW_TOKENS)
    if text is None or not text.available:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab_size, min(longest, 32), dtype=np.int64) for _ in TEXTS]
    return [np.array(text.ids(t)[-longest:], np.int64) for t in TEXTS]
