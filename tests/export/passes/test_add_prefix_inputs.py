import numpy as np
from graphs import D, H, decoder_like, feeds, run

from spexport.export.passes import AddPrefixInputsPass


def _prefix(layers: int, lengths: list[int], longest: int, seed: int = 1):
    """Per-row prefixes left-padded to `longest`, as the runtime stacks them."""
    kv = np.random.default_rng(seed).random((len(lengths), layers, 2, H, longest, D), np.float32)
    mask = np.zeros((len(lengths), longest), np.int64)
    for row, n in enumerate(lengths):
        kv[row, ..., : longest - n, :] = 0
        mask[row, longest - n:] = 1
    return kv, mask


def test_the_graph_sees_each_rows_prefix_and_the_caller_sees_only_its_own_tokens():
    model = decoder_like(layers=2)
    before = run(model, feeds(layers=2))
    AddPrefixInputsPass(num_layers=2, kv_heads=H, head_dim=D)(model)
    kv, mask = _prefix(2, [3, 1], longest=3)
    inputs = feeds(layers=2)
    after = run(model, {**inputs, "kv_prefix": kv, "prefix_mask": mask})

    np.testing.assert_array_equal(after["positions"], inputs["position_ids"] + mask.sum(1, keepdims=True))
    np.testing.assert_array_equal(after["mask"], np.concatenate([mask, inputs["attention_mask"]], axis=1))
    for layer in range(2):
        for part in ("key", "value"):
            name = f"present.{layer}.{part}"  # the caller's past and new tokens, no prefix
            np.testing.assert_array_equal(after[name], before[name])
        past_key = inputs[f"past_key_values.{layer}.key"]
        np.testing.assert_allclose(after[f"past_sum{layer}"], np.concatenate([kv[:, layer, 0], past_key], 2).sum(),
                                   rtol=1e-5)
        assert after[f"past_len{layer}"].tolist() == [3 + 1]


def test_an_empty_prefix_changes_nothing():
    model = decoder_like()
    before = run(model, feeds())
    AddPrefixInputsPass(num_layers=1, kv_heads=H, head_dim=D)(model)
    after = run(model, {**feeds(), "kv_prefix": np.zeros((2, 1, 2, H, 0, D), np.float32),
                        "prefix_mask": np.zeros((2, 0), np.int64)})
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
