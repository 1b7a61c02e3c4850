"""Every decoder model type gets a directly written graph (export/decoder/layouts.py for the Llama-style
layers, direct_gpt2.py, direct_opt.py, direct_neox.py, direct_bloom.py for the others), and it
computes what the trace of the same model computes: logits and every layer's present, with left
padding, a past, one new token and several. The tiny models are tests/builders.py's, each with its
family's distinguishing feature switched on (Gemma 2's sliding window shorter than the inputs), with
weights large enough that a difference would show. PEFT parity of the same types is tests/test_parity.py's.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from test_direct import _feed

sys.path.insert(0, str(Path(__file__).parents[1]))
from builders import FAMILIES  # noqa: E402

from spexport.export.common import quiet_tracing  # noqa: E402
from spexport.export.decoder.direct import MODEL_TYPES, NEEDS_TRANSFORMERS_5, builds, written_types  # noqa: E402
from spexport.export.decoder.graph import export_decoder  # noqa: E402
from spexport.families import DECODER, model_info  # noqa: E402

WRITTEN = sorted(set(written_types()) - {"llama", "mistral", "qwen2"})  # those three: test_direct.py
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
CASES = [([0, 3], 0, 6), ([2, 0], 4, 3), ([0, 5], 7, 1), ([1, 0, 2], 9, 1)]
# per layer: QKV MatMul, Split, 2 RotaryEmbedding, Attention, o_proj, 2 skip norms, 3 MLP MatMuls, SiLU (2), Mul;
# Qwen3's per-head q/k norms add 2 Reshapes and a norm each, OLMo 2's q/k and post-norms 4, Gemma's GeLU is one
# kernel, Gemma 2 adds 2 post-norms, Phi-3 splits one gate_up MatMul where Llama has two
LLAMA_LAYER = 14
EXTRA_PER_LAYER = {"qwen3": 6, "olmo2": 4, "gemma": -1, "gemma2": 1, "granite": 0, "phi3": 0}
# GPT-2: QKV MatMul and Add, Split, Attention, o_proj, 2 skip norms, 2 MLP MatMuls, FastGelu
GPT2_LAYER = 10
# OPT: GPT-2's with ReLU for FastGelu and the fc1 bias's Add
OPT_LAYER = 11
# GPT-NeoX: QKV MatMul and Add, Split, 2 RotaryEmbedding, Attention, dense, LayerNorm, 2 MatMuls, BiasGelu, Add,
# one skip norm
NEOX_LAYER = 13
# BLOOM: as GPT-2 (its ALiBi lives in the shared bias)
BLOOM_LAYER = 10


def _model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)  # logits of a few units
    return model


@pytest.fixture(scope="module", params=WRITTEN)
def exported(request, tmp_path_factory):
    import onnxruntime as ort

    model = _model(request.param)
    info = model_info(model.config, None)
    folder = tmp_path_factory.mktemp(request.param)
    sessions = {}
    with quiet_tracing():
        for kind in ("direct", "traced"):
            path = folder / kind / "model.onnx"
            path.parent.mkdir()
            core = export_decoder(model, info, path, direct=kind == "direct")
            assert core.written == (kind == "direct") and bool(core.fused) == core.written
            sessions[kind] = ort.InferenceSession(str(path))
    return request.param, info, sessions, folder / "direct" / "model.onnx"


@pytest.mark.parametrize("padding,past,steps", CASES, ids=["padded-prompt", "padded-prompt-after-past", "decode",
                                                           "decode-3-rows-past-beyond-window"])
def test_written_graph_computes_what_the_trace_computes(exported, padding, past, steps):
    family, info, sessions, _ = exported
    feed = _feed(info, np.random.default_rng(1), padding, past, steps)
    # the tracer prunes an unread position_ids (BLOOM's ALiBi reads the mask), build.py puts it back
    direct, traced = (sessions[kind].run(None, {i.name: feed[i.name] for i in sessions[kind].get_inputs()})
                      for kind in ("direct", "traced"))
    real = feed["attention_mask"][:, past:].astype(bool)  # padded queries' outputs are never read
    assert np.abs(traced[0][real]).max() > 1, family  # differences below would show
    np.testing.assert_allclose(direct[0][real], traced[0][real], atol=2e-4, rtol=1e-4)
    for got, want in zip(direct[1:], traced[1:]):
        kept = feed["attention_mask"].astype(bool)[:, None, :, None].repeat(got.shape[1], 1)
        assert got.shape == want.shape
        np.testing.assert_allclose(got * kept, want * kept, atol=2e-4, rtol=1e-4)


def test_a_written_type_gets_the_written_graph(exported):
    """Each layer is the fused one: one Attention, two RotaryEmbedding and its layout's few extra nodes."""
    family, info, _, path = exported
    nodes = onnx.load(path, load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    if family in ("gpt2", "opt", "gpt_neox", "bloom"):
        assert ops.count("Attention") == info.num_layers
        prefix, per_layer = {"gpt2": ("transformer.h.", GPT2_LAYER), "opt": ("decoder.layers.", OPT_LAYER),
                             "gpt_neox": ("gpt_neox.layers.", NEOX_LAYER),
                             "bloom": ("transformer.h.", BLOOM_LAYER)}[family]
        assert len([n for n in nodes if n.name.startswith(prefix)]) == info.num_layers * per_layer
        return
    layers = [n for n in nodes if n.name.startswith("model.layers.")]
    assert ops.count("Attention") == ops.count("RotaryEmbedding") / 2 == info.num_layers
    # the last layer's final skip norm is model.norm; a first input norm comes before layer 0 except in OLMo 2
    assert len(layers) == info.num_layers * (LLAMA_LAYER + EXTRA_PER_LAYER[family]) - (family == "olmo2")


@pytest.mark.parametrize("family", WRITTEN)
def test_builders_models_are_written(family):
    model = FAMILIES[family]()
    assert builds(model, model_info(model.config, None))


def test_every_decoder_type_has_a_writer():
    """A model type added to the decoder family without a writer would be traced; list it here when that is
    meant, with the reason."""
    assert DECODER.model_types <= set(MODEL_TYPES)


@pytest.mark.parametrize("family,change,why", [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "attention scaled by the layer's index"),
    ("opt", {"do_layer_norm_before": False}, "norms after the blocks (OPT-350m)"),
    ("gpt_neox", {"use_parallel_residual": False}, "a sequential residual"),
    ("phi3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}} if TRANSFORMERS_4 else
     {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope tables that change with the length"),
    ("qwen3", {"sliding_window": 8, "layer_types": ["sliding_attention"] * 2}, "a sliding window outside Gemma 2"),
])
def test_configs_a_writer_does_not_describe_are_traced(family, change, why):
    config = FAMILIES[family]().config
    for key, value in change.items():
        setattr(config, key, value)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    assert not builds(model, model_info(model.config, None)), why


@pytest.mark.parametrize("family", sorted(NEEDS_TRANSFORMERS_5))
def test_types_written_from_transformers_5_modules_are_traced_under_4(family):
    model = FAMILIES[family]()
    assert builds(model, model_info(model.config, None)) is not TRANSFORMERS_4
