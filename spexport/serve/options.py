"""`spexport serve`'s access and limit flags, as click decorators (the command itself is in spexport/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from spexport.serve.auth import KEY_ENV
from spexport.serve.limits import Limits

DEFAULTS = Limits()


def access_options(command):
    """--api-key (repeatable), --allow-unauthenticated and --trusted-key (repeatable)."""
    for option in reversed([
        click.option("--api-key", "api_keys", multiple=True,
                     help=f"A key clients send as `Authorization: Bearer KEY`; repeatable, and {KEY_ENV} may hold "
                          "more, comma-separated."),
        click.option("--allow-unauthenticated", is_flag=True, help="Listen beyond loopback without an API key."),
        click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path),
                     help="A public key (PEM) one of which must have signed the artifact (`spexport sign`); "
                          "repeatable."),
    ]):
        command = option(command)
    return command


def limit_options(command):
    """One flag per field of `Limits`, with its default."""
    seconds = click.FloatRange(min=0, min_open=True)
    for option in reversed([
        click.option("--max-body-bytes", default=DEFAULTS.max_body_bytes, show_default=True,
                     type=click.IntRange(1), help="Largest request body, counted as it arrives."),
        click.option("--max-prompts", default=DEFAULTS.max_prompts, show_default=True, type=click.IntRange(1),
                     help="Prompts (times n choices) in one request."),
        click.option("--max-prompt-chars", default=DEFAULTS.max_prompt_chars, show_default=True,
                     type=click.IntRange(1), help="Characters of one prompt or message, checked before tokenizing."),
        click.option("--max-tokens", type=click.IntRange(1),
                     help="Largest max_tokens a request may ask for [the model's positions]."),
        click.option("--max-queue", default=DEFAULTS.max_queue, show_default=True, type=click.IntRange(1),
                     help="Generations queued or running; more get 429 with Retry-After."),
        click.option("--request-timeout", default=DEFAULTS.request_timeout_s, show_default=True, type=seconds,
                     help="Seconds a request may take, from admission to its last token (then 504)."),
        click.option("--shutdown-timeout", default=DEFAULTS.shutdown_timeout_s, show_default=True, type=seconds,
                     help="Seconds SIGTERM waits for requests in flight before closing their connections."),
    ]):
        command = option(command)
    return command


def limits_from(options: dict) -> Limits:
    """The Limits of limit_options' values."""
    return Limits(max_body_bytes=options["max_body_bytes"], max_prompts=options["max_prompts"],
                  max_prompt_chars=options["max_prompt_chars"], max_tokens=options["max_tokens"],
                  max_queue=options["max_queue"], request_timeout_s=options["request_timeout"],
                  shutdown_timeout_s=options["shutdown_timeout"])


def check_ray(host: str, api_keys, trusted_keys, allow_unauthenticated: bool, options: dict) -> None:
    """OptionError for what `--ray` would silently ignore: Ray Serve's proxy takes the requests, so the keys,
    the trusted-key check and the limits of the HTTP edge do not apply there."""
    from spexport.errors import OptionError
    from spexport.serve.auth import api_keys as all_keys
    from spexport.serve.auth import check_exposure

    changed = [f"--{name.replace('_', '-')}" for name, value in options.items()
               if value != {**vars(DEFAULTS), "request_timeout": DEFAULTS.request_timeout_s,
                            "shutdown_timeout": DEFAULTS.shutdown_timeout_s}.get(name)]
    unsupported = (["--api-key"] if all_keys(api_keys) else []) + (["--trusted-key"] if trusted_keys else []) + changed
    if unsupported:
        raise OptionError(f"--ray serves through Ray Serve's own proxy, without {', '.join(unsupported)}; use the "
                          "plain server for them, or put an authenticating proxy in front of Ray")
    check_exposure(host, (), allow_unauthenticated)
