"""The soft-prompt methods spexport converts, registered in one place (PEFT's `register_peft_method`).

Each method module ends with `register_method(...)`: PEFT's `peft_type`, its typed config, its
converter, and the families whose artifacts take it. Tests iterate over `METHODS`, so a method
cannot be registered without a parity fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from spexport.artifact.manifest import ModelInfo
from spexport.converters.base import PromptConfig, SoftPrompt
from spexport.families import FAMILIES, Family

Convert = Callable[[PromptConfig, dict, ModelInfo], "SoftPrompt | dict[str, SoftPrompt]"]


@dataclass(frozen=True)
class Method:
    peft_type: str
    config_cls: type[PromptConfig]
    convert: Convert
    family: Family  # the family whose artifacts take this converter


METHODS: list[Method] = []


def register_method(peft_type: str, config_cls: type[PromptConfig], convert: Convert,
                    families: tuple[Family, ...] = tuple(FAMILIES)) -> None:
    for family in families:
        if any(m.peft_type == peft_type and m.family is family for m in METHODS):
            raise ValueError(f"{peft_type} is registered twice for {family.name}")
        METHODS.append(Method(peft_type, config_cls, convert, family))


def methods_for(family: Family) -> dict[str, Method]:
    """The methods a family's artifacts take, by PEFT peft_type."""
    return {m.peft_type: m for m in METHODS if m.family is family}
