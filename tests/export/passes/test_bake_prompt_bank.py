import numpy as np
from graphs import D, H, decoder_like, feeds, run

from spexport.export.passes import AddPrefixInputsPass, BakePromptBankPass


def test_task_ids_pick_the_same_prefix_the_inputs_would_carry():
    kv = np.random.default_rng(3).random((3, 1, 2, H, 2, D), np.float32)
    mask = np.array([[1, 1], [0, 1], [1, 1]], np.int64)
    wired = decoder_like()
    AddPrefixInputsPass(1, H, D)(wired)
    baked = decoder_like()
    AddPrefixInputsPass(1, H, D)(baked)
    BakePromptBankPass(kv, mask)(baked)

    assert [v.name for v in baked.graph.inputs if v.name in ("kv_prefix", "prefix_mask", "task_ids")] == ["task_ids"]
    rows = np.array([2, 1])
    expected = run(wired, {**feeds(), "kv_prefix": kv[rows], "prefix_mask": mask[rows]})
    got = run(baked, {**feeds(), "task_ids": rows})
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
