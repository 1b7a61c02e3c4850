"""The command line's tables: a quantized artifact's record as convert prints it."""

from spexport.tables import quantization_lines


def test_the_record_names_each_fallback_and_every_tasks_drift():
    record = {"bits": 4, "method": "round to nearest", "block_size": 32, "matrices": 5, "head": "int8",
              "embedding": "int8, shared with the head", "fallbacks": {"h.0.mlp": "block 16", "h.1.mlp": "float32"},
              "drift": {"reference": "float32 graph", "prompts": 4, "new_tokens": 16,
                        "tasks": {"pt": {"agreement": 0.96875, "max_abs_diff": 0.5, "positions": 64}}}}
    lines = quantization_lines(record)
    assert lines[0] == ("int4 weights (round to nearest, blocks of 32, 5 matrices), head int8, "
                        "embedding int8, shared with the head")
    assert lines[1:3] == ["  h.0.mlp: block 16 (its inputs do not split into blocks of 32)",
                          "  h.1.mlp: float32 (its inputs do not split into blocks of 32)"]
    assert lines[3] == "drift from the float32 graph (4 fixed prompts, 16 greedy tokens each):"
    assert lines[4].split() == ["task", "top-1", "agreement", "max", "|Δlogits|"]
    assert lines[5].split() == ["pt", "0.969", "0.5"]
