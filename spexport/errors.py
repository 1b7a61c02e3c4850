"""One exception hierarchy for everything a user can cause."""


class SpexportError(Exception):
    """Base class: the message names the problem and what would fix it."""


class ModelError(SpexportError):
    """The base model folder is missing, not a Hugging Face model, or unsupported."""


class AdapterError(SpexportError):
    """An adapter is unreadable, of an unsupported method, or made for another base model."""


class ArtifactError(SpexportError):
    """An artifact folder is missing, incomplete, damaged or of an unknown format."""


class InputError(SpexportError):
    """A runtime call got inputs it cannot serve (unknown task, too long, bad shape)."""
