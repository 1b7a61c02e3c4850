"""Checking what callers pass, so a bad request fails with a message instead of an ORT trace."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from spexport.errors import InputError

MAX_BATCH_SIZE = 1024  # rows per call unless load(max_batch_size=...) says otherwise


def as_token_matrix(input_ids, vocab_size: int, max_rows: int = MAX_BATCH_SIZE) -> np.ndarray:
    try:
        ids = np.asarray(input_ids)
    except (ValueError, TypeError):
        raise InputError("input_ids rows have different lengths; pad them and pass an attention_mask") from None
    if ids.dtype == object or ids.ndim not in (1, 2):
        raise InputError("input_ids must be a [batch, seq] array of token ids (pad ragged rows)")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.size == 0:
        raise InputError("input_ids is empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must hold integers, got {ids.dtype}")
    if len(ids) > max_rows:
        raise InputError(f"a batch of {len(ids)} rows is more than this model serves at once ({max_rows}); "
                         "split it, or pass a larger max_batch_size to load()")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InputError(f"input_ids holds token ids outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64)


def as_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int64)
    try:
        mask = np.asarray(attention_mask)
    except (ValueError, TypeError):
        raise InputError("attention_mask rows have different lengths; it must match input_ids") from None
    if mask.shape != shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(shape)}")
    if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool) or not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    if not mask.any(axis=1).all():
        raise InputError("every row needs at least one token with attention_mask 1")
    return mask.astype(np.int64)


def as_token_types(token_type_ids, shape: tuple[int, int]) -> np.ndarray:
    try:
        types = np.asarray(token_type_ids)
    except (ValueError, TypeError):
        raise InputError("token_type_ids rows have different lengths; it must match input_ids") from None
    if types.shape != shape:
        raise InputError(f"token_type_ids has shape {list(types.shape)}, input_ids {list(shape)}")
    if not np.issubdtype(types.dtype, np.integer) or not np.isin(types, (0, 1)).all():
        raise InputError("token_type_ids must hold only 0 and 1 (first and second text of a pair)")
    return types.astype(np.int64)


def task_indices(task: str | Sequence[str] | None, tasks: list[str], batch: int) -> list[int]:
    """Each row's task id; `task` is one name, one per row, or None when the artifact has one task."""
    if task is None:
        if len(tasks) != 1:
            raise InputError(f"pass task=: one name, or one per row, of {', '.join(tasks)}")
        task = tasks[0]
    try:
        names = [task] * batch if isinstance(task, str) else list(task)
    except TypeError:
        names = None
    if names is None or not all(isinstance(name, str) for name in names):
        raise InputError(f"task must be a task name or a list of names, one per row; got {type(task).__name__}")
    if len(names) != batch:
        raise InputError(f"task lists {len(names)} names for a batch of {batch} rows; give one, or one per row")
    index = {name: i for i, name in enumerate(tasks)}
    for name in names:
        if name not in index:
            raise InputError(f"unknown task {name!r}; this artifact has: {', '.join(tasks)}")
    return [index[name] for name in names]


def text_rows(texts, pairs: bool) -> list[str | tuple[str, str]]:
    """The rows of a text verb: a string or a list of them; where `pairs`, also sentence pairs as
    (text, text_pair) tuples or {"text": ..., "text_pair": ...} dicts (transformers' pipeline form)."""
    one = isinstance(texts, str) or (pairs and isinstance(texts, dict))
    rows = [texts] if one else texts
    forms = "a string or a non-empty list of strings" + (
        ", (text, text_pair) tuples or {'text': ..., 'text_pair': ...} dicts" if pairs else "")
    if isinstance(rows, (bytes, dict)) or not isinstance(rows, Sequence) or not rows:
        raise InputError(f"texts must be {forms}")
    checked = []
    for i, row in enumerate(rows):
        pair = row if isinstance(row, str) else _pair(row)
        if pair is None:
            raise InputError(f"texts[{i}] is of type {type(row).__name__}, not str; pass only strings"
                             + (" or sentence pairs" if pairs else ""))
        if not pairs and not isinstance(pair, str):
            raise InputError(f"texts[{i}] is a sentence pair; pairs are for classifier artifacts (classify), "
                             "this model continues one text per row")
        for text in [pair] if isinstance(pair, str) else pair:
            _check_utf8(i, text)
        checked.append(pair)
    return checked


def _check_utf8(i: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: how Python keeps bytes that were not UTF-8
        raise InputError(f"texts[{i}] is not valid UTF-8 text (character {e.start} is an undecodable byte); "
                         "pass UTF-8 text") from None


def _pair(row) -> str | tuple[str, str] | None:
    if isinstance(row, dict) and isinstance(row.get("text"), str) and set(row) <= {"text", "text_pair"}:
        second = row.get("text_pair")
        return row["text"] if second is None else (row["text"], second) if isinstance(second, str) else None
    if isinstance(row, (tuple, list)) and len(row) == 2 and all(isinstance(t, str) for t in row):
        return tuple(row)
    return None


def pad_rows(encoded: list, pad_token_id: int | None, left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encodings padded to one width, on the left (generation) or the right: ids, attention mask and
    token type ids [batch, width]."""
    width = max(len(e.ids) for e in encoded)
    ids = np.full((len(encoded), width), pad_token_id or 0, np.int64)
    mask = np.zeros((len(encoded), width), np.int64)
    types = np.zeros((len(encoded), width), np.int64)
    for row, e in enumerate(encoded):
        slots = slice(width - len(e.ids), width) if left else slice(0, len(e.ids))
        ids[row, slots], mask[row, slots], types[row, slots] = e.ids, 1, e.type_ids
    return ids, mask, types


def check_generation(max_new_tokens, do_sample, temperature, top_k, top_p, seed, repetition_penalty=1.0) -> None:
    """Refuse generation settings that would fail, or silently mean something else, deep in the loop."""
    if not is_whole(max_new_tokens) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if seed is not None and (not is_whole(seed) or seed < 0):
        raise InputError(f"seed must be a whole number >= 0 or None, got {seed!r}")
    if not _is_real(repetition_penalty) or not repetition_penalty > 0:
        raise InputError(f"repetition_penalty must be a number > 0 (1.0 is none), got {repetition_penalty!r}")
    if not do_sample:
        return
    if not _is_real(temperature) or not temperature > 0:
        raise InputError(f"temperature must be a number > 0, got {temperature!r}")
    if not is_whole(top_k) or top_k < 0:
        raise InputError(f"top_k must be a whole number >= 0 (0 keeps every token), got {top_k!r}")
    if not _is_real(top_p) or not 0 < top_p <= 1:
        raise InputError(f"top_p must be a number in (0, 1], got {top_p!r}")


def is_whole(value) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


def last_real(mask: np.ndarray) -> np.ndarray:
    """Each row's last real token [batch], wherever its padding is."""
    return mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)


def positions(mask: np.ndarray) -> np.ndarray:
    """Caller-side positions: 0 at each row's first real token, whatever the left padding."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)
