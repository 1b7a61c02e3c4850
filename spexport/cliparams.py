"""The command line's parameter types and its one error handler, in click's terms: a `NAME=PATH` pair, a
finite number in a range, and the group whose `invoke` turns every SpexportError into one `error:` line with
its class's exit code."""

from __future__ import annotations

import math
from pathlib import Path

import click

from spexport.errors import SpexportError


class NamedPath(click.ParamType):
    """`--adapter NAME=PATH`: the pair (name, Path), or click's BadParameter naming the form expected."""

    name = "NAME=PATH"

    def convert(self, value, param, ctx) -> tuple[str, Path]:
        if isinstance(value, tuple):
            return value
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            self.fail(f"{value!r} is not NAME=PATH, e.g. --adapter sentiment=adapters/sentiment", param, ctx)
        return name, Path(path)


class FiniteRange(click.FloatRange):
    """click's FloatRange that also refuses NaN and infinities (NaN passes every range check)."""

    def convert(self, value, param, ctx) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class CommandError(click.ClickException):
    """A SpexportError as the command line reports it: one `error:` line on stderr, its class's exit code."""

    def __init__(self, error: SpexportError):
        super().__init__(" ".join(str(error).splitlines()))
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        click.echo("error: " + self.format_message(), err=True, file=file)


class SpexportGroup(click.Group):
    """The one place where what a user caused becomes a one-line error: every command's SpexportError ends
    as a CommandError (after any progress bar has been cleared, since it leaves the command's `with` blocks
    first)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpexportError as error:
            raise CommandError(error) from error


def stderr_console(quiet: bool = False):
    """A rich console on stderr (nothing but errors with `quiet`)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)
