"""MULTITASK_PROMPT_TUNING: one shared prompt and low-rank factors for k source tasks.

Task i's prompt is shared ⊙ (cols[i] @ rows[i]), as PEFT's forward composes it; each becomes
its own task, named NAME/i.
"""

from __future__ import annotations

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import PromptConfig, SoftPrompt, check_fits, float_tensor, prompt_weights
from spexport.converters.registry import register_method
from spexport.errors import AdapterError
from spexport.families import DECODER, ENCODER


def convert(config: PromptConfig, weights: dict[str, np.ndarray], model: ModelInfo) -> dict[str, SoftPrompt]:
    shared = prompt_weights(config, weights)
    check_fits("hidden size", shared.shape[1], model.hidden_size)
    try:
        cols = float_tensor("prefix_task_cols", weights["prefix_task_cols"])  # [tasks, n, rank]
        rows = float_tensor("prefix_task_rows", weights["prefix_task_rows"])  # [tasks, rank, hidden]
    except KeyError as e:
        raise AdapterError(f"multitask prompt tuning checkpoint lacks {e.args[0]}") from None
    fits = cols.ndim == rows.ndim == 3 and cols.shape[0] == rows.shape[0] and cols.shape[2] == rows.shape[1]
    if not fits or cols.shape[1] != shared.shape[0] or rows.shape[2] != shared.shape[1]:
        raise AdapterError(f"task factors {list(cols.shape)} x {list(rows.shape)} do not fit the shared prompt "
                           f"{list(shared.shape)}")
    return {str(i): SoftPrompt(config.peft_type, "embeddings", shared * (cols[i] @ rows[i]))
            for i in range(cols.shape[0])}


# PEFT's forward cannot run it with decoder_input_ids, so there is no reference for encoder-decoder models.
register_method("MULTITASK_PROMPT_TUNING", PromptConfig, convert, families=(DECODER, ENCODER))
