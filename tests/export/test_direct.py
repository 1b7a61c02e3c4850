"""export/decoder/direct.py writes the graph a trace of the same model gives, for the model types it
takes, and leaves every other model to the tracer.

The parity fixtures compare the exported Llama, Qwen2 and Mistral with PeftModel; these tests add a
Llama with biases on every projection and the cases a request meets: left padding, a past,
one new token and several. The traced graph is the model's own forward (graph.py), exactly."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from spexport.export.common import quiet_tracing
from spexport.export.decoder.direct import builds
from spexport.export.decoder.graph import export_decoder
from spexport.families import model_info

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)  # logits of a few units


def _info(model):
    return model_info(model.config, None)


def _sessions(model, folder):
    torch.manual_seed(0)
    info = _info(model)
    paths = {kind: folder / kind / "model.onnx" for kind in ("direct", "traced")}
    with quiet_tracing():
        for kind, path in paths.items():
            path.parent.mkdir()
            core = export_decoder(model, info, path, direct=kind == "direct")
            assert core.written == (kind == "direct") and bool(core.fused) == core.written
    return info, {kind: ort.InferenceSession(str(path)) for kind, path in paths.items()}


def _feed(info, rng, padding: list[int], past: int, steps: int) -> dict[str, np.ndarray]:
    rows = len(padding)
    mask = np.ones((rows, past + steps), np.int64)
    for row, pad in enumerate(padding):
        mask[row, :pad] = 0
    feed = {"input_ids": rng.integers(0, info.vocab_size, (rows, steps)), "attention_mask": mask,
            "position_ids": np.clip(mask.cumsum(1) - 1, 0, None)[:, past:]}
    for layer in range(info.num_layers):
        for which in ("key", "value"):
            feed[f"past_key_values.{layer}.{which}"] = rng.standard_normal(
                (rows, info.num_kv_heads, past, info.head_dim)).astype(np.float32)
    return feed


@pytest.mark.parametrize("padding,past,steps", [([0], 0, 5), ([0, 3], 0, 6), ([2, 0], 4, 3), ([0, 5], 7, 1),
                                                ([1, 0, 2], 3, 1)],
                         ids=["prompt", "padded-prompt", "padded-prompt-after-past", "decode", "decode-3-rows"])
def test_direct_graph_computes_what_the_trace_computes(tmp_path, padding, past, steps):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True, rope_theta=500.0)).eval()
    info, sessions = _sessions(model, tmp_path)
    feed = _feed(info, np.random.default_rng(1), padding, past, steps)
    direct, traced = (sessions[kind].run(None, feed) for kind in ("direct", "traced"))
    real = feed["attention_mask"][:, past:].astype(bool)  # padded queries' outputs are never read
    assert np.abs(traced[0][real]).max() > 1  # differences below would show
    np.testing.assert_allclose(direct[0][real], traced[0][real], atol=1e-4)
    for got, want in zip(direct[1:], traced[1:]):
        kept = feed["attention_mask"].astype(bool)[:, None, :, None].repeat(got.shape[1], 1)
        np.testing.assert_allclose(got * kept, want * kept, atol=1e-4)
        assert got.shape == want.shape


@pytest.mark.parametrize("make,why", [
    (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
     "rope tables that change with the length"),
    (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=8)), "a sliding window"),
    (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, hidden_act="gelu")), "another activation"),
])
def test_other_models_are_traced(make, why):
    model = make()
    assert not builds(model, _info(model)), why


def test_the_plain_llama_layer_is_written_directly():
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    assert builds(model, _info(model))


def test_the_writer_choice_writes_traces_or_refuses():
    """auto writes what direct.py knows when fused operators are wanted; trace always traces; direct refuses a
    model whose layers it does not know, in one line, rather than tracing it silently."""
    from spexport.errors import ModelError
    from spexport.export.common import ExportOptions
    from spexport.export.decoder import writes_directly

    plain, other = LlamaForCausalLM(LlamaConfig(**SMALL)), LlamaForCausalLM(LlamaConfig(**SMALL, hidden_act="gelu"))
    assert writes_directly(ExportOptions(), plain, _info(plain))
    assert not writes_directly(ExportOptions(optimize=False), plain, _info(plain))
    assert not writes_directly(ExportOptions(writer="trace"), plain, _info(plain))
    assert not writes_directly(ExportOptions(), other, _info(other))
    with pytest.raises(ModelError, match="^spexport does not write llama graphs like this one directly"):
        writes_directly(ExportOptions(writer="direct"), other, _info(other))
