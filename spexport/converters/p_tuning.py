"""P_TUNING: PEFT saves the prompt encoder's (MLP or LSTM) output, so the encoder has run once
already; what is left is the same as prompt tuning."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters import prompt_tuning
from spexport.converters.base import PromptConfig, SoftPrompt
from spexport.converters.registry import register_method

ENCODERS = ("MLP", "LSTM")


@dataclass(frozen=True)
class PTuningConfig(PromptConfig):
    encoder_reparameterization_type: str = "MLP"

    def __post_init__(self):
        super().__post_init__()
        self.check("encoder_reparameterization_type",
                   lambda v: isinstance(v, str) and v.split(".")[-1] in ENCODERS, f"one of {', '.join(ENCODERS)}")


def convert(config: PTuningConfig, weights: dict[str, np.ndarray], model: ModelInfo) -> SoftPrompt:
    return prompt_tuning.convert(config, weights, model)


register_method("P_TUNING", PTuningConfig, convert)
