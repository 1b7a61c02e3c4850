"""Export-time speed-ups of the frozen graph: ONNX Runtime's transformer fusions, int8 or fp16 weights.

Fusions run after the prefix inputs are added (the ONNX checker that guards that step does not know
ONNX Runtime's operators); they rewrite norms, activations and rotary embeddings, which the prefix
wiring does not touch, and move attention's scale off the key cache. Quantization and fp16 run
last, on MatMul/Gemm weights only: the prompt bank (an input, or the baked `spx_kv_bank` constant
read by Gather) and every graph input and output stay float32, so the artifact's interface does
not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from spexport.artifact.manifest import ModelInfo
from spexport.errors import SpexportError
from spexport.export.passes.prefix import add_prefix_inputs

QUANTIZE = ("int8",)
DTYPES = ("float32", "float16")
WEIGHTS_KEY = "spexport.weights"  # model.onnx metadata: float32, int8 or float16
FUSIONS_KEY = "spexport.fusions"  # model.onnx metadata: the fused operators and their counts
BANK_CONSTANTS = ("spx_kv_bank", "spx_bank_mask")  # a baked bank, as spexport.graph names it
SCALED_QUERY = "MatMulScaledQuery"  # in FUSIONS_KEY: attention products whose scale moved to the query

# onnxruntime.transformers' optimizer has no llama type. Its gpt2 fusions are written for decoders
# in general (layer norms, RMS norms, skip connections, GELU, rotary embeddings) and match these.
FUSION_TYPE = {"gpt2": "gpt2", "llama": "gpt2", "qwen2": "gpt2", "mistral": "gpt2"}


@dataclass(frozen=True)
class Speed:
    """How `spexport convert` builds the graph: fused or not, and the weights' type."""

    optimize: bool = True
    quantize: str | None = None  # "int8"
    dtype: str = "float32"  # "float16": for GPU providers

    def __post_init__(self):
        if self.quantize not in (None, *QUANTIZE):
            raise SpexportError(f"quantize={self.quantize!r} is not supported; use one of {', '.join(QUANTIZE)}")
        if self.dtype not in DTYPES:
            raise SpexportError(f"dtype={self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.quantize and self.dtype != "float32":
            raise SpexportError("int8 quantization starts from float32 weights; leave dtype at float32")

    @property
    def weights(self) -> str:
        return self.quantize or self.dtype

    def build(self, model: onnx.ModelProto, info: ModelInfo, path: Path, bank=None) -> None:
        """Wire the prefix inputs (or a baked `bank`) into the plain decoder, fuse, convert, tag and write it
        to `path`."""
        fusions = {}
        model = add_prefix_inputs(model, info.num_layers, info.num_kv_heads, info.head_dim, bank)
        if self.optimize:
            model, fusions = fuse(model, info.model_type, info.hidden_size // info.head_dim, info.hidden_size)
            moved = scale_queries_not_keys(model.graph)
            if moved:
                fusions = {**fusions, SCALED_QUERY: moved}
        if self.dtype == "float16":
            model = to_float16(model)
        model = tag(model, self.weights, fusions)
        large = model.ByteSize() > 1_800_000_000
        if self.quantize == "int8":
            quantize_int8(model, path, large)
        else:
            onnx.save(model, path, save_as_external_data=large, location=path.name + ".data")


def fuse(model: onnx.ModelProto, model_type: str, num_heads: int, hidden_size: int
         ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Fuse norms, activations and rotary embeddings into ONNX Runtime's contrib operators.

    Attention itself is not fused: the optimizer's GPT-2 attention patterns predate the graphs
    torch exports today, so they never match. Returns the model and the fused-operator counts.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    kind = FUSION_TYPE.get(model_type)
    if kind is None:
        return model, {}
    options = FusionOptions(kind)
    # opt_level 0: only the pattern fusions, no provider-specific rewriting baked into the file.
    optimized = optimize_model(model, model_type=kind, num_heads=num_heads, hidden_size=hidden_size,
                               optimization_options=options, opt_level=0)
    counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    model = optimized.model
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    known = {opset.domain for opset in model.opset_import}
    model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - known))
    return model, counts


def scale_queries_not_keys(graph: onnx.GraphProto) -> int:
    """Move attention's scale from the keys to the queries: `q·(kᵀ·s)` becomes `(q·s)·kᵀ`.

    torch exports scaled dot-product attention with sqrt(scale) applied to both sides, so each
    step would transpose and multiply the whole key cache. With the key side left bare, ONNX
    Runtime folds the transpose into the MatMul and no step copies the cache for it; the query is
    one row per token. Only a scale of one element is moved (exact up to rounding). Returns the
    number of attention products rewritten.
    """
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}  # a graph output counts as a reader: its Mul must stay
    for name in [out.name for out in graph.output] + [name for node in graph.node for name in node.input]:
        readers[name] = readers.get(name, 0) + 1
    sizes = {init.name: int(np.prod(init.dims)) for init in graph.initializer}
    added, dropped = {}, set()
    for node in graph.node:
        keys = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if keys is None or keys.op_type != "Mul" or readers[keys.output[0]] != 1:
            continue
        for transposed, scale in (keys.input, reversed(keys.input)):
            if _swaps_last_two_axes(producer.get(transposed)) and _one_element(scale, producer, sizes):
                query = f"{node.output[0]}_spx_scaled_query"
                added[id(node)] = onnx.helper.make_node("Mul", [node.input[0], scale], [query],
                                                        name=f"{node.name}_spx_scale_query")
                node.input[0], node.input[1] = query, transposed
                dropped.add(id(keys))
                break
    nodes = [new for node in graph.node if id(node) not in dropped
             for new in ([added[id(node)]] if id(node) in added else []) + [node]]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(added)


def _swaps_last_two_axes(node) -> bool:
    if node is None or node.op_type != "Transpose":
        return False
    perm = list(next((a.ints for a in node.attribute if a.name == "perm"), []))
    rank = len(perm)
    return rank >= 2 and perm == [*range(rank - 2), rank - 1, rank - 2]


_ELEMENTWISE = {"Sqrt", "Cast", "Reciprocal", "Neg", "Div", "Mul", "Add", "Sub", "Pow"}


def _one_element(name: str, producer: dict, sizes: dict[str, int]) -> bool:
    """Whether `name` surely holds one number: a constant of size 1, the last entry of a shape, or
    element-wise arithmetic on such values (how torch computes 1/sqrt(head_dim))."""
    if name in sizes:
        return sizes[name] == 1
    node = producer.get(name)
    if node is None:
        return False
    if node.op_type == "Constant":
        value = _constant(name, producer)
        return value is not None and value.size == 1
    if node.op_type in _ELEMENTWISE:
        return all(_one_element(i, producer, sizes) for i in node.input)
    if node.op_type == "Slice" and len(node.input) == 3:  # shape[-1:]
        source = producer.get(node.input[0])
        starts, ends = (_constant(i, producer) for i in node.input[1:])
        return (source is not None and source.op_type == "Shape" and starts is not None and ends is not None
                and starts.tolist() == [-1] and int(ends.ravel()[0]) >= 2**31 - 1)
    return False


def _constant(name: str, producer: dict) -> np.ndarray | None:
    node = producer.get(name)
    if node is None or node.op_type != "Constant":
        return None
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return None if value is None else onnx.numpy_helper.to_array(value)


def quantize_int8(model: onnx.ModelProto, path: Path, large: bool) -> None:
    """Write `model` to `path` with int8 weights for every MatMul/Gemm (dynamic activation scales).

    Weights are unsigned 8-bit: on x86 CPUs without VNNI, signed weights go through a multiply that
    saturates (ONNX Runtime's quantization guide), which costs more accuracy than it saves.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, path, op_types_to_quantize=["MatMul", "Gemm"], per_channel=False,
                     weight_type=QuantType.QUInt8, use_external_data_format=large,
                     # shape inference cannot type the outputs of ONNX Runtime's fused operators
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, for GPU providers; inputs, outputs and a baked bank stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    bank_readers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Gather" and node.input[0] in BANK_CONSTANTS:
            node.name = node.name or f"spx_bank_gather{i}"
            bank_readers.append(node.name)
    return convert_float_to_float16(model, keep_io_types=True, node_block_list=bank_readers,
                                    disable_shape_infer=model.ByteSize() > 1_800_000_000)


def tag(model: onnx.ModelProto, weights: str, fusions: dict[str, int]) -> onnx.ModelProto:
    """Record how the graph was built in its metadata, for `inspect` and bug reports."""
    entries = {WEIGHTS_KEY: weights, FUSIONS_KEY: ",".join(f"{op}:{n}" for op, n in sorted(fusions.items()))}
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    return model
