"""P_TUNING: PEFT saves the prompt encoder's (MLP or LSTM) output, so the encoder has run once
already; what is left is the same as prompt tuning."""

from __future__ import annotations

import numpy as np

from spexport.artifact.manifest import ModelInfo
from spexport.converters import prompt_tuning
from spexport.converters.base import SoftPrompt
from spexport.errors import AdapterError

ENCODERS = {"MLP", "LSTM"}


def convert(config: dict, weights: dict[str, np.ndarray], model: ModelInfo) -> SoftPrompt:
    encoder = str(config.get("encoder_reparameterization_type", "MLP")).split(".")[-1]
    if encoder not in ENCODERS:
        raise AdapterError(f"P-tuning encoder {encoder} is not supported; expected one of {sorted(ENCODERS)}")
    return prompt_tuning.convert(config, weights, model)
