"""UseGroupQueryAttentionPass: each layer's Attention (with the QKV Split feeding it, where nothing comes
between) becomes one GroupQueryAttention that computes what the written graph computes, both with a past of
its own length and with one buffer per layer bound as past and present, which each step writes its slots into
(the in-place graph the Python runtime runs on the CPU).

Every directly written decoder type is checked, on builders.py's tiny models with heads 32 wide where the type
sets its own head size (ONNX Runtime's kernel takes multiples of 16), with padding, a past and several steps.
"""

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[1]))
from builders import FAMILIES  # noqa: E402
from test_direct import _feed  # noqa: E402

from spexport.export.common import quiet_tracing  # noqa: E402
from spexport.export.decoder.direct import written_types  # noqa: E402
from spexport.export.decoder.graph import export_decoder  # noqa: E402
from spexport.export.passes import UseGroupQueryAttentionPass  # noqa: E402
from spexport.export.passes.tag import fusions  # noqa: E402
from spexport.families import model_info  # noqa: E402

PACKED = {"gpt2", "opt", "bloom"}  # their Split feeds the attention directly (others rotate q and k first)
CASES = [([0, 3], 0, 6), ([2, 0], 4, 3), ([0, 5], 7, 1), ([1, 0, 2], 9, 1)]


def _model(family: str):
    torch.manual_seed(0)
    model = FAMILIES[family]()
    if getattr(model.config, "head_dim", None) == 24:  # builders.py's gemma, gemma2, qwen3
        model.config.head_dim = 32
        model = AutoModelForCausalLM.from_config(model.config)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    return model


def _graphs(family: str, folder: Path):
    """(info, the written graph, it converted, whether it converted, their sessions)."""
    model = _model(family)
    info = model_info(model.config, None)
    with quiet_tracing():
        export_decoder(model, info, folder / "model.onnx", direct=True)
    written, converted = ir.load(folder / "model.onnx"), ir.load(folder / "model.onnx")
    modified = UseGroupQueryAttentionPass()(converted).modified
    ir.save(converted, folder / "inplace.onnx")
    return info, written, converted, modified, [ort.InferenceSession(str(folder / name))
                                                for name in ("model.onnx", "inplace.onnx")]


@pytest.fixture(scope="module", params=sorted(written_types()))
def graphs(request, tmp_path_factory):
    return request.param, *_graphs(request.param, tmp_path_factory.mktemp(request.param))


def test_every_layer_becomes_one_group_query_attention(graphs):
    family, info, written, converted, modified, _ = graphs
    assert modified
    ops, before = [n.op_type for n in converted.graph], [n.op_type for n in written.graph]
    assert ops.count("GroupQueryAttention") == info.num_layers == fusions(converted)["GroupQueryAttention"]
    assert "Attention" not in ops and ops.count("RotaryEmbedding") == before.count("RotaryEmbedding")
    assert before.count("Split") - ops.count("Split") == (info.num_layers if family in PACKED else 0)


@pytest.mark.parametrize("padding,past,steps", CASES, ids=["padded-prompt", "padded-prompt-after-past", "decode",
                                                           "decode-3-rows-past-beyond-window"])
def test_it_computes_what_the_written_graph_computes(graphs, padding, past, steps):
    _, info, _, _, _, (written, converted) = graphs
    feed = _feed(info, np.random.default_rng(1), padding, past, steps)
    want, got = written.run(None, feed), converted.run(None, feed)
    real = feed["attention_mask"][:, past:].astype(bool)
    assert np.abs(want[0][real]).max() > 1  # differences below would show
    np.testing.assert_allclose(got[0][real], want[0][real], atol=1e-5, rtol=1e-5)
    kept = feed["attention_mask"].astype(bool)[:, None, :, None]  # a padded slot's key is never read
    for new, old in zip(got[1:], want[1:]):
        assert new.shape == old.shape
        np.testing.assert_allclose(new * kept, old * kept, atol=1e-5, rtol=1e-5)


def test_one_buffer_bound_as_past_and_present_steps_exactly(graphs):
    """Rows of different past lengths (left-padded), a prompt behind them and three single tokens, every step
    writing into the same buffers: the logits and the cache are the written graph's, which copies its past."""
    _, info, _, _, _, (written, converted) = graphs
    rng = np.random.default_rng(2)
    feed = _feed(info, rng, [0, 3], 5, 4)
    names = [n for n in feed if n.startswith("past_key_values")]
    capacity = 5 + 4 + 3
    buffers = {}
    binding = converted.io_binding()
    for name in names:
        cache = np.zeros((2, info.num_kv_heads, capacity, info.head_dim), np.float32)
        cache[:, :, :5] = feed[name]
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input(name, buffers[name])
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buffers[name])
    mask, pasts = feed["attention_mask"], {name: feed[name] for name in names}
    ids, positions = feed["input_ids"], feed["position_ids"]
    for _ in range(4):
        step = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **pasts}
        want = written.run(None, step)
        for name in ("input_ids", "attention_mask", "position_ids"):
            binding.bind_cpu_input(name, np.ascontiguousarray(step[name]))
        binding.bind_output("logits")
        converted.run_with_iobinding(binding)
        logits = next(v.numpy() for v in binding.get_outputs() if v.shape()[-1] == info.vocab_size)
        real = mask[:, -ids.shape[1]:].astype(bool)
        np.testing.assert_allclose(logits[real], want[0][real], atol=1e-5, rtol=1e-5)
        pasts = dict(zip(names, want[1:]))
        kept = mask.astype(bool)[:, None, :, None]
        for name in names:
            np.testing.assert_allclose(buffers[name].numpy()[:, :, :mask.shape[1]] * kept, pasts[name] * kept,
                                       atol=1e-5, rtol=1e-5)
        ids = want[0][:, -1].argmax(-1)[:, None]
        positions = mask.sum(axis=1, keepdims=True)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)


def test_a_past_read_through_a_cast_keeps_its_attention(graphs):
    """An fp16 graph casts its float32 past before attending: no buffer could be both, so nothing converts."""
    written = graphs[2]
    model = ir.from_proto(ir.to_proto(written))
    past = next(value for value in model.graph.inputs if value.name == "past_key_values.0.key")
    cast = ir.node("Cast", [past], {"to": ir.DataType.FLOAT}, name="cast_past")
    model.graph.insert_before(model.graph.node(0), cast)
    for use in list(past.uses()):
        if use.node is not cast:
            use.node.replace_input_with(use.idx, cast.outputs[0])
    assert not UseGroupQueryAttentionPass()(model).modified
    assert "GroupQueryAttention" not in [n.op_type for n in model.graph]


def test_heads_of_a_width_the_kernel_refuses_keep_their_attention(tmp_path):
    model = FAMILIES["qwen3"]().eval()  # heads 24 wide
    info = model_info(model.config, None)
    with quiet_tracing():
        export_decoder(model, info, tmp_path / "model.onnx", direct=True)
    assert not UseGroupQueryAttentionPass()(ir.load(tmp_path / "model.onnx")).modified
