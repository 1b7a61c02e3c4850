"""convert's speed options: fusions (on by default, so every parity test covers them), int8 / int4, fp16."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import build_adapter, build_model

from spexport.errors import SpexportError
from spexport.export import convert
from spexport.export.passes.tag import FUSIONS_KEY, SCALED_QUERY, WEIGHTS_KEY
from spexport.runtime import load

TASKS = {"pt": ("prompt_tuning", 5), "prefix": ("prefix_tuning", 3)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"speed-{request.param}")
    model_dir = build_model(request.param, root / "model")
    adapters = [(name, build_adapter(model_dir, method, root / name, n, seed=i + 1))
                for i, (name, (method, n)) in enumerate(TASKS.items())]
    return root, model_dir, adapters


def _artifact(tiny, name: str, **options):
    root, model_dir, adapters = tiny
    folder = root / name
    if not folder.exists():
        convert(model_dir, adapters, folder, **options)
    return folder


def _graph(folder) -> onnx.ModelProto:
    return onnx.load(folder / "model.onnx")


def _rows(model):
    ids = np.random.default_rng(0).integers(4, model.info.vocab_size, (2, 7))
    return ids, list(TASKS)


def _as_run(folder, tmp_path) -> list[str]:
    """The operators of the graph as ONNX Runtime runs it, after its own fusions at load."""
    from spexport.runtime.session import session_options

    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "as-run.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(tmp_path / "as-run.onnx", load_external_data=False).graph.node]


def test_default_graph_is_fused_and_says_so(tiny, tmp_path):
    """Rotary embeddings are fused in the file; norms and activations by ONNX Runtime when it loads it."""
    folder = _artifact(tiny, "fused")
    info = load(folder).info
    meta = {p.key: p.value for p in _graph(folder).metadata_props}
    assert meta[WEIGHTS_KEY] == "float32"
    if info.model_type == "llama":
        assert f"RotaryEmbedding:{2 * info.num_layers}" in meta[FUSIONS_KEY].split(",")
        assert "Cos" not in [node.op_type for node in _graph(folder).graph.node]
    as_run = _as_run(folder, tmp_path)
    assert {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"} & set(as_run)


def test_attention_scale_moves_to_the_queries_so_no_step_copies_the_key_cache(tiny, tmp_path):
    """torch scales both sides of q·kᵀ; with the scale on the query alone, ONNX Runtime folds the key
    cache's transpose into its MatMul (FusedMatMul) instead of transposing and scaling it each step."""
    folder = _artifact(tiny, "fused")
    layers = load(folder).info.num_layers
    meta = {p.key: p.value for p in _graph(folder).metadata_props}
    graph = _graph(folder).graph
    attentions = [node for node in graph.node if node.op_type == "Attention"]
    if attentions:  # written directly (export/decoder/direct.py): the scale is the Attention's own attribute
        info = load(folder).info
        assert len(attentions) == layers
        scales = [next(a.f for a in n.attribute if a.name == "scale") for n in attentions]
        assert scales == pytest.approx([info.head_dim ** -0.5] * layers)
        pasts = {name for n in attentions for name in n.input[4:6]}
        assert {n.op_type for n in graph.node if pasts & set(n.input)} == {"Attention"}  # read as they are
        return
    assert f"{SCALED_QUERY}:{layers}" in meta[FUSIONS_KEY].split(",")
    assert _as_run(folder, tmp_path).count("FusedMatMul") >= layers


def test_no_optimize_leaves_a_plain_onnx_graph_with_the_same_logits(tiny):
    plain = _artifact(tiny, "plain", optimize=False)
    assert all(node.domain in ("", "ai.onnx") for node in _graph(plain).graph.node)
    fused, unfused = load(_artifact(tiny, "fused")), load(plain)
    ids, tasks = _rows(fused)
    np.testing.assert_allclose(fused.logits(ids, task=tasks), unfused.logits(ids, task=tasks), atol=1e-4)


def test_the_writer_and_the_fusions_are_separate_choices(tiny):
    """--writer trace fuses the traced graph (the same logits as the written one, which holds ONNX Runtime's
    operators from the start), and every artifact's graphs derive from the core graph: main, core and prefix."""
    traced = _artifact(tiny, "traced", writer="trace")
    written, by_trace = load(_artifact(tiny, "fused")), load(traced)
    ids, tasks = _rows(written)
    np.testing.assert_allclose(written.logits(ids, task=tasks), by_trace.logits(ids, task=tasks), atol=1e-4)
    assert by_trace.manifest.core_graph and by_trace.manifest.prefix_graph  # a traced graph has both too
    assert any(node.domain == "com.microsoft" for node in _graph(traced).graph.node)


@pytest.mark.parametrize("choices, message", [
    ({"writer": "direct", "optimize": False}, "use --writer trace"),
    ({"writer": "compiled"}, "not one of auto, direct, trace")])
def test_a_writer_that_cannot_be_had_is_refused_before_anything_loads(tiny, tmp_path, choices, message):
    _, model_dir, adapters = tiny
    with pytest.raises(SpexportError, match=message):
        convert(model_dir, adapters, tmp_path / "out", **choices)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("bake", [False, True], ids=["bank", "baked"])
def test_quantized_graph_runs_with_matmulnbits_and_float32_prompts(tiny, bake, quantize):
    folder = _artifact(tiny, f"{quantize}-{bake}", quantize=quantize, bake=bake)
    graph = _graph(folder)
    assert {p.key: p.value for p in graph.metadata_props}[WEIGHTS_KEY] == quantize
    ops = [node.op_type for node in graph.graph.node]
    assert "MatMulNBits" in ops and "MatMulInteger" not in ops
    bits = {a.i for node in graph.graph.node if node.op_type == "MatMulNBits" for a in node.attribute
            if a.name == "bits"}
    assert bits == ({8} if quantize == "int8" else {4})  # int4's head is 4-bit too, as genai's
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert all(inputs[n] == onnx.TensorProto.FLOAT for n in inputs if n.startswith(("kv_prefix", "past_key_values")))
    bank = {i.name: i.data_type for i in graph.graph.initializer if i.name.startswith("spx_kv_bank")}
    assert bank == ({"spx_kv_bank": onnx.TensorProto.FLOAT} if bake else {})
    exact, quantized = load(_artifact(tiny, "fused")), load(folder)
    ids, tasks = _rows(exact)
    reference = exact.logits(ids, task=tasks)
    drift = np.abs(quantized.logits(ids, task=tasks) - reference).max()
    # int4's head is 4-bit too (genai's graph), so its logits move further than with the old 8-bit head: 0.11 measured
    assert 0 < drift < (0.02 if quantize == "int8" else 0.15) * np.abs(reference).max()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_mixed_task_batches_equal_rows_alone(tiny, quantize):
    model = load(_artifact(tiny, f"{quantize}-False", quantize=quantize))
    ids, tasks = _rows(model)
    mixed = model.logits(ids, task=tasks)
    alone = np.concatenate([model.logits(ids[i:i + 1], task=t) for i, t in enumerate(tasks)])
    # float32 rounding only (a batch's attention products are blocked otherwise); a row given another row's
    # prefix moves by tenths
    np.testing.assert_allclose(mixed, alone, atol=5e-5)
    together = model.generate(ids, task=tasks, max_new_tokens=6)
    for i, task in enumerate(tasks):
        row = model.generate(ids[i:i + 1], task=task, max_new_tokens=6)[0]
        np.testing.assert_array_equal(together[i, :len(row)], row)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_drift_report_is_in_the_manifest_for_every_task(tiny, quantize):
    from spexport.artifact.manifest import Manifest

    record = Manifest.read(_artifact(tiny, f"{quantize}-False", quantize=quantize)).quantization
    assert record["bits"] == int(quantize[3:]) and record["fallbacks"] == {}
    assert record["matrices"] > 0 and record["head"] == quantize
    # both round every matrix but the head (its codes are also the embedding's) by GPTQ on calibration text
    gptq = f"GPTQ on {record['matrices'] - 1} of {record['matrices']} matrices, else round to nearest"
    assert record["method"] == gptq
    drift = record["drift"]
    assert drift["reference"] == "float32 graph" and drift["prompts"] == 4 and drift["new_tokens"] == 16
    assert set(drift["tasks"]) == set(TASKS)
    for found in drift["tasks"].values():
        assert 0.5 <= found["agreement"] <= 1 and 0 < found["max_abs_diff"] < 1 and found["positions"] > 0
    assert Manifest.read(_artifact(tiny, "fused")).quantization is None


@pytest.mark.parametrize("bake", [False, True], ids=["bank", "baked"])
def test_float16_loads_and_runs_on_the_cpu_with_float32_ports(tiny, bake):
    folder = _artifact(tiny, f"fp16-{bake}", dtype="float16", bake=bake)
    graph = _graph(folder)
    assert {p.key: p.value for p in graph.metadata_props}[WEIGHTS_KEY] == "float16"
    assert all(i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
               for i in [*graph.graph.input, *graph.graph.output])
    kinds = {i.name: i.data_type for i in graph.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds.values()
    if bake:
        assert kinds["spx_kv_bank"] == onnx.TensorProto.FLOAT
    exact, half = load(_artifact(tiny, "fused")), load(folder)
    ids, tasks = _rows(exact)
    np.testing.assert_allclose(half.logits(ids, task=tasks), exact.logits(ids, task=tasks), atol=2e-2)
    assert half.generate(ids, task=tasks, max_new_tokens=4).shape == (2, 11)


@pytest.mark.parametrize("options, message", [
    (dict(quantize="int2"), "quantize='int2' is not supported"),
    (dict(dtype="bfloat16"), "dtype='bfloat16' is not supported"),
    (dict(quantize="int8", dtype="float16"), "leave dtype at float32"),
])
def test_unsupported_speed_options_are_one_line_errors(tiny, tmp_path, options, message):
    _, model_dir, adapters = tiny
    with pytest.raises(SpexportError, match=message):
        convert(model_dir, adapters, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_cli_convert_passes_the_speed_flags(tiny, tmp_path):
    from click.testing import CliRunner

    from spexport.cli import main

    _, model_dir, adapters = tiny
    args = ["convert", "--model", str(model_dir), "--output", str(tmp_path / "art"), "--quantize", "int8",
            "--no-optimize"] + [a for name, path in adapters for a in ("--adapter", f"{name}={path}")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    graph = _graph(tmp_path / "art")
    assert {p.key: p.value for p in graph.metadata_props}[WEIGHTS_KEY] == "int8"
    # unfused: the only contrib operators are the quantized ones
    assert {node.op_type for node in graph.graph.node if node.domain not in ("", "ai.onnx")} <= {
        "MatMulNBits", "GatherBlockQuantized"}
    assert "int8 weights (GPTQ on " in result.output and "blocks of 16" in result.output
    assert "drift from the float32 graph (4 fixed prompts, 16 greedy tokens each):" in result.output
    assert all(any(line.split()[:1] == [task] for line in result.output.splitlines()) for task in TASKS)


@pytest.mark.parametrize("name, options", [("fused", {}), ("plain", {"optimize": False})])
def test_prefix_graph_gives_the_exported_prefix(tiny, name, options):
    """The prefix graph is cut from the finished graph, fused or plain (GPT-2's plain graph reshapes
    input_ids before its lookup): the KV prefix it computes is the one convert stored."""
    from spexport.artifact import tensorfile
    from spexport.artifact.manifest import Manifest
    from spexport.runtime.prefix import PrefixGraph

    folder = _artifact(tiny, name, **options)
    manifest = Manifest.read(folder)
    bank = tensorfile.load(folder / "prompts.safetensors")
    weights = tensorfile.load(dict(tiny[2])["pt"] / "adapter_model.safetensors")["prompt_embeddings"]
    np.testing.assert_allclose(PrefixGraph(folder, manifest).kv(weights), bank["pt"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_quantized_artifact_gets_a_prefix_graph_of_its_own_weights(tiny, quantize):
    """With the embedding read from the head's codes (GatherBlockQuantized) the prefix graph is still cut:
    tasks added later get their KV prefix from the quantized model, close to the float32 one convert stored."""
    from spexport.artifact import tensorfile
    from spexport.artifact.manifest import Manifest
    from spexport.runtime.prefix import PrefixGraph

    folder = _artifact(tiny, f"{quantize}-False", quantize=quantize)
    manifest = Manifest.read(folder)
    assert manifest.prefix_graph is not None
    bank = tensorfile.load(folder / "prompts.safetensors")["pt"]
    weights = tensorfile.load(dict(tiny[2])["pt"] / "adapter_model.safetensors")["prompt_embeddings"]
    bound = 0.1 if quantize == "int8" else 0.3  # int4: 4-bit weights everywhere; 0.18 measured on the tiny Llama
    assert np.abs(PrefixGraph(folder, manifest).kv(weights) - bank).max() < bound * np.abs(bank).max()


def test_validate_compares_a_quantized_artifact_with_peft_in_drift_terms(tiny):
    from click.testing import CliRunner

    from spexport.cli import main

    _, model_dir, adapters = tiny
    folder = _artifact(tiny, "int4-False", quantize="int4")
    args = ["validate", str(folder), "--model", str(model_dir)]
    args += [a for name, path in adapters for a in ("--adapter", f"{name}={path}")]
    # a tiny random model's logits lie close together: with a 4-bit head too its int4 agrees ~0.86 with float32
    result = CliRunner().invoke(main, args + ["--json", "--min-agreement", "0.75"])
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(result.output)
    assert report["passed"] and report["min_agreement"] == 0.75
    recorded = load(folder).manifest.quantization["drift"]["tasks"]
    for check in report["tasks"]:
        # PEFT and the float32 graph agree to ~1e-6, so the artifact drifts from both alike
        assert check["agreement"] == pytest.approx(recorded[check["task"]]["agreement"], abs=0.05)
        assert check["recorded_agreement"] == recorded[check["task"]]["agreement"]
    from spexport.tables import validate_failure
    from spexport.validate import validate

    strict = validate(folder, model_dir, adapters, min_agreement=1.01)  # above any agreement: every task fails
    assert not any(check.passed for check in strict)
    assert "quantized tasks agree with PEFT below 1.01" in validate_failure(strict, strict, 1e-4, 1.01)
    beyond = CliRunner().invoke(main, args + ["--min-agreement", "1.01"])  # an agreement is a fraction
    assert beyond.exit_code == 2 and "Invalid value for '--min-agreement'" in beyond.stderr
