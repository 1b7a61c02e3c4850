"""One exception hierarchy for everything a user can cause. Each class carries the exit code that the
command line gives it (click's pattern: a usage error exits 2), and the CLI maps them in one place."""


class SpexportError(Exception):
    """Base class: the message names the problem and what would fix it."""

    exit_code = 1


class OptionError(SpexportError):
    """An option or flag value that the command cannot take (as click's UsageError, exit 2)."""

    exit_code = 2


class ModelError(SpexportError):
    """The base model folder is missing, not a Hugging Face model, or unsupported."""

    exit_code = 3


class AdapterError(SpexportError):
    """An adapter is unreadable, of an unsupported method, or made for another base model."""

    exit_code = 4


class ArtifactError(SpexportError):
    """An artifact folder is missing, incomplete, damaged or of an unknown format."""

    exit_code = 5


class InputError(SpexportError):
    """A runtime call got inputs it cannot serve (unknown task, too long, bad shape)."""

    exit_code = 6


class OutputError(SpexportError):
    """The output folder cannot be written, or holds something that must not be replaced."""

    exit_code = 7


class SpexportWarning(UserWarning):
    """Something that may be a mistake but need not be, such as an adapter that names another base model
    than the one it is converted with; the CLI prints each as one `warning:` line."""
