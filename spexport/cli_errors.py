"""The one place where what a user caused becomes one line on stderr and its class's exit code."""

from __future__ import annotations

import contextlib
import sys
from typing import NoReturn

import click

from spexport.errors import SpexportError


@contextlib.contextmanager
def one_line_errors():
    """What a user caused ends as one line on stderr and its class's exit code, after any progress bar is
    cleared."""
    try:
        yield
    except SpexportError as e:
        fail(str(e), e.exit_code)


def fail(message: str, exit_code: int) -> NoReturn:
    click.echo("error: " + " ".join(message.splitlines()), err=True)
    sys.exit(exit_code)


def stderr_console(quiet: bool = False):
    """A rich console on stderr (nothing but errors with `quiet`)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)
