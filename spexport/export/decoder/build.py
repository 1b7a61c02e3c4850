"""The decoder's graphs, each derived by onnx-ir passes from the one core graph that graph.py writes.

The core graph (the frozen model with the ports clients see) is made fast and given its weights' type once:
  RestoreInputPass          a traced graph's pruned position_ids, back as an unread input
  FuseRotaryEmbeddingPass, FuseTransformerOpsPass, ScaleQueriesNotKeysPass
                            (a traced graph, optimized; a directly written one holds these operators already)
  ConvertToFloat16Pass      (--dtype float16)
  QuantizeWeightsPass       (--quantize)
  TagGraphPass              the weights' type and the fused operators, in its metadata
and its weights are written once, to model.onnx.data. Every graph of the artifact is then a few passes over it
that add no weights of note, each file reading that one weights file:
  model.onnx          AddPrefixInputsPass [BakePromptBankPass] MergePrefixIntoPastConcatPass: the prefix ports
                      that C++, C#, Node and onnxruntime-genai clients use
  core_model.onnx     GatherLogitsPositionsPass: the graph the Python runtime runs (it joins a row's prefix as its
                      first step's past, so the prefix wiring's copies of the cache would only cost it)
  core_inplace_model.onnx
                      ... UseGroupQueryAttentionPass: the same, its KV cache written in place (ONNX Runtime 1.32+);
                      only where every layer's attention converts
  prefix_model.onnx   TakeEmbeddingsInputPass: virtual-token embeddings in, their KV out (`spexport add`)
A baked graph takes task_ids, which neither the core graph nor `spexport add` serves: it is its artifact's one
graph. Fusions, fp16 and quantization change the frozen model before any prompt is wired in, so the prompt bank
(an input, or baked constants) and every port stay float32.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import PassBase, PreconditionError, Sequential

from spexport.artifact.files import GRAPH, WEIGHTS_SUFFIX
from spexport.artifact.manifest import ModelInfo
from spexport.artifact.ports import CORE_GRAPH, INPLACE_GRAPH, PREFIX_GRAPH
from spexport.errors import ModelError, SpexportError
from spexport.export.common import ExportOptions
from spexport.export.decoder.graph import POSITION_IDS, CoreGraph
from spexport.export.passes import (
    AddPrefixInputsPass,
    BakePromptBankPass,
    ConvertToFloat16Pass,
    FuseRotaryEmbeddingPass,
    FuseTransformerOpsPass,
    GatherLogitsPositionsPass,
    MergePrefixIntoPastConcatPass,
    QuantizeWeightsPass,
    RestoreInputPass,
    ScaleQueriesNotKeysPass,
    TagGraphPass,
    TakeEmbeddingsInputPass,
    UseGroupQueryAttentionPass,
)
from spexport.export.passes.float16 import PROTOBUF_LIMIT
from spexport.export.passes.quantize import MODES, recorded
from spexport.families import DECODER

SMALL = 1024  # bytes: tensors under this stay inside each graph file, the rest go to the shared weights file


@dataclass(frozen=True)
class Graphs:
    """What build() wrote beside the main graph: the core, prefix and in-place graphs' file names (None: none), and
    the quantization's record (passes/quantize.py's `recorded`; None unquantized)."""

    core_graph: str | None
    prefix_graph: str | None
    inplace_graph: str | None
    quantization: dict | None


def build(options: ExportOptions, core: CoreGraph, info: ModelInfo, out: Path,
          bank: tuple[np.ndarray, np.ndarray] | None = None, reference: Path | None = None,
          activations=None) -> Graphs:
    """The artifact's graphs from `core`, made fast and typed as `options` say, written to `out` (GRAPH, and
    unless a `bank` is baked in, CORE_GRAPH and PREFIX_GRAPH). `bank`: kv [tasks, ...] and mask [tasks, n] to
    bake in. Quantizing, the float32 main graph is also written to the folder `reference` (for the drift
    report). `activations` (export/calibrate.py) let GPTQ round the weights. A core graph written into `out`
    itself (as GRAPH) keeps its weights file there: a float32 graph's weights are then written once in all."""
    model = ir.load(core.path)
    _check(run(main_graph(info, None), model.clone()), core.path.parent)
    model = run(speedups(options, info, core), model)
    record = None
    if options.quantize is not None:
        float32 = run(TagGraphPass("float32", core.fused), model.clone())
        write_graphs(float32, reference, info, bank, main_only=True)
        model = run(QuantizeWeightsPass(MODES[options.quantize], activations), model)
        record = recorded(model)
    model = run(TagGraphPass(options.weights, core.fused), model)
    graphs = write_graphs(model, out, info, bank, in_place=core.path == out / GRAPH)
    return Graphs(*graphs, quantization=record)


def speedups(options: ExportOptions, info: ModelInfo, core: CoreGraph) -> list[PassBase]:
    """The passes that make the core graph fast and give it its weights' type (quantization apart: its record
    is the drift report's)."""
    steps: list[PassBase] = []
    if not core.written:
        steps.append(RestoreInputPass(POSITION_IDS, ir.DataType.INT64, ["batch_size", "sequence_length"], 2))
        if options.optimize and DECODER.fusion_type:
            steps += [FuseRotaryEmbeddingPass(info.max_positions),
                      FuseTransformerOpsPass(DECODER.fusion_type, info.hidden_size // info.head_dim, info.hidden_size,
                                             workdir=core.path.parent),
                      ScaleQueriesNotKeysPass()]
    if options.dtype == "float16":
        steps.append(ConvertToFloat16Pass())
    return steps


def main_graph(info: ModelInfo, bank: tuple[np.ndarray, np.ndarray] | None) -> list[PassBase]:
    """The passes that give the core graph the prefix ports (or a baked bank)."""
    steps: list[PassBase] = [AddPrefixInputsPass(info.num_layers, info.num_kv_heads, info.head_dim)]
    if bank is not None:
        steps.append(BakePromptBankPass(*bank))
    return [*steps, MergePrefixIntoPastConcatPass()]


def write_graphs(model: ir.Model, out: Path, info: ModelInfo, bank=None, in_place: bool = False,
                 main_only: bool = False) -> tuple[str | None, str | None, str | None]:
    """Write the graphs derived from the core graph `model` to `out`, sharing one weights file; return the core,
    prefix and in-place graphs' names (None where there is none). `in_place`: `model`'s weights are in out's weights
    file already. `model` becomes the main graph."""
    out.mkdir(exist_ok=True)
    if bank is not None:
        _save_baked(run(main_graph(info, bank), model), out / GRAPH)
        return None, None, None
    if not in_place:
        weights = out / (GRAPH + WEIGHTS_SUFFIX)
        ir.external_data.unload_from_model(model, out, weights.name, size_threshold_bytes=SMALL)
    core_graph = prefix_graph = inplace_graph = None
    if not main_only:
        core = run(GatherLogitsPositionsPass(), model.clone())
        ir.save(core, out / CORE_GRAPH)
        core_graph = CORE_GRAPH
        if UseGroupQueryAttentionPass()(core).modified:
            ir.save(core, out / INPLACE_GRAPH)
            inplace_graph = INPLACE_GRAPH
        try:
            ir.save(run(TakeEmbeddingsInputPass(), model.clone()), out / PREFIX_GRAPH)
            prefix_graph = PREFIX_GRAPH
        except ModelError as e:  # its precondition; the artifact serves as ever, `spexport add` refuses embeddings
            warnings.warn(f"the decoder graph has {e}, so the artifact gets no prefix graph", stacklevel=2)
    ir.save(run(main_graph(info, None), model), out / GRAPH)
    _readable_like(out / GRAPH)
    return core_graph, prefix_graph, inplace_graph


def run(passes: PassBase | list[PassBase], model: ir.Model) -> ir.Model:
    """`passes` over `model`, a list as one Sequential; a precondition that failed with spexport's own error
    raises that error."""
    if isinstance(passes, list):
        if not passes:
            return model
        passes = Sequential(*passes)
    try:
        return passes(model).model
    except PreconditionError as e:
        if isinstance(e.__cause__, SpexportError):
            raise e.__cause__ from None
        raise


def _save_baked(model: ir.Model, path: Path) -> None:
    """One file where protobuf allows: a baked graph has no other graph to share its weights with."""
    weights = sum(value.const_value.nbytes for value in model.graph.initializers.values()
                  if value.const_value is not None)
    if weights < PROTOBUF_LIMIT:
        ir.save(ir.external_data.load_to_model(model), path)
    else:
        ir.save(model, path, external_data=path.name + WEIGHTS_SUFFIX, size_threshold_bytes=SMALL)
        _readable_like(path)


def _check(model: ir.Model, beside: Path) -> None:
    """The ONNX checker over the prefix passes' output, before any fusion (the checker does not know ONNX
    Runtime's operators of the default domain). A graph whose weights lie in one file in `beside` is checked
    beside that file, its weights read in place rather than copied to a scratch file (gigabytes at 1B)."""
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
        ir.save(model, path, external_data="checked.onnx.data", size_threshold_bytes=SMALL)
        onnx.checker.check_model(str(path))


def _readable_like(graph: Path) -> None:
    """The weights file gets the graph's permissions (onnx-ir writes it private)."""
    graph.with_name(graph.name + WEIGHTS_SUFFIX).chmod(graph.stat().st_mode & 0o777)
