"""The decoder graph's pipeline: prefix wiring, then the speed-ups, then the weights' type.

Passes run in the order of spexport.export.passes' docstring. Fusions run after the prefix inputs
are added (the ONNX checker that guards that step does not know ONNX Runtime's operators); they
rewrite rotary embeddings (our own pass), then norms, skip connections, activations and reshapes
(onnxruntime.transformers' optimizer), which the prefix wiring does not touch.
Quantization and fp16 touch MatMul/Gemm weights only: the prompt bank (an input, or the baked
constants read by Gather) and every graph input and output stay float32, so the artifact's
interface does not change.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
from spexport.export.common import ExportOptions
from spexport.export.decoder.prefix_graph import WEIGHTS_SUFFIX
from spexport.export.passes import (
    AddPrefixInputsPass,
    BakePromptBankPass,
    ConvertToFloat16Pass,
    FuseRotaryEmbeddingPass,
    FuseTransformerOpsPass,
    MergePrefixIntoPastConcatPass,
    QuantizeWeightsPass,
    ScaleQueriesNotKeysPass,
    TagGraphPass,
)
from spexport.export.passes.float16 import PROTOBUF_LIMIT
from spexport.export.passes.quantize import MODES
from spexport.export.passes.rotary import ROTARY
from spexport.export.passes.tag import SCALED_QUERY
from spexport.families import DECODER


def build(options: ExportOptions, raw: Path, info: ModelInfo, path: Path,
          bank: tuple[np.ndarray, np.ndarray] | None = None, reference: Path | None = None,
          fused: dict[str, int] | None = None, activations=None) -> dict | None:
    """Wire the prefix inputs (or a baked `bank`: kv [tasks, ...] and mask [tasks, n]) into the plain
    decoder graph at `raw`, speed it up as `options` say (fused or not, the weights' type), tag it and write it
    to `path` (raw's folder takes scratch files).

    Quantizing, the float32 graph is also written to `reference` (for the drift report) and the
    quantization's record (passes/quantize.py's `record`) is returned; otherwise None. `fused` counts
    the ONNX Runtime operators a directly written graph holds already: it skips the fusion passes.
    `activations` (export/calibrate.py) let GPTQ round the weights."""
    model = ir.load(raw)
    structure = [AddPrefixInputsPass(info.num_layers, info.num_kv_heads, info.head_dim)]
    if bank is not None:
        structure.append(BakePromptBankPass(*bank))
    for step in [*structure, MergePrefixIntoPastConcatPass()]:
        model = step(model).model
    _check(model, raw.parent)
    fusions = dict(fused or {})
    if fused is None and options.optimize and DECODER.fusion_type:
        rotary = FuseRotaryEmbeddingPass(info.max_positions)
        fuse = FuseTransformerOpsPass(DECODER.fusion_type, info.hidden_size // info.head_dim, info.hidden_size,
                                      workdir=raw.parent)
        scale = ScaleQueriesNotKeysPass()
        model = scale(fuse(rotary(model).model).model).model
        fusions = {**fuse.counts, **({ROTARY: rotary.fused} if rotary.fused else {}),
                   **({SCALED_QUERY: scale.moved} if scale.moved else {})}
    if options.dtype == "float16":
        model = ConvertToFloat16Pass()(model).model
    record = None
    if options.quantize is not None:
        _save(TagGraphPass("float32", fusions)(model).model, reference)
        quantize = QuantizeWeightsPass(MODES[options.quantize], activations)
        model = quantize(model).model
        record = quantize.record()
    _save(TagGraphPass(options.weights, fusions)(model).model, path, one_file=bank is not None, in_place=raw == path)
    return record


def _save(model: ir.Model, path: Path, one_file: bool = False, in_place: bool = False) -> None:
    """Written tensor by tensor, so no second copy of the weights is ever in memory. A baked graph
    (`one_file`) is one file where protobuf allows: it has no prefix graph to share its weights with.
    `in_place`: the model was read from `path` and its weights file is the one it keeps; only the graph
    is rewritten (the passes' few new tensors inline), so a multi-GB file is not copied."""
    if in_place:
        ir.save(model, path)
        path.with_name(path.name + WEIGHTS_SUFFIX).chmod(path.stat().st_mode & 0o777)  # written private
        return
    if one_file and _weight_bytes(model) < PROTOBUF_LIMIT:
        ir.save(ir.external_data.load_to_model(model), path)  # a directly written raw graph's weights are files
        return
    ir.save(model, path, external_data=path.name + WEIGHTS_SUFFIX, size_threshold_bytes=1024)
    path.with_name(path.name + WEIGHTS_SUFFIX).chmod(path.stat().st_mode & 0o777)  # written private


def _weight_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def _check(model: ir.Model, beside: Path) -> None:
    """The ONNX checker over the wired graph. A graph whose weights still lie in one file in `beside`
    (the raw graph's) is checked beside that file, its weights read in place rather than copied to a
    scratch file first (gigabytes at a 1B model)."""
    external = [value.const_value for value in model.graph.initializers.values()
                if isinstance(value.const_value, ir.ExternalTensor)]
    if all(Path(tensor.base_dir) == beside for tensor in external):
        proto = ir.to_proto(model)
        if proto.ByteSize() < PROTOBUF_LIMIT:
            with tempfile.NamedTemporaryFile(dir=beside, suffix=".onnx") as checked:
                checked.write(proto.SerializeToString())
                checked.flush()
                onnx.checker.check_model(checked.name)
            return
    with tempfile.TemporaryDirectory(dir=beside) as folder:
        path = Path(folder) / "checked.onnx"
        ir.save(model, path, external_data="checked.onnx.data", size_threshold_bytes=1024)
        onnx.checker.check_model(str(path))
