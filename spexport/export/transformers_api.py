"""The parts of transformers' API that the exporters trace through, alike on transformers 4.56+ and 5.x.

transformers 5 renamed the cache argument and output field `past_key_values` to `cache`, and builds
attention masks by broadcasting; 4.x builds them with torch.vmap, which TorchScript cannot trace.
Everything that differs between the two lives here, so the exporters read the same on both.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Sequence
from unittest import mock

import torch


def cache_argument(module: torch.nn.Module) -> str | None:
    """The name under which `module`'s forward takes a KV cache, or None when it takes none."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def output_cache(output):
    """The cache a transformers model output holds (`cache` in 5.x, `past_key_values` in 4.x)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def seeded_cache(past: Sequence[torch.Tensor]):
    """A DynamicCache holding a caller's past [key0, value0, key1, value1, ...], one full layer each.

    DynamicLayer.update joins its first keys to an empty tensor; each layer's keys are then set to
    the past itself, so a traced graph reads every past once, in the Concat that appends the new
    token (the Concat the prefix passes extend). No layer is a sliding-window one: the graph keeps
    the whole past, and the attention mask applies any window.
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for layer in range(len(past) // 2):
        key, value = past[2 * layer], past[2 * layer + 1]
        cache.update(key, value, layer)
        cache.layers[layer].keys, cache.layers[layer].values = key, value
    return cache


@contextlib.contextmanager
def traceable_masks():
    """While tracing, transformers 4.x builds attention masks by broadcasting instead of torch.vmap.

    4.x's masking_utils runs its index-based mask functions under vmap (and an indexing mode for
    vmap), which TorchScript cannot trace; the same functions broadcast over index grids give the
    same masks. transformers 5 builds masks this way already, and nothing is patched there.
    """
    import transformers
    from transformers import masking_utils

    if int(transformers.__version__.split(".")[0]) >= 5:
        yield
        return
    with mock.patch.object(masking_utils, "_vmap_for_bhqkv", _broadcast_over_indices), \
            mock.patch.object(masking_utils, "TransformGetItemToIndex", contextlib.nullcontext):
        yield


def _broadcast_over_indices(mask_function, bh_indices: bool = True):
    """What masking_utils._vmap_for_bhqkv returns, computed by broadcasting: the mask
    [batch, heads, q, kv] (bh_indices) or [q, kv] over the given index vectors."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        q, kv = q_idx[:, None], kv_idx[None, :]
        if not bh_indices:
            return mask_function(None, None, q, kv).expand(q_idx.shape[0], kv_idx.shape[0])
        grid = mask_function(batch_idx[:, None, None, None], head_idx[None, :, None, None], q[None, None],
                             kv[None, None])
        return grid.expand(batch_idx.shape[0], head_idx.shape[0], q_idx.shape[0], kv_idx.shape[0])

    return mask
