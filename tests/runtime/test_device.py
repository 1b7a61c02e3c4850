"""Execution providers (runtime/device.py): every family runs on the providers asked for, a provider this
onnxruntime build lacks is a one-line error, and a decoder's cache stays inside ONNX Runtime across steps."""

import numpy as np
import onnxruntime as ort
import pytest
import test_encoders
import test_seq2seq

from spexport.errors import InputError, SpexportError
from spexport.export import convert
from spexport.runtime import device, load

# a provider that this onnxruntime build lacks (CUDA on the CPU wheel that CI installs)
MISSING = next(p for p in ["CUDAExecutionProvider", "DmlExecutionProvider", "OpenVINOExecutionProvider"]
               if p not in ort.get_available_providers())
CPU_WITH_OPTIONS = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]


def _encoder(root):
    model_dir = test_encoders.build_base("bert", root / "model")
    spec = test_encoders.TASKS["bert"]["pt"]
    adapter = test_encoders.build_adapter(model_dir, "bert", spec, root / "pt", seed=1)
    convert(model_dir, [("pt", adapter)], root / "artifact")
    return root / "artifact", lambda m: m.logits(np.array([[5, 9, 14, 22, 7]]), task="pt")


def _seq2seq(root):
    model = test_seq2seq.MODELS["t5"]()
    model.save_pretrained(root / "model")
    test_seq2seq.save_tokenizer(root / "model")
    make, n = test_seq2seq.METHODS["prefix"]
    adapter = test_seq2seq.build_adapter(root / "model", make(n), root / "prefix", seed=1)
    convert(root / "model", [("prefix", adapter)], root / "artifact")
    return root / "artifact", lambda m: m.generate(np.array([[5, 9, 14, 22, 7]]), task="prefix", max_new_tokens=5)


@pytest.fixture(scope="module", params=["decoder", "encoder", "seq2seq"])
def artifact(request, tiny_llama, tmp_path_factory):
    """(artifact folder, a call that answers with the family's main verb)"""
    if request.param == "decoder":
        return tiny_llama["artifact"], lambda m: m.generate(np.array([[5, 9, 14, 22, 7]]), task=["pt"],
                                                            max_new_tokens=6)
    build = _encoder if request.param == "encoder" else _seq2seq
    return build(tmp_path_factory.mktemp(request.param))


def test_every_family_runs_on_the_providers_asked_for(artifact):
    folder, answer = artifact
    default = load(folder)
    for providers in [["CPUExecutionProvider"], CPU_WITH_OPTIONS]:
        model = load(folder, providers=providers)
        assert model.providers == ["CPUExecutionProvider"]
        np.testing.assert_array_equal(answer(model), answer(default))


def test_a_provider_this_build_lacks_is_a_one_line_error_that_names_the_fix(artifact):
    folder, _ = artifact
    with pytest.raises(InputError, match=f"{MISSING} is not in this onnxruntime .* build") as caught:
        load(folder, providers=[MISSING])
    assert "\n" not in str(caught.value)
    if MISSING == "CUDAExecutionProvider":
        assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in str(caught.value)


@pytest.mark.parametrize("providers, message", [
    (["CudaProvider"], "'CudaProvider' is not an ONNX Runtime execution provider"),
    ("CPUExecutionProvider", "providers must be a list"),
    ([("CPUExecutionProvider", "fast")], "each provider must be a name"),
    ([("CPUExecutionProvider", {"threads": [2]})], "each provider must be a name"),
    ([("CPUExecutionProvider", {"enable_cuda_graph": "1"})], "enable_cuda_graph='1' is not supported: a captured"),
])
def test_malformed_providers_are_refused_before_the_artifact_is_read(tmp_path, providers, message):
    with pytest.raises(InputError, match=message):
        load(tmp_path / "no-such-artifact", providers=providers)


def test_providers_keep_their_order_and_end_with_the_cpu():
    available = ort.get_available_providers()
    other = next((p for p in available if p != "CPUExecutionProvider"), None)
    asked = [other] if other else []
    assert device.pick_providers(None) == ["CPUExecutionProvider"]
    assert device.pick_providers(asked) == asked + ["CPUExecutionProvider"]
    assert device.pick_providers(["CPUExecutionProvider", *asked, "CPUExecutionProvider"]) == [
        "CPUExecutionProvider", *asked]
    assert device.pick_providers([("CPUExecutionProvider", {"use_arena": True})]) == [
        ("CPUExecutionProvider", {"use_arena": "1"})]


def test_a_provider_that_does_not_start_is_an_error_not_a_silent_cpu_session(tiny_llama, monkeypatch):
    """onnxruntime-gpu without a usable GPU or CUDA libraries opens a CPU-only session and says so only on
    stderr; the CPU build does the same with a provider it lacks, which stands in for it here."""
    real = ort.get_available_providers
    monkeypatch.setattr(device.ort, "get_available_providers", lambda: [MISSING, *real()])
    with pytest.warns(UserWarning), pytest.raises(InputError, match=f"could not start {MISSING}") as caught:
        load(tiny_llama["artifact"], providers=[MISSING])
    assert "\n" not in str(caught.value) and isinstance(caught.value, SpexportError)


def test_decode_steps_bring_back_logits_alone(tiny_llama, monkeypatch):
    """With I/O binding each step's present.* stays an ONNX Runtime value and is bound as the next step's past:
    no OrtValue is turned into numpy and no output copied to the host, yet the tokens are the greedy ones
    that recomputing the whole sequence gives."""
    model = load(tiny_llama["artifact"])
    ids = np.array([[5, 9, 14, 22, 40, 7], [0, 0, 3, 11, 30, 8]], np.int64)
    mask = (np.arange(6) >= np.array([[0], [2]])).astype(np.int64)
    expected = ids
    for _ in range(6):
        full = (np.arange(expected.shape[1]) >= np.array([[0], [2]])).astype(np.int64)
        step = model.logits(expected, full, task=["pt", "prefix"])[:, -1].argmax(-1)
        expected = np.concatenate([expected, step[:, None]], axis=1)

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step brought a cache tensor back to the host")

    monkeypatch.setattr(ort.OrtValue, "numpy", refuse)
    monkeypatch.setattr(ort.IOBinding, "copy_outputs_to_cpu", refuse)
    got = model.generate(ids, mask, task=["pt", "prefix"], max_new_tokens=6)
    np.testing.assert_array_equal(got, expected)
    assert device.io_device(model.session) == ("cpu", 0)
