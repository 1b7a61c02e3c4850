import numpy as np
import onnx
import onnx_ir as ir
import pytest
from graphs import run

from spexport.export.passes import FuseRotaryEmbeddingPass
from spexport.export.passes.tag import fusions

HEADS, SEQ, HEAD_DIM = 2, 3, 8
INV_FREQ = 1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM)


def _rotary(scale: float, interleaved: bool = False, outer: str = "matmul") -> ir.Model:
    """x·cos + rotate_half(x)·sin as transformers computes it, cos and sin from positions ⊗ inv_freq
    (times an attention scaling), the outer product as a MatMul (transformers 4) or a broadcast Mul
    (transformers 5); `interleaved` swaps the halves of rotate_half, which is not rotary."""
    h = onnx.helper
    half = HEAD_DIM // 2
    consts = {"inv_freq": INV_FREQ[None, :, None] if outer == "matmul" else INV_FREQ[None, None, :],
              "scale": np.array(scale, np.float32), "minus_one": np.array([-1], np.int64),
              "one": np.array([1], np.int64), "zero": np.array([0], np.int64), "half": np.array([half], np.int64),
              "end": np.array([HEAD_DIM], np.int64), "last": np.array([-1], np.int64)}
    low, high = ("Neg_out", "low") if not interleaved else ("low", "Neg_out")
    if outer == "matmul":
        nodes = [h.make_node("Unsqueeze", ["position_ids", "one"], ["pos3"]),
                 h.make_node("Cast", ["pos3"], ["posf"], to=onnx.TensorProto.FLOAT),
                 h.make_node("MatMul", ["inv_freq", "posf"], ["freqs_t"]),
                 h.make_node("Transpose", ["freqs_t"], ["freqs"], perm=[0, 2, 1])]
    else:
        nodes = [h.make_node("Unsqueeze", ["position_ids", "minus_one"], ["pos3"]),
                 h.make_node("Cast", ["pos3"], ["posf"], to=onnx.TensorProto.FLOAT),
                 h.make_node("Mul", ["posf", "inv_freq"], ["freqs"])]
    nodes += [h.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
              h.make_node("Cos", ["emb"], ["cos0"]), h.make_node("Mul", ["cos0", "scale"], ["cos1"]),
              h.make_node("Sin", ["emb"], ["sin0"]), h.make_node("Mul", ["sin0", "scale"], ["sin1"]),
              h.make_node("Unsqueeze", ["cos1", "one"], ["cos"]), h.make_node("Unsqueeze", ["sin1", "one"], ["sin"])]
    for x in ("q", "k"):
        nodes += [h.make_node("Slice", [x, "zero", "half", "last"], [f"{x}_low"]),
                  h.make_node("Slice", [x, "half", "end", "last"], [f"{x}_high"]),
                  h.make_node("Neg", [f"{x}_high"], [f"{x}_Neg_out"]),
                  h.make_node("Concat", [f"{x}_{low}", f"{x}_{high}"], [f"{x}_rotated"], axis=-1),
                  h.make_node("Mul", [x, "cos"], [f"{x}_cos"]),
                  h.make_node("Mul", [f"{x}_rotated", "sin"], [f"{x}_sin"]),
                  h.make_node("Add", [f"{x}_cos", f"{x}_sin"], [f"{x}_out"])]
    shape = ["b", HEADS, "s", HEAD_DIM]
    graph = h.make_graph(nodes, "rotary", [h.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["b", "s"]),
                                           h.make_tensor_value_info("q", onnx.TensorProto.FLOAT, shape),
                                           h.make_tensor_value_info("k", onnx.TensorProto.FLOAT, shape)],
                         [h.make_tensor_value_info(f"{x}_out", onnx.TensorProto.FLOAT, shape) for x in ("q", "k")],
                         [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    return ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"position_ids": np.array([[0, 1, 2], [5, 6, 7]]),
            "q": rng.standard_normal((2, HEADS, SEQ, HEAD_DIM), np.float32),
            "k": rng.standard_normal((2, HEADS, SEQ, HEAD_DIM), np.float32)}


def _numpy_rotary(x: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
    angles = positions[:, None, :, None] * INV_FREQ[None, None, None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    rotated = np.concatenate([-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]], axis=-1)
    return x * np.cos(angles) * scale + rotated * np.sin(angles) * scale


@pytest.mark.parametrize("outer", ["matmul", "mul"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_queries_and_keys_become_rotary_operators_with_the_same_values(scale, outer):
    model, feeds = _rotary(scale, outer=outer), _feeds()
    fuse = FuseRotaryEmbeddingPass(max_positions=16)
    assert fuse(model).modified and fusions(model) == {"RotaryEmbedding": 2}
    assert sorted(n.op_type for n in model.graph) == ["RotaryEmbedding", "RotaryEmbedding"]
    out = run(model, feeds)
    for x in ("q", "k"):
        np.testing.assert_allclose(out[f"{x}_out"], _numpy_rotary(feeds[x], feeds["position_ids"], scale),
                                   atol=1e-5)


def test_a_rotation_that_is_not_rotate_half_stays():
    model = _rotary(1.0, interleaved=True)
    before = run(model, _feeds())
    fuse = FuseRotaryEmbeddingPass(max_positions=16)
    assert not fuse(model).modified and fusions(model) == {}
    np.testing.assert_array_equal(run(model, _feeds())["q_out"], before["q_out"])
