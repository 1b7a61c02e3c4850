"""A row's answer never depends on the rest of the batch: other tasks, lengths, padding."""

import numpy as np
from conftest import TASKS
from parity import max_abs_diff

ATOL = 1e-4


def _rows():
    rng = np.random.default_rng(1)
    return [rng.integers(4, 150, size=n).astype(np.int64) for n in (5, 9, 3, 7, 6)]


def _left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = np.array([[pad] * (width - len(r)) + list(r) for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


def test_mixed_task_padded_batch_equals_rows_alone(runtime_model):
    rows, tasks = _rows(), list(TASKS)
    ids, mask = _left_pad(rows)
    batch_logits = runtime_model.logits(ids, mask, task=tasks)
    batch_tokens = runtime_model.generate(ids, mask, task=tasks, max_new_tokens=12)
    for i, (row, task) in enumerate(zip(rows, tasks)):
        alone_logits = runtime_model.logits(row[None], task=task)
        assert max_abs_diff(batch_logits[i, -len(row):], alone_logits[0]) <= ATOL
        alone_tokens = runtime_model.generate(row[None], task=task, max_new_tokens=12)[0]
        in_batch = batch_tokens[i, ids.shape[1] - len(row):]
        # a row that stopped at EOS alone is padded in the batch while the others go on
        np.testing.assert_array_equal(in_batch[:alone_tokens.size], alone_tokens)
        assert (in_batch[alone_tokens.size:] == runtime_model.info.pad_token_id).all()


def test_virtual_tokens_are_invisible(runtime_model):
    """Logits cover the caller's tokens only, whatever the task's virtual-token count."""
    ids = _rows()[1][None]
    for task, (_, n_virtual) in TASKS.items():
        assert runtime_model.num_virtual_tokens[task] == n_virtual
        assert runtime_model.logits(ids, task=task).shape == (1, ids.shape[1], runtime_model.info.vocab_size)
