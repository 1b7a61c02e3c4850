"""Decoder-only models: every task becomes a per-layer KV prefix, computed once here.

graph.py writes (or traces) the frozen model's decoder-with-past graph, the core graph; build.py derives the
artifact's graphs from it with onnx-ir passes. Virtual tokens come first and attend only to
each other, so their keys and values never depend on a request: prompt tuning, P-tuning and
multitask prompt tuning run through the frozen model once, and prefix tuning is a prefix already.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path

import numpy as np

from spexport.artifact import ort_adapters, tensorfile
from spexport.artifact.genai import write_genai_config
from spexport.artifact.manifest import Manifest, ModelInfo
from spexport.artifact.ports import stack_prefixes
from spexport.converters.bank import bank_entry
from spexport.errors import ModelError
from spexport.export import calibrate, drift
from spexport.export.calibrate import Activations
from spexport.export.common import (
    BANK,
    GRAPH,
    ExportOptions,
    building,
    convert_adapters,
    finish,
    pretrained,
    quiet_tracing,
    read_configs,
    within_vocab,
)
from spexport.export.decoder import quality
from spexport.export.decoder.build import Graphs, build
from spexport.export.decoder.direct import builds
from spexport.export.decoder.graph import export_decoder
from spexport.export.passes.quantize import MODES
from spexport.export.transformers_api import output_cache
from spexport.families import DECODER, model_info


def convert(model_dir: Path, adapters: list[tuple[str, Path]], output: Path, options: ExportOptions) -> Manifest:
    """Export a decoder-only model with every adapter into one artifact at `output`, atomically."""
    info = read_info(model_dir, options.trust_remote_code)
    options.on_step("converting adapters")
    prompts = convert_adapters(adapters, info, DECODER, model_dir)  # every check before the model loads
    with building(output) as staging:
        options.on_step("loading the frozen model")
        model = load_model(model_dir, options.trust_remote_code)
        bank, tasks = {}, []
        for name, prompt in prompts.items():
            options.on_step(f"computing the KV prefix of {name}")
            task, bank[name] = bank_entry(name, prompt, lambda embeddings: embeddings_to_kv(model, embeddings))
            tasks.append(task)
        if not options.bake:
            tensorfile.save(bank, staging / BANK)
            ort_adapters.write_adapters(bank, staging)
        options.on_step("exporting the frozen model to ONNX")
        baked = stack_prefixes(list(bank.values())) if options.bake else None
        activations = None
        if options.quantize and MODES[options.quantize].gptq:
            options.on_step("reading calibration activations")
            activations = Activations.collect(model, calibrate.rows_of(drift.TextEncoder(model_dir), info.vocab_size,
                                                                       info.max_positions))
        graphs = export_graph(model, info, staging, options, baked, activations)
        record = graphs.quantization
        if record is not None:
            options.on_step(f"measuring the {options.quantize} graph's drift from float32")
            record["drift"] = quality.measure_drift(staging, GRAPH, info, tasks, None if options.bake else BANK,
                                                    drift.TextEncoder(model_dir))
            shutil.rmtree(staging / drift.REFERENCE)
        if not options.bake:  # baked graphs take task_ids, which neither tasks.py nor genai can add to
            write_genai_config(staging, info, GRAPH, model_dir / "config.json")
        return finish(staging, output, model_dir, family=DECODER.name, model=info, graph=GRAPH,
                      prompt_bank=None if options.bake else BANK, tasks=tasks, baked=options.bake,
                      ensembles=options.ensembles, core_graph=graphs.core_graph, prefix_graph=graphs.prefix_graph,
                      inplace_graph=graphs.inplace_graph,
                      **({"quantization": record} if record is not None else {}))


def read_info(model_dir: Path, trust_remote_code: bool = False) -> ModelInfo:
    """The frozen model's ModelInfo, from its config files alone (no weights are read)."""
    return within_vocab(model_info(*read_configs(model_dir, trust_remote_code)))


def load_model(model_dir: Path, trust_remote_code: bool = False):
    """The frozen causal LM in float32."""
    from transformers import AutoModelForCausalLM

    return pretrained(AutoModelForCausalLM, model_dir, trust_remote_code)


def embeddings_to_kv(model, embeddings: np.ndarray) -> np.ndarray:
    """Run the frozen model once over virtual-token embeddings; return their per-layer KV.

    Virtual tokens come first and attend only to each other, so their keys and values do not
    depend on anything a request sends: computing them here is exact.
    """
    import torch

    with torch.no_grad():
        out = model(inputs_embeds=torch.from_numpy(embeddings)[None], use_cache=True)
    cache = output_cache(out)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return np.stack([np.stack([k[0].numpy(), v[0].numpy()]) for k, v in layers]).astype(np.float32)


def export_graph(model, info: ModelInfo, out: Path, options: ExportOptions, bank=None, activations=None) -> Graphs:
    """The frozen model's graphs, written (or traced) once as its core graph and derived from it as `options`
    say (build.py), into `out`. Quantizing, the float32 main graph stays beside them under drift.REFERENCE.

    Once the core graph is written, `model`'s weights move to torch's meta device (convert needs them no more)
    and are freed, so the graph passes run with one copy of the weights in memory, not two.
    """
    reference = out / drift.REFERENCE if options.quantize else None
    direct = writes_directly(options, model, info)
    with tempfile.TemporaryDirectory() as scratch, quiet_tracing():
        # a directly written float32 unbaked graph is written where it stays, its weights file the artifact's
        # (the fusions of a traced graph and the other weight types write new tensors)
        in_place = direct and options.weights == "float32" and bank is None
        core = export_decoder(model, info, out / GRAPH if in_place else Path(scratch) / GRAPH, direct)
        model.to("meta")
        gc.collect()  # the writer's onnx-ir graph, views of the weights, is a reference cycle: freed only by gc
        return build(options, core, info, out, bank, reference, activations)


def writes_directly(options: ExportOptions, model, info: ModelInfo) -> bool:
    """Whether the core graph is written directly (direct.py, ONNX Runtime's fused operators) or traced: as
    options.writer says, and with "auto", directly where spexport knows the layers and fused operators are
    wanted (--no-optimize asks for plain ONNX operators, which only the tracer writes)."""
    if options.writer == "trace":
        return False
    if options.writer == "direct":
        if not builds(model, info):
            raise ModelError(f"spexport does not write {info.model_type} graphs like this one directly (their layers "
                             "differ from the ones direct.py knows); leave out --writer direct to trace it")
        return True
    return options.optimize and builds(model, info)
