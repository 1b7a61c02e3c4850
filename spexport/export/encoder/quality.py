"""`--quantize int8` / `int4` for encoders: the shared body graph gets block-wise weights (the task heads
are a few thousand numbers and stay float32), rounded by GPTQ on the body's own calibration activations
where the mode asks for it (export/calibrate.py, as decoders are), and the drift report compares each
task's labels with the float32 body's on fixed texts (export/drift.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from spexport.artifact.manifest import Manifest, ModelInfo, Task
from spexport.export import calibrate, drift
from spexport.export.passes import QuantizeWeightsPass, TagGraphPass
from spexport.export.passes.float16 import PROTOBUF_LIMIT
from spexport.export.passes.quantize import MODES, recorded
from spexport.families import ENCODER


def quantize_body(staging: Path, graph: str, bank: str, info: ModelInfo, tasks: list[Task], quantize: str,
                  model_dir: Path, body, prompts: list[np.ndarray]) -> dict:
    """Quantize `staging`/`graph` (the torch `body`'s export) in place and return the record with its drift
    report (label agreement). `prompts` are the tasks' virtual-token embeddings, which the body reads too."""
    from spexport.runtime import EncoderModel
    from spexport.runtime.device import pick_providers

    activations = None
    if MODES[quantize].gptq:
        rows = calibrate.rows_of(drift.TextEncoder(model_dir), info.vocab_size, info.max_positions)
        activations = calibrate.Activations.collect(body, rows, continued=False, prompts=tuple(prompts))
    (staging / drift.REFERENCE).mkdir()
    shutil.move(staging / graph, staging / drift.REFERENCE / graph)
    quantized = QuantizeWeightsPass(MODES[quantize], activations)(ir.load(staging / drift.REFERENCE / graph)).model
    record = recorded(quantized)
    model = TagGraphPass(quantize)(quantized).model
    proto = ir.to_proto(model)
    onnx.save(proto, staging / graph, save_as_external_data=proto.ByteSize() > PROTOBUF_LIMIT,
              location=graph + ".data")

    def served(path: str):
        manifest = Manifest(family=ENCODER.name, model=info, graph=path, prompt_bank=bank, tasks=tasks)
        return EncoderModel(staging, manifest, pick_providers(None))

    reference, candidate = served(f"{drift.REFERENCE}/{graph}"), served(graph)
    rows = drift.prompt_rows(drift.TextEncoder(model_dir), info, tasks, 2)
    width = max(len(row) for row in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    report = drift.encoder_drift(reference, candidate, [t.name for t in tasks], ids, mask)
    record["drift"] = drift.as_record(report, "float32 graph", len(rows), None)
    del reference, candidate
    shutil.rmtree(staging / drift.REFERENCE)
    return record
