"""PROMPT_TUNING: the checkpoint holds the virtual tokens' input embeddings."""

from __future__ import annotations

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import PromptConfig, SoftPrompt, check_fits, prompt_weights
from spexport.converters.registry import register_method


def convert(config: PromptConfig, weights: dict[str, np.ndarray], model: ModelInfo) -> SoftPrompt:
    embeddings = prompt_weights(config, weights)
    check_fits("hidden size", embeddings.shape[1], model.hidden_size)
    return SoftPrompt(config.peft_type, "embeddings", embeddings[: config.num_virtual_tokens])


register_method("PROMPT_TUNING", PromptConfig, convert)
