"""Record how a graph was built in its metadata, for `spexport inspect` and bug reports."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

WEIGHTS_KEY = "spexport.weights"  # float32, int8 or float16
FUSIONS_KEY = "spexport.fusions"  # the fused operators and their counts
SCALED_QUERY = "MatMulScaledQuery"  # in FUSIONS_KEY: attention products whose scale moved to the query


def fusions_entry(fusions: dict[str, int]) -> str:
    """FUSIONS_KEY's value: `op:count` pairs, by operator, comma-separated."""
    return ",".join(f"{op}:{n}" for op, n in sorted(fusions.items()))


class TagGraphPass(InPlacePass):
    def __init__(self, weights: str, fusions: dict[str, int]):
        super().__init__()
        self.entries = {WEIGHTS_KEY: weights, FUSIONS_KEY: fusions_entry(fusions)}

    def call(self, model: ir.Model) -> PassResult:
        model.metadata_props.update(self.entries)
        return PassResult(model, modified=True)
