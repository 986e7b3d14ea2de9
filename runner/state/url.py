"""``open_state``: a state URL in, a ``StateStore`` out. The one place URLs are read."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from runner.state import local, redis_backend
from runner.state.api import Backend, StateStore
from runner.state.memory import MemoryBackend

DEFAULT_STATE_URL = "local://"

_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _seconds(params: dict[str, str], name: str, default: float) -> float:
    text = params.pop(name, None)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"state url: {name}={text!r} is not a positive number of seconds")
    return value


def open_state(
    url: str = DEFAULT_STATE_URL, *, clock: Callable[[], float] | None = None
) -> StateStore:
    """Open the shared state named by ``url``. Opens no connection: each process connects
    on first use, so the supervisor may call this before it forks its workers (and must,
    for ``local://``: that is how the workers come to share one file).

    - ``local://`` (the default): one state for every worker of this runner on this node,
      in a temporary SQLite file on tmpfs, removed when the opening process closes the
      store. ``local:///path/state.db`` uses (and keeps) that file, shared by every process
      that opens it. Option: ``?lock_timeout=0.05`` (seconds).
    - ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS),
      ``unix:///path/redis.sock[?db=N]``: one state for every runner on that Redis.
      Options: ``timeout=0.05`` (each reply), ``connect_timeout=0.05``,
      ``retry_interval=0.5`` (seconds between reconnection attempts while lost),
      ``prefix=a6:`` (put before every key); other query options go to redis-py.
    - ``memory://``: this process only (tests, a single worker).

    ``clock`` (seconds) replaces the wall clock of the memory and local backends, for
    tests; Redis always uses the server's clock.
    """
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))

    def refuse_unknown_options() -> None:
        # Before any backend is made: a refused URL must leave no temporary file behind.
        if params:
            raise ValueError(f"state url {url!r}: unknown option(s) {', '.join(sorted(params))}")

    backend: Backend
    if parts.scheme == "memory":
        refuse_unknown_options()
        backend = MemoryBackend() if clock is None else MemoryBackend(clock)
    elif parts.scheme == "local":
        if parts.netloc:
            raise ValueError(f"state url {url!r}: write local:///absolute/path (three slashes)")
        lock_timeout = _seconds(params, "lock_timeout", local.DEFAULT_LOCK_TIMEOUT)
        refuse_unknown_options()
        path = Path(parts.path) if parts.path else None
        if clock is None:
            backend = local.LocalBackend(path, lock_timeout=lock_timeout)
        else:
            backend = local.LocalBackend(path, lock_timeout=lock_timeout, clock=clock)
    elif parts.scheme in _REDIS_SCHEMES:
        timeout = _seconds(params, "timeout", redis_backend.DEFAULT_TIMEOUT)
        connect_timeout = _seconds(params, "connect_timeout", redis_backend.DEFAULT_CONNECT_TIMEOUT)
        retry_interval = _seconds(params, "retry_interval", redis_backend.DEFAULT_RETRY_INTERVAL)
        prefix = params.pop("prefix", redis_backend.DEFAULT_PREFIX)
        # The other options are redis-py's (db, password, ...). Rebuilt by hand:
        # urlunsplit would turn unix:///path into unix:/path.
        rest = url.partition("?")[0] + (f"?{urlencode(params)}" if params else "")
        backend = redis_backend.RedisBackend(
            rest,
            timeout=timeout,
            connect_timeout=connect_timeout,
            retry_interval=retry_interval,
            prefix=prefix,
        )
    else:
        raise ValueError(
            f"state url {url!r}: unknown scheme; use local://, memory://, redis://, "
            "rediss:// or unix://"
        )
    return StateStore(backend, redact_url(url))


def redact_url(url: str) -> str:
    return redis_backend.redact(url)
