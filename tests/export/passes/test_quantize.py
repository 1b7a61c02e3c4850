"""QuantizeWeightsPass and blockwise.py on tiny graphs, against NumPy and ONNX Runtime's MatMulNBits."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import run
from onnx import TensorProto, helper

from spexport.export.passes import QuantizeWeightsPass, blockwise
from spexport.export.passes.quantize import MODES, Mode, recorded

RNG = np.random.default_rng(0)
INT8, INT4, EXACT = MODES["int8"], MODES["int4"], MODES["int4-exact"]


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [onnx.numpy_helper.from_array(w, n) for n, w in
                                                            weights.items()])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _matmul(k: int, n: int, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    weight = np.random.default_rng(seed).normal(0, 0.05, (k, n)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], {"w": weight})
    return model, weight


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


@pytest.mark.parametrize("mode", [INT8, INT4, EXACT], ids=["int8", "int4", "int4-exact"])
def test_matmul_becomes_matmulnbits_that_computes_with_the_dequantized_weight(mode):
    model, weight = _matmul(64, 48)
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    exact = x @ weight
    quantized = QuantizeWeightsPass(dataclasses.replace(mode, accuracy_level=0))(model).model
    # with offsets: the block sums of x, MatMulNBits, the sums times the residuals, and their sum
    assert _ops(quantized) == (["MatMul", "MatMulNBits", "MatMul", "Add"] if mode.offsets else ["MatMulNBits"])
    assert recorded(quantized)["matrices"] == 1 and recorded(quantized)["fallbacks"] == {}
    assert "w" not in quantized.graph.initializers  # the float weight is gone
    q = blockwise.quantize(weight, mode.bits, mode.block_size, mode.offsets)
    np.testing.assert_allclose(run(quantized, {"x": x})["y"], x @ blockwise.dequantize(q), atol=1e-5)
    error = np.abs(run(quantized, {"x": x})["y"] - exact).max() / np.abs(exact).max()
    assert 0 < error < (0.01 if mode.bits == 8 else 0.15)


def test_blocks_that_do_not_fit_fall_back_per_weight_and_say_so():
    """48 inputs do not split into blocks of 32: that weight gets blocks of 16; 24 inputs split into no
    block MatMulNBits takes (16 at least), so that weight stays float32. Both are named."""
    fits, w1 = _matmul(64, 8, seed=1)
    proto = ir.to_proto(fits)
    rng = np.random.default_rng(1)  # its own: the tolerance below holds for these weights, whatever ran before
    w2 = rng.normal(0, 0.05, (8, 48)).astype(np.float32)
    w3 = rng.normal(0, 0.05, (48, 24)).astype(np.float32)
    w4 = rng.normal(0, 0.05, (24, 4)).astype(np.float32)
    proto.graph.node.extend([helper.make_node("MatMul", ["y", "w2"], ["y2"], name="small_k"),
                             helper.make_node("MatMul", ["y2", "w3"], ["y3"], name="k48"),
                             helper.make_node("MatMul", ["y3", "w4"], ["z"], name="k24")])
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(w, n) for n, w in
                                   [("w2", w2), ("w3", w3), ("w4", w4)])
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 4]))
    quantized = QuantizeWeightsPass(dataclasses.replace(INT4, accuracy_level=0))(ir.from_proto(proto)).model
    assert recorded(quantized)["fallbacks"] == {"small_k": "float32", "k48": "block 16", "k24": "float32"}
    assert recorded(quantized)["matrices"] == 2 and _ops(quantized).count("MatMul") == 2
    x = rng.normal(size=(2, 64)).astype(np.float32)
    w1, w3 = (blockwise.dequantize(blockwise.quantize(w, 4, block)) for w, block in [(w1, 32), (w3, 16)])
    expected = x @ w1 @ w2 @ w3 @ w4  # w2 and w4 as they were
    np.testing.assert_allclose(run(quantized, {"x": x})["z"], expected, atol=1e-4 * np.abs(expected).max())


def test_gemm_with_bias_and_transposed_weight_keeps_its_bias():
    weight = RNG.normal(0, 0.05, (32, 64)).astype(np.float32)  # [N, K]: transB
    bias = RNG.normal(size=32).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, name="fc")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 32])], {"w": weight, "c": bias})
    quantized = QuantizeWeightsPass(dataclasses.replace(INT8, accuracy_level=0))(model).model
    assert _ops(quantized) == ["MatMulNBits"]
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(quantized, {"x": x})["y"], x @ weight.T + bias, atol=0.01)


def _tied(vocab: int = 40, hidden: int = 32, copied: bool = False) -> tuple[ir.Model, np.ndarray]:
    """A token embedding whose transpose is the language-model head, as tied models export it: through a
    Transpose, or (`copied`, torch.onnx's constant folding) as a second, transposed initializer."""
    table = RNG.normal(0, 0.05, (vocab, hidden)).astype(np.float32)
    weights = {"table": table, "table_t": np.ascontiguousarray(table.T)} if copied else {"table": table}
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed"),
             *([] if copied else [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0])]),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="lm_head")]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
                  weights), table


@pytest.mark.parametrize("copied", [False, True], ids=["transposed", "copied"])
def test_a_tied_embedding_reads_the_heads_codes_and_is_stored_once(copied):
    """int4 is onnxruntime-genai's graph: a 4-bit head (bits 4, blocks of 32, accuracy level 4, uint4 zero
    points) whose codes the token lookup reads (GatherBlockQuantized), so the table is stored once, in 4 bits."""
    model, table = _tied(copied=copied)
    quantized = QuantizeWeightsPass(INT4)(model).model
    assert sorted(_ops(quantized)) == ["GatherBlockQuantized", "MatMulNBits", "Reshape"]
    assert recorded(quantized)["embedding"] == "int4, shared with the head" and recorded(quantized)["head"] == "int4"
    head = next(node for node in quantized.graph if node.op_type == "MatMulNBits")
    lookup = next(node for node in quantized.graph if node.op_type == "GatherBlockQuantized")
    assert {name: head.attributes[name].as_int() for name in ("bits", "block_size", "accuracy_level")} == {
        "bits": 4, "block_size": 32, "accuracy_level": 4}
    assert len(head.inputs) == 4 and head.inputs[3].const_value.dtype == ir.DataType.UINT8  # zero points
    assert lookup.inputs[2] is head.inputs[2] and lookup.inputs[3] is head.inputs[3]  # the head's scales, zeros
    assert lookup.attributes["bits"].as_int() == 4
    assert not any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                   and v.const_value.size >= table.size // 4 for v in quantized.graph.initializers.values())
    ids = np.array([[0, 5, 39, 7]])
    codes = blockwise.quantize(np.ascontiguousarray(table.T), 4, INT4.block_size)
    rows = blockwise.dequantize(codes).T  # [vocab, hidden]
    proto = ir.to_proto(quantized)
    proto.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 32]))
    found = run(proto, {"input_ids": ids})
    np.testing.assert_allclose(found["h"], rows[ids], atol=1e-6)
    np.testing.assert_allclose(found["logits"], rows[ids] @ rows.T, atol=2e-3)  # int8 activations inside


def test_the_head_can_stay_float32():
    model, table = _tied()
    quantized = QuantizeWeightsPass(dataclasses.replace(INT4, head_bits=None))(model).model
    assert sorted(_ops(quantized)) == ["Gather", "MatMul", "Transpose"] and recorded(quantized)["matrices"] == 0
    assert recorded(quantized)["head"] == "float32" and recorded(quantized)["embedding"] == "float32"


def _on_block_grids(k: int, n: int, block: int) -> np.ndarray:
    """A weight whose every block of every column is 16 equal steps up from its own float minimum (as a
    GGUF Q4_1 checkpoint's weights are, in blocks of 32 inputs)."""
    rng = np.random.default_rng(5)
    steps = rng.uniform(0.001, 0.01, (k // block, 1, n))
    lows = -rng.uniform(0, 15, (k // block, 1, n)) * steps
    codes = rng.integers(0, 16, (k // block, block, n))
    codes[:, 0], codes[:, 1] = 0, 15  # every block spans its whole grid
    return (lows + codes * steps).reshape(k, n).astype(np.float32)


def test_offsets_keep_each_blocks_float_minimum():
    """Integer zero points place a block's grid to within half a step; the residual term puts it back:
    a weight already on such grids comes back exactly, through ONNX Runtime too."""
    weight = _on_block_grids(64, 24, 32)
    exact, shifted = (blockwise.quantize(weight, 4, 32, offsets) for offsets in (True, False))
    assert np.abs(blockwise.dequantize(exact) - weight).max() < 1e-6
    assert np.abs(blockwise.dequantize(shifted) - weight).max() > 1e-4
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 24])], {"w": weight})
    quantized = QuantizeWeightsPass(dataclasses.replace(EXACT, accuracy_level=0))(model).model
    x = RNG.normal(size=(2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(quantized, {"x": x})["y"], x @ weight, atol=1e-5)


def test_weights_that_read_the_same_input_share_its_block_sums():
    w1, w2 = _on_block_grids(64, 8, 32), _on_block_grids(64, 16, 32)
    model = _model([helper.make_node("MatMul", ["x", "w1"], ["y1"], name="q"),
                    helper.make_node("MatMul", ["x", "w2"], ["y2"], name="k")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                   [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["b", n]) for y, n in [("y1", 8), ("y2", 16)]],
                   {"w1": w1, "w2": w2})
    quantized = QuantizeWeightsPass(dataclasses.replace(EXACT, accuracy_level=0))(model).model
    assert _ops(quantized).count("MatMul") == 3  # one block sum, two residual products
    x = RNG.normal(size=(2, 64)).astype(np.float32)
    found = run(quantized, {"x": x})
    np.testing.assert_allclose(found["y1"], x @ w1, atol=1e-5)
    np.testing.assert_allclose(found["y2"], x @ w2, atol=1e-5)


def test_graphs_inputs_outputs_and_a_gathered_bank_stay_float32():
    """Only weights multiplied by MatMul/Gemm change: a constant read by Gather that is not a token
    embedding feeding the head (the baked prompt bank) stays as it was."""
    model, _ = _matmul(64, 16)
    proto = ir.to_proto(model)
    bank = RNG.normal(size=(3, 16)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(bank, "spx_kv_bank"))
    proto.graph.input.append(helper.make_tensor_value_info("task_ids", TensorProto.INT64, ["b"]))
    proto.graph.node.append(helper.make_node("Gather", ["spx_kv_bank", "task_ids"], ["picked"]))
    proto.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["b", 16]))
    quantized = ir.to_proto(QuantizeWeightsPass(INT8)(ir.from_proto(proto)).model)
    kinds = {i.name: i.data_type for i in quantized.graph.initializer}
    assert kinds["spx_kv_bank"] == TensorProto.FLOAT
    assert all(p.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.INT64)
               for p in [*quantized.graph.input, *quantized.graph.output])


def test_modes_are_the_measured_settings():
    assert set(MODES) == {"int8", "int4", "int4-exact"}
    assert MODES["int8"].bits == 8 and MODES["int4"].bits == MODES["int4-exact"].bits == 4
    assert all(m.accuracy_level == 4 and m.block_size in (16, 32, 64, 128) for m in MODES.values())
    # int4: genai's graph (no residual terms, 4-bit head) rounded by GPTQ; int4-exact: Q4_1's float minimums
    assert (INT4.block_size, INT4.head_bits, INT4.offsets, INT4.gptq) == (32, 4, False, True)
    assert (EXACT.head_bits, EXACT.offsets, EXACT.gptq) == (8, True, False) and INT8.gptq
    with pytest.raises(ValueError, match="do not split"):
        blockwise.quantize(np.zeros((24, 4), np.float32), 8, 16)
    assert isinstance(INT8, Mode)


class _Inputs:
    """calibrate.Activations' interface: the same activations for every weight."""

    def __init__(self, x: np.ndarray):
        self.x = x

    def inputs_of(self, weight: np.ndarray) -> np.ndarray:
        return self.x


def _correlated(tokens: int, k: int, seed: int) -> np.ndarray:
    """Activations with correlated channels and a few large, mostly-positive ones, as after a norm."""
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + 0.3 * np.random.default_rng(9).normal(size=(k, k))
    x = rng.normal(size=(tokens, k)) @ mix
    x[:, :4] += 6
    return x.astype(np.float32)


def test_gptq_keeps_the_layout_and_moves_the_product_less_than_round_to_nearest():
    weight = RNG.normal(0, 0.05, (128, 96)).astype(np.float32)
    calibration, held_out = _correlated(256, 128, 1), _correlated(256, 128, 2)
    rtn, gptq = blockwise.quantize(weight, 4, 32), blockwise.quantize(weight, 4, 32, inputs=calibration)
    assert gptq.packed.shape == rtn.packed.shape and gptq.zero_points.shape == rtn.zero_points.shape

    def error(q):
        return np.linalg.norm(held_out @ blockwise.dequantize(q) - held_out @ weight)

    assert error(gptq) < 0.85 * error(rtn)  # measured: 0.76 of round to nearest's on these held-out rows


def test_the_pass_rounds_by_gptq_where_it_has_activations_and_records_it():
    model, weight = _matmul(64, 48)
    x = _correlated(200, 64, 3)
    quantized = QuantizeWeightsPass(dataclasses.replace(INT4, accuracy_level=0), _Inputs(x))(model).model
    assert recorded(quantized)["method"].startswith("GPTQ on 1 of 1 matrices")
    expected = blockwise.dequantize(blockwise.quantize(weight, 4, 32, inputs=x))
    np.testing.assert_allclose(run(quantized, {"x": x[:5]})["y"], x[:5] @ expected, rtol=1e-4, atol=1e-4)
    rtn = QuantizeWeightsPass(dataclasses.replace(INT4, gptq=False), _Inputs(x))(_matmul(64, 48)[0]).model
    assert recorded(rtn)["method"] == "round to nearest"


def test_the_option_names_are_the_modes():
    """`--quantize` offers exactly MODES; decoders take every mode, encoders int8 and int4 (not int4-exact)."""
    from spexport.cli import main
    from spexport.families import DECODER, ENCODER

    option = next(p for p in main.commands["convert"].params if p.name == "quantize")
    assert set(option.type.choices) == set(MODES) == set(DECODER.quantize)
    assert ENCODER.quantize == ("int8", "int4")


def test_gptqs_grid_clips_an_outlier_whose_input_is_quiet():
    """A block's range shrinks where that rounds its weights better on the calibration inputs: an outlier
    weight read by a near-silent input is clipped, and its block's other weights get a finer grid."""
    weight = RNG.normal(0, 0.05, (32, 16)).astype(np.float32)
    weight[5] = 1.0  # one outlier row
    x = RNG.normal(size=(256, 32)).astype(np.float32)
    x[:, 5] *= 1e-3
    rtn, gptq = blockwise.quantize(weight, 4, 32), blockwise.quantize(weight, 4, 32, inputs=x)
    assert (gptq.scales < rtn.scales).all()
    assert np.linalg.norm(x @ blockwise.dequantize(gptq) - x @ weight) < 0.9 * np.linalg.norm(
        x @ blockwise.dequantize(rtn) - x @ weight)  # measured: 0.84


@pytest.mark.parametrize("offsets", [False, True])
def test_round_to_nearest_is_the_same_a_slice_of_columns_at_a_time(monkeypatch, offsets):
    weight = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
    whole = blockwise.quantize(weight, 4, 32, offsets=offsets)
    monkeypatch.setattr(blockwise, "COLUMNS", 16)  # slices of 16, 16 and 8
    sliced = blockwise.quantize(weight, 4, 32, offsets=offsets)
    for field in ("packed", "scales", "zero_points", "residuals"):
        np.testing.assert_array_equal(getattr(sliced, field), getattr(whole, field))


def test_a_weight_read_from_its_file_is_unmapped_once_quantized(tmp_path):
    """A mapped weight's pages count as the process's memory: at a 1B model, every weight's by the pass's end."""
    model, _ = _matmul(64, 48)
    ir.save(model, tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    weight = model.graph.initializers["w"].const_value
    QuantizeWeightsPass(INT4)(model)
    assert isinstance(weight, ir.ExternalTensor) and weight.raw is None
