"""Weight-only block quantization: every MatMul with a constant weight becomes ONNX Runtime's
`MatMulNBits` (8 or 4 bits, blocks along the weight's inputs, see blockwise.py).

Activations, the graph's inputs and outputs, the KV cache and the prompt bank (a graph input, or the
baked constants read by Gather) stay float32, so the artifact's interface does not change.
`accuracy_level` 4 lets ONNX Runtime quantize each activation block to int8 inside the product; on
CPUs that is the only fast 8-bit kernel (at level 0 an 8-bit MatMulNBits dequantizes its whole weight
on every call and runs ~70× slower than at level 4).

With `offsets`, each weight's blocks keep their exact minimum (blockwise.py): the product becomes
MatMulNBits(x) + (x @ block_sums) @ residuals, the block sums shared by the weights that read the same x.

The language-model head (the MatMul that makes `logits`) gets `head_bits`; where its weight is the
token embedding transposed (tied weights), `share_embedding` makes the embedding's Gather read the
head's codes (GatherBlockQuantized), so the table is stored once, quantized. A weight whose inputs do
not split into the block size falls back to the largest power-of-two block of at least 16 that does,
or stays float32; `fallbacks` names each such weight.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from spexport.export.passes import blockwise
from spexport.export.passes.values import constant, op, producer

MS_DOMAIN = "com.microsoft"
LOGITS = "logits"
QUANTIZATION_KEY = "spexport.quantization"  # the pass's record, as JSON
SMALLEST_BLOCK = 16  # MatMulNBits' smallest block


@dataclass(frozen=True)
class Mode:
    """One `--quantize` value, each setting chosen by measurement (README Performance)."""

    bits: int
    block_size: int
    accuracy_level: int  # MatMulNBits': 4 = int8 activations inside the product (the fast CPU kernels)
    head_bits: int | None  # the language-model head's bits; None keeps it float32
    share_embedding: bool  # a tied token embedding reads the head's codes (GatherBlockQuantized)
    offsets: bool  # exact block minimums through a float residual term (the head never takes one)
    gptq: bool = False  # round by GPTQ on calibration activations where the pass is given them (else RTN)
    gptq_head: bool = False  # the head too (its codes are also the tied embedding's rows)


MODES = {"int8": Mode(bits=8, block_size=16, accuracy_level=4, head_bits=8, share_embedding=True, offsets=False,
                      gptq=True),
         # onnxruntime-genai's int4: integer zero points, 4-bit head, the embedding read from its codes
         "int4": Mode(bits=4, block_size=32, accuracy_level=4, head_bits=4, share_embedding=True, offsets=False,
                      gptq=True),
         # the exact float block minimum (residual terms) and an 8-bit head: weights already on a Q4_1 grid
         "int4-exact": Mode(bits=4, block_size=32, accuracy_level=4, head_bits=8, share_embedding=True,
                            offsets=True)}


def recorded(model: ir.Model) -> dict:
    """What QuantizeWeightsPass did to `model`, as the manifest's `quantization` records it: the mode, the
    method, the head's and embedding's storage, the matrices rewritten and `fallbacks` (a weight's MatMul: what
    it got instead of `block_size`, "block 16" or "float32")."""
    return json.loads(model.metadata_props[QUANTIZATION_KEY])


class QuantizeWeightsPass(InPlacePass):
    """Its record goes into the result's metadata (QUANTIZATION_KEY; read it with `recorded`)."""

    def __init__(self, mode: Mode, activations=None):
        super().__init__()
        self.mode, self.activations = mode, activations if mode.gptq else None  # calibrate.Activations
        self.bits, self.block_size, self.accuracy_level = mode.bits, mode.block_size, mode.accuracy_level
        self.head_bits, self.share_embedding = mode.head_bits, mode.share_embedding
        self.quantized, self.fallbacks, self.embedding, self.calibrated = 0, {}, "float32", 0

    def _record(self) -> dict:
        mode = asdict(self.mode)
        head = "float32" if self.head_bits is None else f"int{self.head_bits}"
        method = f"GPTQ on {self.calibrated} of {self.quantized} matrices, else round to nearest" \
            if self.calibrated else "round to nearest"
        return {**mode, "method": method, "head": head, "embedding": self.embedding,
                "matrices": self.quantized, "fallbacks": self.fallbacks}

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        self.quantized, self.fallbacks, self.embedding, self.calibrated = 0, {}, "float32", 0
        head = next((v.producer() for v in graph.outputs if v.name == LOGITS), None)
        replaced: list[ir.Value] = []
        sums: dict[tuple[ir.Value, int], ir.Value] = {}  # (input, block size) -> its block sums
        for node in [n for n in graph if n.op_type in ("MatMul", "Gemm")]:
            weight, table = _weight(node)
            if weight is None or (node is head and self.head_bits is None):
                continue
            if node is head and table is None:
                table = _tied_table(graph, weight)
            bits = self.head_bits if node is head else self.bits
            label = node.name or node.outputs[0].name
            block = _block(weight.shape[0], self.block_size)
            if block != self.block_size:
                self.fallbacks[label] = "float32" if block is None else f"block {block}"
            if block is None:
                continue
            inputs = self._inputs(weight, node is head)
            self.calibrated += inputs is not None
            q = blockwise.quantize(weight, bits, block, offsets=self.mode.offsets and node is not head, inputs=inputs)
            source = node.inputs[1] if table is None else table
            replaced.append(node.inputs[1])
            matmul = self._replace(graph, node, q, label, sums)
            if node is head and table is not None and self.share_embedding:
                self.embedding = _share_embedding(graph, table, matmul, q) or self.embedding
                replaced.append(table)
            self.quantized += 1
            del weight  # it may be a view of the weights file's mapping, which the next line unmaps
            _release(_constant(source))
        if self.quantized:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        _drop_unused(graph, replaced)
        model.metadata_props[QUANTIZATION_KEY] = json.dumps(self._record())
        return PassResult(model, modified=bool(self.quantized))

    def _inputs(self, weight: np.ndarray, head: bool) -> np.ndarray | None:
        if self.activations is None or (head and not self.mode.gptq_head):
            return None
        return self.activations.inputs_of(weight)

    def _replace(self, graph: ir.Graph, node: ir.Node, q: blockwise.Quantized, label: str,
                 sums: dict[tuple[ir.Value, int], ir.Value]) -> ir.Node:
        """MatMulNBits (plus the residual term) in place of `node`; returns the MatMulNBits node."""
        k, n = q.shape
        inputs = [node.inputs[0]] + [constant(graph, f"{label}_spx_q{q.bits}{suffix}", array) for suffix, array in
                                     [("", q.packed), ("_scales", q.scales), ("_zero_points", q.zero_points)]]
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs += [None, node.inputs[2]]  # no g_idx; Gemm's C is MatMulNBits' bias
        attributes = {"K": k, "N": n, "bits": q.bits, "block_size": q.block_size}
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        matmul = ir.node("MatMulNBits", inputs, attributes, domain=MS_DOMAIN, name=f"{label}_spx_q{q.bits}")
        nodes = [matmul]
        if q.residuals is not None:
            key = (node.inputs[0], q.block_size)
            if key not in sums:
                ones = constant(graph, f"{label}_spx_block_sums_of", blockwise.block_sums(k, q.block_size))
                summed = op("MatMul", [node.inputs[0], ones], f"{label}_spx_block_sums")
                nodes.insert(0, summed)
                sums[key] = summed.outputs[0]
            residuals = constant(graph, f"{label}_spx_residuals", q.residuals)
            offset = op("MatMul", [sums[key], residuals], f"{label}_spx_offset")
            nodes += [offset, op("Add", [matmul.outputs[0], offset.outputs[0]], f"{label}_spx_sum")]
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, node.outputs, nodes[-1].outputs)
        return matmul


def _weight(node: ir.Node) -> tuple[np.ndarray | None, ir.Value | None]:
    """A MatMul's (or a plain Gemm's) constant 2-D float32 weight [K, N], and the table it transposes if
    it is a Transpose of one (a language-model head tied to the token embedding)."""
    if node.op_type == "Gemm" and not _plain_gemm(node):
        return None, None
    value, table = node.inputs[1], None
    transpose = producer(value, "Transpose")
    if transpose is not None and _constant(transpose.inputs[0]) is not None:
        table = transpose.inputs[0]
        tensor = _constant(table)
    else:
        tensor = _constant(value)
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None, None
    array = tensor.numpy()
    if node.op_type == "Gemm" and _integer_attribute(node, "transB", 0):
        array = array.T
    return (np.ascontiguousarray(array.T), table) if table is not None else (np.ascontiguousarray(array), None)


def _tied_table(graph: ir.Graph, weight: np.ndarray) -> ir.Value | None:
    """A token table [N, K] that a Gather reads and that holds the head's weight [K, N] transposed: tied
    weights that the exporter stored twice (torch.onnx folds the head's Transpose into a copy)."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if (tensor is None or tuple(tensor.shape) != weight.shape[::-1] or tensor.dtype != ir.DataType.FLOAT
                or not any(use.node.op_type == "Gather" and use.idx == 0 for use in value.uses())):
            continue
        if np.array_equal(tensor.numpy(), weight.T):
            return value
    return None


def _plain_gemm(node: ir.Node) -> bool:
    """A Gemm that is a MatMul plus a constant 1-D bias: what MatMulNBits (with its bias input) computes."""
    alpha, beta = (node.attributes.get(name) for name in ("alpha", "beta"))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (_integer_attribute(node, "transA", 0) == 0 and (alpha is None or alpha.as_float() == 1.0)
            and (beta is None or beta.as_float() == 1.0)
            and (bias is None or _constant(bias) is not None and len(_constant(bias).shape) == 1))


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    """The constant behind `value`, through Identity nodes (how optimum shares equal initializers)."""
    while value.const_value is None and producer(value, "Identity") is not None:
        value = value.producer().inputs[0]
    return value.const_value


def _block(k: int, wanted: int) -> int | None:
    """`wanted` if k splits into it, else the largest power of two from 16 below it that does."""
    block = wanted
    while block >= SMALLEST_BLOCK:
        if blockwise.fits(k, block):
            return block
        block //= 2
    return None


def _share_embedding(graph: ir.Graph, table: ir.Value, head: ir.Node, q: blockwise.Quantized) -> str | None:
    """Every Gather of token ids from `table` reads the head's codes instead: the head's weight is the
    table transposed, so its B [vocab, k_blocks, block bytes] holds the table's rows in order."""
    gathers = [use.node for use in table.uses() if use.node.op_type == "Gather" and use.idx == 0
               and _integer_attribute(use.node, "axis", 0) == 0]
    if not gathers:
        return None
    vocab, hidden = _constant(table).shape
    shape = constant(graph, f"{head.name}_spx_rows_shape", np.array([vocab, hidden * q.bits // 8], np.int64))
    rows = op("Reshape", [head.inputs[1], shape], f"{head.name}_spx_rows")
    graph.insert_before(gathers[0], rows)
    for gather in gathers:
        lookup = ir.node("GatherBlockQuantized", [rows.outputs[0], gather.inputs[1], head.inputs[2], head.inputs[3]],
                         {"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 1},
                         domain=MS_DOMAIN, name=f"{gather.name or gather.outputs[0].name}_spx_q{q.bits}")
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], [lookup], gather.outputs, lookup.outputs)
    return f"int{q.bits}, shared with the head"


def _release(tensor: ir.TensorProtocol) -> None:
    """Unmap a weight read from its file: each stays mapped once read, and mapped pages count as the process's
    memory (at a 1B model, every float32 weight by the pass's end)."""
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()


def _integer_attribute(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _drop_unused(graph: ir.Graph, weights: list[ir.Value]) -> None:
    """Remove the float weights that no node reads any more (and a tied head's Transpose)."""
    for value in weights:
        transpose = producer(value, "Transpose")
        if transpose is not None and not value.uses() and not value.is_graph_output():
            value = transpose.inputs[0]
            graph.remove(transpose, safe=True)
        if value.name in graph.initializers and not value.uses() and not value.is_graph_output():
            del graph.initializers[value.name]
