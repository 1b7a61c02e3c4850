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
# Decoder prefix graph (prefix_model.onnx): the frozen model over virtual-token embeddings.
PREFIX_GRAPH = "prefix_model.onnx"
LOGITS_POSITIONS = "logits_positions"  # the core graph's: [batch, K] positions whose logits it computes
CORE_GRAPH = "core_model.onnx"  # decoder, unbaked: the main graph without its prefix inputs (the Python runtime's)
# decoder, unbaked: the core graph attending with GroupQueryAttention, whose past and present may be one buffer
INPLACE_GRAPH = "core_inplace_model.onnx"
INPUTS_EMBEDS = "inputs_embeds"  # [batch, n_virtual, hidden]
# Encoder graphs (family "encoder"): virtual-token embeddings in, the body's states out.
PROMPT_EMBEDS = "prompt_embeds"  # [batch, n_prompt, hidden]
PROMPT_MASK = "prompt_mask"  # [batch, n_prompt], 1 where a row has a virtual token
TOKEN_TYPE_IDS = "token_type_ids"  # [batch, seq], the text of a sentence pair a token is in (bodies that take it)
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


def stack_prefixes(prefixes: list[np.ndarray], axis: int = 3, min_slots: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-row prompts into a graph input: KV prefixes [layers, 2, kv_heads, n, head_dim] (axis 3)
    or virtual-token embeddings [n, hidden] (axis 0).

    Returns them stacked [count, ...] and a mask [count, longest]. Shorter prompts are left-padded along
    `axis` with zero slots whose mask is 0, so every row sees only its own; `min_slots` keeps a graph
    input from being empty. One prompt that needs no padding comes back as a view of itself, not a
    copy: a long prompt costs nothing per request.
    """
    longest = max([min_slots, *(p.shape[axis] for p in prefixes)])
    if len(prefixes) == 1 and prefixes[0].shape[axis] == longest:
        return prefixes[0][None], np.ones((1, longest), np.int64)
    shape = list(prefixes[0].shape)
    shape[axis] = longest
    stacked = np.zeros([len(prefixes), *shape], np.float32)
    mask = np.zeros((len(prefixes), longest), np.int64)
    for row, prefix in enumerate(prefixes):
        n = prefix.shape[axis]
        slots = [slice(None)] * prefix.ndim
        slots[axis] = slice(longest - n, longest)
        stacked[row][tuple(slots)] = prefix
        mask[row, longest - n:] = 1
    return stacked, mask
