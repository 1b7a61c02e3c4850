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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from spexport.artifact.manifest import ModelInfo
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


@dataclass(frozen=True)
class Speed:
    """How `spexport convert` builds the graph: fused or not, and the weights' type
    (`families.Family.check` has refused values the family does not offer)."""

    optimize: bool = True
    quantize: str | None = None  # "int8", "int4": passes/quantize.py's MODES
    dtype: str = "float32"  # "float16": for GPU providers

    @property
    def weights(self) -> str:
        return self.quantize or self.dtype

    def build(self, raw: Path, info: ModelInfo, path: Path, bank: tuple[np.ndarray, np.ndarray] | None = None,
              reference: Path | None = None, fused: dict[str, int] | None = None, activations=None) -> dict | None:
        """Wire the prefix inputs (or a baked `bank`: kv [tasks, ...] and mask [tasks, n]) into the plain
        decoder graph at `raw`, speed it up, tag it and write it to `path` (raw's folder takes scratch files).

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
        _check(model, path.parent)
        fusions = dict(fused or {})
        if fused is None and self.optimize and DECODER.fusion_type:
            rotary = FuseRotaryEmbeddingPass(info.max_positions)
            fuse = FuseTransformerOpsPass(DECODER.fusion_type, info.hidden_size // info.head_dim, info.hidden_size,
                                          workdir=raw.parent)
            scale = ScaleQueriesNotKeysPass()
            model = scale(fuse(rotary(model).model).model).model
            fusions = {**fuse.counts, **({ROTARY: rotary.fused} if rotary.fused else {}),
                       **({SCALED_QUERY: scale.moved} if scale.moved else {})}
        if self.dtype == "float16":
            model = ConvertToFloat16Pass()(model).model
        record = None
        if self.quantize is not None:
            _save(TagGraphPass("float32", fusions)(model).model, reference)
            quantize = QuantizeWeightsPass(MODES[self.quantize], activations)
            model = quantize(model).model
            record = quantize.record()
        _save(TagGraphPass(self.weights, fusions)(model).model, path, one_file=bank is not None)
        return record


def _save(model: ir.Model, path: Path, one_file: bool = False) -> None:
    """Written tensor by tensor, so no second copy of the weights is ever in memory. A baked graph
    (`one_file`) is one file where protobuf allows: it has no prefix graph to share its weights with."""
    if one_file and _weight_bytes(model) < PROTOBUF_LIMIT:
        ir.save(ir.external_data.load_to_model(model), path)  # a directly written raw graph's weights are files
        return
    ir.save(model, path, external_data=path.name + WEIGHTS_SUFFIX, size_threshold_bytes=1024)
    path.with_name(path.name + WEIGHTS_SUFFIX).chmod(path.stat().st_mode & 0o777)  # written private


def _weight_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def _check(model: ir.Model, beside: Path) -> None:
    """The ONNX checker over the wired graph, read from a file whose weights lie in external data."""
    with tempfile.TemporaryDirectory(dir=beside) as folder:
        path = Path(folder) / "checked.onnx"
        ir.save(model, path, external_data="checked.onnx.data", size_threshold_bytes=1024)
        onnx.checker.check_model(str(path))
