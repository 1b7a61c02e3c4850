"""Checking what callers pass, so a bad request fails with a message instead of an ORT trace."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spexport.errors import InputError


def as_token_matrix(input_ids, vocab_size: int) -> np.ndarray:
    try:
        ids = np.asarray(input_ids)
    except ValueError:
        raise InputError("input_ids rows have different lengths; pad them and pass an attention_mask") from None
    if ids.dtype == object or ids.ndim not in (1, 2):
        raise InputError("input_ids must be a [batch, seq] array of token ids (pad ragged rows)")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.size == 0:
        raise InputError("input_ids is empty")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must hold integers, got {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InputError(f"input_ids holds token ids outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64)


def as_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    if attention_mask is None:
        return np.ones(shape, np.int64)
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise InputError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise InputError("attention_mask must hold only 0 and 1")
    if not mask.any(axis=1).all():
        raise InputError("every row needs at least one token with attention_mask 1")
    return mask.astype(np.int64)


def task_indices(task: str | Sequence[str], tasks: list[str], batch: int) -> list[int]:
    names = [task] * batch if isinstance(task, str) else list(task)
    if len(names) != batch:
        raise InputError(f"task lists {len(names)} names for a batch of {batch} rows; give one, or one per row")
    index = {name: i for i, name in enumerate(tasks)}
    for name in names:
        if name not in index:
            raise InputError(f"unknown task {name!r}; this artifact has: {', '.join(tasks)}")
    return [index[name] for name in names]


def positions(mask: np.ndarray) -> np.ndarray:
    """Caller-side positions: 0 at each row's first real token, whatever the left padding."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)
