"""fp16 artifacts (`--dtype float16`, the GPU default) on ONNX Runtime's CPU provider, against PEFT in float32.

The CPU provider runs the fp16 graph as it is written (fp16 weights, fp16 MatMul and attention; the ports
and the KV cache stay float32, cast at the graph's edges), so this is the precision a GPU run has, up to the
order in which sums are accumulated. The bound is relative to the logits' scale (the row's max |logit|):
fp16 keeps 11 significant bits (a relative step of 4.9e-4), and rounding compounds through the layers.
"""

import numpy as np
import pytest
from builders import build_chat_adapters
from parity import chat_ids, peft_generate, peft_logits, peft_model
from transformers import AutoTokenizer

from spexport.export import convert
from spexport.runtime import load

TINY_BOUND = 5e-3  # max|Δlogits| <= TINY_BOUND * max|logits| (measured: 3e-4 on the 2-layer model)
REAL_BOUND = 1e-2  # SmolLM2-135M's 30 layers, trained weights (measured: 1.9e-3 to 2.9e-3, logits ~38)


def _relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="module")
def tiny_half(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "artifact"
    convert(tiny_llama["model"], list(tiny_llama["adapters"].items()), folder, dtype="float16")
    return load(folder)


@pytest.mark.parametrize("task", ["pt", "prefix"])
def test_float16_logits_and_greedy_tokens_follow_peft(tiny_llama, tiny_half, task):
    peft = peft_model(tiny_llama["model"], tiny_llama["adapters"][task])
    ids = np.random.default_rng(3).integers(4, tiny_half.info.vocab_size, (1, 12))
    assert _relative(tiny_half.logits(ids, task=task), peft_logits(peft, ids)) <= TINY_BOUND
    np.testing.assert_array_equal(tiny_half.generate(ids, task=task, max_new_tokens=16),
                                  peft_generate(peft, ids, 16))


@pytest.mark.real
@pytest.mark.usefixtures("one_torch_thread")
def test_real_smollm2_in_float16(smollm2, tmp_path):
    """A trained model's logits reach ~40; through 30 fp16 layers they move by 0.07 to 0.11 (measured), within
    REAL_BOUND of that. Greedy replies follow PEFT's float32 ones token for token until two candidates lie closer
    than that: 32 tokens identical for prompt tuning and P-tuning, the prefix task's reply turns at token 5."""
    adapters = build_chat_adapters(smollm2, tmp_path)
    convert(smollm2, list(adapters.items()), tmp_path / "artifact", dtype="float16")
    half = load(tmp_path / "artifact")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = np.array([chat_ids(tokenizer, [{"role": "user", "content": "Write a short poem about the sea."}],
                             add_generation_prompt=True)])
    agreed = []
    for task, path in adapters.items():
        peft = peft_model(smollm2, path)
        assert _relative(half.logits(ids, task=task), peft_logits(peft, ids)) <= REAL_BOUND, task
        ours, theirs = half.generate(ids, task=task, max_new_tokens=32), peft_generate(peft, ids, 32)
        agreed.append(int(np.argmax(np.append(ours[0, ids.shape[1]:] != theirs[0, ids.shape[1]:], True))))
    assert sorted(agreed)[1] == 32, agreed  # most replies identical over all 32 tokens


def test_convert_for_cuda_writes_float16_where_the_family_has_it(tiny_llama, tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from spexport.cli import main
    from spexport.export.passes.tag import WEIGHTS_KEY
    from spexport.families import default_dtype

    args = ["convert", "--model", str(tiny_llama["model"]), "--output", str(tmp_path / "art"), "--device", "cuda"]
    args += [a for name, path in tiny_llama["adapters"].items() for a in ("--adapter", f"{name}={path}")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    graph = onnx.load(tmp_path / "art" / "model.onnx", load_external_data=False)
    assert {p.key: p.value for p in graph.metadata_props}[WEIGHTS_KEY] == "float16"
    cases = [("llama", "cpu", None, "float32"), ("llama", "cuda", "int8", "float32"), ("bert", "cuda", None, "float32"),
             ("t5", "cuda", None, "float32")]
    for model_type, device, quantize, expected in cases:
        (tmp_path / model_type).mkdir(exist_ok=True)
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert default_dtype(tmp_path / model_type, device, quantize) == expected
    assert default_dtype(tmp_path / "missing", "cuda", None) == "float32"


def test_a_graph_over_protobufs_limit_converts_to_float16(tiny_llama, tiny_half, tmp_path, monkeypatch):
    """Past 2 GB of weights (Llama-3.2-1B in float32 is 5 GB) protobuf refuses to serialise the model, even to
    measure it, so the pass sizes it from its tensors and converts without shape inference. Here the limit is
    lowered so that the tiny model takes that path; a 2.2 GB graph was converted this way once, by hand."""
    from spexport.export.passes import float16

    monkeypatch.setattr(float16, "PROTOBUF_LIMIT", 0)
    convert(tiny_llama["model"], list(tiny_llama["adapters"].items()), tmp_path / "artifact", dtype="float16")
    large = load(tmp_path / "artifact")
    ids = np.random.default_rng(4).integers(4, large.info.vocab_size, (2, 9))
    tasks = ["pt", "prefix"]
    np.testing.assert_array_equal(large.logits(ids, task=tasks), tiny_half.logits(ids, task=tasks))
