"""What `--quantize` adds to a decoder export: the drift report of the quantized graph against the float32
one (export/drift.py), run on the staged artifact."""

from __future__ import annotations

from pathlib import Path

from spexport.artifact.manifest import Manifest, ModelInfo, Task
from spexport.export import drift
from spexport.export.drift import REFERENCE
from spexport.families import DECODER


def measure_drift(staging: Path, graph: str, info: ModelInfo, tasks: list[Task], bank: str | None,
                  tokenizer) -> dict:
    """The drift record of the quantized graph `graph` against the float32 one under REFERENCE."""
    from spexport.runtime import DecoderModel
    from spexport.runtime.device import pick_providers
    from spexport.runtime.session import unpacked_options

    def served(path: str, options=None):
        manifest = Manifest(family=DECODER.name, model=info, graph=path, prompt_bank=bank, tasks=tasks,
                            baked=bank is None)
        return drift.Served(DecoderModel(staging, manifest, pick_providers(None), options=options))

    rows = drift.prompt_rows(tokenizer, info, tasks, drift.NEW_TOKENS)
    # one graph loaded at a time: the float32 one alone is the weights' size. It runs a few short texts once, so
    # its weights are not packed (packing holds them twice while the session opens: a 1B model 5.9 GB, not 4.9)
    texts = drift.reference_texts(served(f"{REFERENCE}/{graph}", unpacked_options()), [t.name for t in tasks], rows,
                                  info.eos_token_ids)
    report = drift.compared_with(served(graph), texts)
    return drift.as_record(report, "float32 graph", len(rows), drift.NEW_TOKENS)
