"""API keys: `Authorization: Bearer KEY` checked in constant time, and the refusal to listen beyond this
machine without one."""

from __future__ import annotations

import hmac
import ipaddress
import os

from spexport.errors import OptionError

KEY_ENV = "SPEXPORT_API_KEY"
OPEN_PATHS = frozenset({"/health", "/ready"})  # probes of load balancers and orchestrators carry no key
MIN_KEY_CHARS = 16


def api_keys(given: tuple[str, ...] | list[str] = (), environ: dict | None = None) -> tuple[bytes, ...]:
    """The keys of `--api-key` (repeatable) and of SPEXPORT_API_KEY (comma-separated); OptionError for a
    key too short to resist guessing or holding characters an HTTP header cannot carry."""
    environ = os.environ if environ is None else environ
    keys = [*given, *(k.strip() for k in environ.get(KEY_ENV, "").split(",") if k.strip())]
    for key in keys:
        if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
            raise OptionError(f"an API key must be at least {MIN_KEY_CHARS} printable ASCII characters without "
                              "spaces; make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return tuple(dict.fromkeys(k.encode() for k in keys))


def authorized(header: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Whether an Authorization header carries one of `keys`; every key is compared, in constant time."""
    if not keys:
        return True
    scheme, _, token = (header or b"").partition(b" ")
    token = token.strip() if scheme.lower() == b"bearer" else b""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, keys: tuple[bytes, ...], allow_unauthenticated: bool) -> None:
    """OptionError for listening on a non-loopback address without a key, unless explicitly allowed."""
    if not keys and not is_loopback(host) and not allow_unauthenticated:
        raise OptionError(f"--host {host} accepts connections from other machines, and no API key is set: give "
                          f"--api-key (or {KEY_ENV}), or --allow-unauthenticated if something in front of the "
                          "server already checks who may call it")
