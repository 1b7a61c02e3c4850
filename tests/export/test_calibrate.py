"""calibrate.Activations on a tiny BERT body: what GPTQ reads for each weight."""

import numpy as np
import torch
from transformers import BertConfig, BertModel

from spexport.export import calibrate


def _body() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


def test_an_encoders_rows_run_alone_and_behind_each_prompt():
    """Without a continuation each row runs as given, and again behind every task's virtual tokens: the rows
    of a weight's inputs are its tokens, once per prompt more (q, k and v share theirs)."""
    body, rows = _body(), [np.arange(1, 8), np.arange(10, 15)]
    prompt = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    alone = calibrate.Activations.collect(body, rows, continued=False)
    prompted = calibrate.Activations.collect(body, rows, continued=False, prompts=(prompt,))
    query = body.encoder.layer[0].attention.self.query.weight.detach().numpy().T  # ONNX's [K, N]
    key = body.encoder.layer[0].attention.self.key.weight.detach().numpy().T
    assert alone.inputs_of(query).shape == (7 + 5, 32)
    assert prompted.inputs_of(query).shape == (7 + 5 + (3 + 7) + (3 + 5), 32)
    assert prompted.inputs_of(key) is prompted.inputs_of(query)
    down = body.encoder.layer[0].output.dense.weight.detach().numpy().T
    assert prompted.inputs_of(down).shape == (30, 64)
    assert alone.inputs_of(np.zeros((32, 4), np.float32)) is None  # no Linear's row: round to nearest
