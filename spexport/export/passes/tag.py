"""Record how a graph was built in its metadata, for `spexport inspect` and bug reports.

A pass that fuses operators records its count here (`record_fusions`) as part of the model it returns, so a
pipeline's results travel with the graph rather than on the pass objects."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

WEIGHTS_KEY = "spexport.weights"  # float32, int8 or float16
FUSIONS_KEY = "spexport.fusions"  # the fused operators and their counts
SCALED_QUERY = "MatMulScaledQuery"  # in FUSIONS_KEY: attention products whose scale moved to the query


def fusions(model: ir.Model) -> dict[str, int]:
    """The fused operators recorded in `model`'s metadata so far, and how many of each."""
    entries = model.metadata_props.get(FUSIONS_KEY, "")
    return {op: int(n) for op, n in (entry.rsplit(":", 1) for entry in entries.split(",") if entry)}


def record_fusions(model: ir.Model, counts: dict[str, int]) -> None:
    """Add `counts` (operator: how many were fused) to those `model` records."""
    merged = fusions(model)
    for op, n in counts.items():
        if n:
            merged[op] = merged.get(op, 0) + n
    model.metadata_props[FUSIONS_KEY] = ",".join(f"{op}:{n}" for op, n in sorted(merged.items()))


class TagGraphPass(InPlacePass):
    """The weights' type, and any `fused` operators not recorded by a pass (a directly written graph's)."""

    def __init__(self, weights: str, fused: dict[str, int] | None = None):
        super().__init__()
        self.weights, self.fused = weights, dict(fused or {})

    def call(self, model: ir.Model) -> PassResult:
        record_fusions(model, self.fused)
        model.metadata_props[WEIGHTS_KEY] = self.weights
        return PassResult(model, modified=True)
