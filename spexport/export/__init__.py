"""`spexport convert`: frozen model + soft-prompt adapters -> one ONNX artifact folder.

The model's family (families.py) names the exporter; each family package builds its graphs and
prompt bank in a staging folder, and common.py seals and moves the artifact into place. Needs the
`[export]` extra (torch, transformers, peft, onnx, onnx-ir).
"""

from __future__ import annotations

import os

# Converting never touches the network: a model or tokenizer must come from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

from spexport.artifact.manifest import Manifest  # noqa: E402
from spexport.errors import ModelError  # noqa: E402
from spexport.export import encoder  # noqa: E402
from spexport.export.common import ExportOptions, check_output, parse_adapters, read_model_type  # noqa: E402
from spexport.families import family_for  # noqa: E402

__all__ = ["ExportOptions", "convert"]


def convert(model_dir: Path, adapters: list[tuple[str, Path]], output: Path, overwrite: bool = False,
            options: ExportOptions | None = None, **choices) -> Manifest:
    """Export `model_dir` with every adapter into one artifact at `output`, atomically.

    options: how to build it, one ExportOptions that goes unchanged to the family's exporter and its graph
    passes; or its fields as keywords (`choices`), as follows.
    bake: put the prompt bank into the graph as constants, selected by a `task_ids` input (decoders).
    optimize: fuse norms, activations and rotary embeddings into ONNX Runtime operators (faster;
    the graph then needs ONNX Runtime). writer: "auto", "direct" or "trace", how a decoder's graph is made
    (ExportOptions says more). quantize="int8" / "int4" / "int4-exact": block-wise 8- or 4-bit weights
    for every matrix product (MatMulNBits; docs/quantization.md says which to choose), with the drift from
    float32 measured and stored in the manifest.
    dtype="float16": fp16 weights and compute, for GPU providers. Prompts and the graph's inputs
    and outputs stay float32 either way.
    trust_remote_code: run Python code that the model folder ships (config.json's auto_map).
    ensembles: prompt ensembles {name: [member task, ...]} to store (each of at least two tasks).
    on_step: called with each step's description as it starts (the CLI's progress bar).
    """
    if options is None:
        options = ExportOptions(**choices)
    elif choices:
        raise TypeError(f"pass options or its fields, not both: {', '.join(choices)}")
    model_dir, output = Path(model_dir), Path(output)
    # Checked before transformers reads it: transformers would guess a model type from the folder's name.
    model_type, _ = read_model_type(model_dir)
    try:
        family = family_for(model_type)
    except ModelError as e:
        encoder.explain_unsupported(model_dir, model_type)
        raise ModelError(f"{model_dir}: {e}") from None
    family.check(options.bake, options.quantize, options.dtype, options.writer)
    adapters = parse_adapters(adapters)
    output = check_output(output, [model_dir] + [Path(path) for _, path in adapters], overwrite)
    return family.exporter(model_dir, adapters, output, options)
