"""`spexport serve`: an OpenAI-compatible HTTP API over one artifact, batching concurrent requests across tasks.

Needs the `[serve]` extra (Starlette, uvicorn); `--ray` needs the `[ray]` extra. The runtime alone imports
none of this.
"""

from __future__ import annotations

import signal
from pathlib import Path

from spexport.errors import OptionError


def require(extra: str, *modules: str) -> None:
    """OptionError naming the extra to install when one of `modules` is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OptionError(f"{', '.join(missing)} not installed: pip install 'spexport[{extra}]'")


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 64,
          log_level: str = "info", limits=None, api_keys: tuple[str, ...] = (), allow_unauthenticated: bool = False,
          trusted_keys: list | None = None, **engine_options) -> None:
    """Serve the artifact until SIGINT or SIGTERM; either stops accepting, finishes the requests in flight
    (for at most the limits' shutdown timeout), and returns.

    api_keys: besides SPEXPORT_API_KEY's; a host other than loopback needs one unless allow_unauthenticated.
    trusted_keys: public keys (PEM paths) one of which must have signed the artifact. engine_options: the
    engine's (prompt_lookup, prefix_cache_mb, max_prefill_tokens)."""
    require("serve", "starlette", "uvicorn", "prometheus_client")
    import uvicorn

    from spexport.serve.app import create_app
    from spexport.serve.auth import api_keys as all_keys
    from spexport.serve.auth import check_exposure
    from spexport.serve.limits import Limits

    limits = limits or Limits()
    keys = all_keys(api_keys)
    check_exposure(host, keys, allow_unauthenticated)
    app = create_app(folder, max_batch_size, limits, keys, trusted_keys, **engine_options)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=limits.shutdown_timeout_s))
    # uvicorn re-raises the signal it shut down on once it is done: answer it here, so the process exits 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
