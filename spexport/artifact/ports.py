"""Graph port names that the exporter writes and every runtime and sample reads.

docs/artifact-format.md describes each port; decoder graphs keep optimum-onnx's decoder-with-past
names, so clients written for those graphs find their inputs where they expect them.
"""

from __future__ import annotations

import numpy as np

# Graph input/output names (optimum-onnx's decoder-with-past names plus spexport's prefix inputs).
KV_PREFIX = "kv_prefix"  # [batch, layers, 2, kv_heads, n_prefix, head_dim]
PREFIX_MASK = "prefix_mask"  # [batch, n_prefix], 1 where a row has a virtual token
TASK_IDS = "task_ids"  # [batch], baked graphs only: index into the manifest's task list
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
# Encoder graphs (family "encoder"): virtual-token embeddings in, the body's states out.
PROMPT_EMBEDS = "prompt_embeds"  # [batch, n_prompt, hidden]
PROMPT_MASK = "prompt_mask"  # [batch, n_prompt], 1 where a row has a virtual token
SEQUENCE_OUTPUT = "sequence_output"  # [batch, n_prompt + seq, hidden], each row compacted as it is alone
HIDDEN_STATES = "hidden_states"  # [batch, seq, hidden], the caller's tokens in the caller's slots
POOLER_OUTPUT = "pooler_output"  # [batch, hidden], bodies with a pooler only
# Encoder-decoder graphs (family "seq2seq"): optimum-onnx's encoder and merged-decoder names, plus
# prompt_embeds/prompt_mask into the encoder and kv_prefix/prefix_mask into the decoder's self-attention.
ENCODER_MASK = "encoder_attention_mask"  # [batch, n_prompt + seq], the encoder's output mask, fed to the decoder
ENCODER_STATES = "encoder_hidden_states"  # [batch, n_prompt + seq, hidden], the encoder's last_hidden_state
USE_CACHE_BRANCH = "use_cache_branch"  # [1] bool: false on the first decoder step, true after
CACHE_PAST = "past_key_values.{}.{}.{}"  # layer; "decoder" (self-attention) or "encoder" (cross); "key"/"value"
CACHE_PRESENT = "present.{}.{}.{}"


def cache_names(pattern: str, layers: int, parts: tuple[str, ...] = ("decoder", "encoder")) -> list[str]:
    """A seq2seq decoder's cache names in optimum's order: per layer, self-attention then cross-attention."""
    return [pattern.format(i, part, kv) for i in range(layers) for part in parts for kv in ("key", "value")]


def stack_prefixes(prefixes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-task KV prefixes [layers, 2, kv_heads, n, head_dim] into the graph's layout.

    Returns kv [count, layers, 2, kv_heads, longest, head_dim] and mask [count, longest]; shorter
    prefixes are left-padded with zero slots whose mask is 0, so every row sees only its own. One
    prefix comes back as a view of itself, not a copy: a long prompt costs nothing per request.
    """
    if len(prefixes) == 1:
        return prefixes[0][None], np.ones((1, prefixes[0].shape[3]), np.int64)
    longest = max(p.shape[3] for p in prefixes)
    layers, _, heads, _, head_dim = prefixes[0].shape
    kv = np.zeros((len(prefixes), layers, 2, heads, longest, head_dim), np.float32)
    mask = np.zeros((len(prefixes), longest), np.int64)
    for row, prefix in enumerate(prefixes):
        n = prefix.shape[3]
        kv[row, :, :, :, longest - n:] = prefix
        mask[row, longest - n:] = 1
    return kv, mask
