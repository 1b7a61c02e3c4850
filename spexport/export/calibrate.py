"""Calibration activations for `--quantize int8` / `int4`: what each of the frozen model's Linear layers (an
encoder's body's) reads on fixed texts, so GPTQ (passes/blockwise.py) can round every weight against the
inputs it will meet. A few hundred tokens are too few: GPTQ then fits them and rounds worse than round to
nearest on other text, hence 32 texts.

The texts are not the drift report's prompts (export/drift.py): the drift report measures on text the
calibration never saw. Each Linear's inputs are kept once per distinct input tensor (q, k and v read the
same one) and found again from an ONNX weight by the bytes of its first or last output column, which are a
Linear's first or last row however the exporter packs (q|k|v) or scales (q) its weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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
    "I bought these headphones last month. The sound is clear and the battery lasts all week, but the ear pads "
    "started to peel after a few days, which is disappointing for the price.",
    "The museum was crowded on Saturday morning, so we went to the small café first, had coffee and pastries, "
    "and came back after lunch when the galleries were almost empty.",
    "Q: How many minutes are there in a day?\nA: There are 24 hours in a day and 60 minutes in an hour, so "
    "there are 24 × 60 = 1,440 minutes.",
    "The council voted seven to two on Tuesday to build a new bridge across the river; construction should "
    "start next spring and cost about 45 million dollars.",
    "She opened the old wooden box slowly. Inside were letters tied with a red ribbon, a silver key, and a "
    "photograph of a house she had never seen before.",
    "Our support team is available Monday to Friday from 9 a.m. to 5 p.m. If your order arrived damaged, "
    "reply to this email with a photo and we will send a replacement.",
    "Terrible experience. The room smelled of smoke, the air conditioning rattled all night, and nobody at "
    "the front desk seemed to care when we complained.",
    "Absolutely loved it! The staff were warm and attentive, the view from the balcony was stunning, and "
    "breakfast was the best we had on the whole trip.",
    "import numpy as np\n\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\nprint(y.mean(), y.std())\n",
    "Water boils at 100 degrees Celsius at sea level, but at higher altitudes the air pressure is lower, so it "
    "boils at a lower temperature and food takes longer to cook.",
    "John Smith, a 42-year-old teacher from Boston, won the regional chess tournament after defeating Maria "
    "Lopez of Chicago in the final round on Sunday evening.",
    "To reset your password, open Settings, choose Account, tap 'Forgot password', and follow the link we send "
    "to the address on file. The link expires after one hour.",
    "The novel follows two sisters who inherit a failing vineyard in northern Italy and must decide whether to "
    "sell it or risk everything to save the family business.",
    "Why do cats purr? Scientists think purring helps them communicate, calm themselves, and possibly even "
    "heal, since the vibrations fall in a range that may help bones and tissue.",
    "Ingredients: two cups of flour, one teaspoon of baking soda, half a cup of butter, one egg, a pinch of salt, "
    "and a cup of chocolate chips. Bake at 180 °C for twelve minutes.",
    "The stock market fell sharply on Monday as investors worried about rising interest rates, with technology "
    "shares leading the decline and oil prices climbing again.",
    "Hey, are we still on for dinner tonight? I can pick you up around seven, unless you'd rather meet at the "
    "restaurant. Let me know!",
    "The mitochondria produce most of the energy a cell needs; they have their own DNA, which is inherited "
    "from the mother and is used to trace human ancestry.",
    "It was okay. Not great, not bad. The first half dragged, the ending was predictable, but the music was "
    "good and the lead actor did what he could with the script.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON customers.id = orders.customer_id GROUP BY "
    "name ORDER BY orders DESC LIMIT 10;",
    "Climate scientists warn that glaciers in the Alps could lose half of their remaining ice by 2050, changing "
    "river flows, tourism and farming across the region.",
    "Paris, Berlin, Madrid, Rome, Tokyo, Nairobi, Buenos Aires and Sydney are capitals or major cities on five "
    "different continents.",
    "The delivery was two weeks late, the box was crushed, and one of the chairs was missing a leg. I asked for "
    "a refund and I am still waiting for an answer.",
    "After the rain stopped, the children ran outside to jump in the puddles, while their grandfather watched "
    "from the porch with a cup of tea and a smile.",
]
NEW_TOKENS = 24  # each text's own greedy continuation joins it: activations of the model's own text too


class Activations:
    """Inputs of the model's Linear (and GPT-2 Conv1D) layers over the calibration rows: [tokens, in_features]
    float32 each, kept in files and read back one weight's at a time (a 1B model's are 4 GB: held in memory
    beside the model, they would raise the export's peak by as much)."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="spexport-calibration-")
        self.by_row: dict[bytes, tuple[Path, int]] = {}  # a weight's first or last row -> its inputs' file, width
        self._last: tuple[Path, np.ndarray] | None = None  # q, k and v read one file in turn: it is read once

    def __len__(self) -> int:
        return len(set(self.by_row.values()))

    def inputs_of(self, weight: np.ndarray) -> np.ndarray | None:
        """The inputs of the MatMul whose weight [K, N] this is, or None when no Linear's row matches."""
        for column in (weight[:, 0], weight[:, -1]):
            path, width = self.by_row.get(np.ascontiguousarray(column, np.float32).tobytes(), (None, 0))
            if path is not None and width == weight.shape[0]:
                if self._last is None or self._last[0] != path:
                    self._last = None  # the previous inputs go before the next are read
                    self._last = path, np.fromfile(path, np.float32).reshape(-1, width)
                return self._last[1]
        return None

    @classmethod
    def collect(cls, model, rows: list[np.ndarray], continued: bool = True, prompts: tuple = ()) -> Activations:
        """Run the torch `model` over each row (plus its greedy continuation where `continued`: a generative
        model) and keep every Linear's inputs. Each of `prompts` ([n_virtual, hidden] embeddings) also runs
        ahead of every row: an encoder's body computes its virtual tokens too."""
        import torch

        found, seen = cls(), {}
        files: dict[int, Path] = {}
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]

        def hook(module, args):
            if not collecting:
                return
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:  # the first Linear to read a tensor keeps it; the others share it
                seen[key] = (id(module), x)  # holding x: its memory cannot pass to another tensor meanwhile
                path = files.setdefault(id(module), Path(found._folder.name) / f"{len(files)}.f32")
                with open(path, "ab") as file:
                    x.reshape(-1, x.shape[-1]).float().numpy().tofile(file)
            owners[id(module)] = seen[key][0]

        def run(**inputs):
            nonlocal collecting
            seen.clear()
            collecting = True
            model(**inputs)
            collecting = False

        owners: dict[int, int] = {}
        collecting = False
        handles = [m.register_forward_pre_hook(hook) for m in linears]
        try:
            with torch.no_grad():
                for ids in rows:
                    tokens = torch.from_numpy(np.asarray(ids, np.int64))[None]
                    sequence = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                              max_new_tokens=NEW_TOKENS, pad_token_id=0) if continued else tokens
                    run(input_ids=sequence)
                    embedded = model.get_input_embeddings()(sequence) if prompts else None
                    for prompt in prompts:
                        virtual = torch.from_numpy(np.asarray(prompt, np.float32))[None].to(embedded.dtype)
                        run(inputs_embeds=torch.cat([virtual, embedded], dim=1))
        finally:
            seen.clear()
            for handle in handles:
                handle.remove()
        for module in linears:
            inputs = files.get(owners.get(id(module)))
            if inputs is None:
                continue
            weight = module.weight.detach().float().numpy()
            if not isinstance(module, torch.nn.Linear):  # GPT-2's Conv1D keeps its weight as [in, out]
                weight = weight.T
            for row in (weight[0], weight[-1]):
                found.by_row[np.ascontiguousarray(row).tobytes()] = inputs, weight.shape[1]
        return found


def rows_of(text, vocab_size: int, max_positions: int, seed: int = 0) -> list[np.ndarray]:
    """The calibration texts as token ids (a drift.TextEncoder: a user turn through the chat template when
    the model has one), or fixed random ids without a tokenizer; each leaves room for its continuation."""
    longest = max(1, max_positions - NEW_TOKENS)
    if text is None or not text.available:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab_size, min(longest, 32), dtype=np.int64) for _ in TEXTS]
    return [np.array(text.ids(t)[-longest:], np.int64) for t in TEXTS]
