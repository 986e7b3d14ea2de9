"""``open_state``: a state URL in, a ``StateStore`` out. The one place URLs are read.

``check_state_url`` reads a URL the same way without making anything (no file, no
client), so that a setting can be refused before the runner starts. redis-py is imported
only for a Redis URL: a runner on ``local://`` never pays its import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from runner.state import local
from runner.state.api import Backend, StateStore
from runner.state.memory import MemoryBackend

DEFAULT_STATE_URL = "local://"

_REDIS_SCHEMES = ("redis", "rediss", "unix")

# Defaults of the Redis options, here so that reading a URL does not import redis-py.
DEFAULT_REDIS_TIMEOUT = 0.05
DEFAULT_REDIS_CONNECT_TIMEOUT = 0.05
DEFAULT_REDIS_RETRY_INTERVAL = 0.5
DEFAULT_REDIS_PREFIX = "a6:"

Clock = Callable[[], float]
BackendFactory = Callable[[Clock | None], Backend]


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


def _read(url: str) -> BackendFactory:
    """Check ``url`` whole and return what makes its backend; raises ValueError."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))

    def refuse_unknown_options() -> None:
        if params:
            raise ValueError(f"state url {url!r}: unknown option(s) {', '.join(sorted(params))}")

    if parts.scheme == "memory":
        refuse_unknown_options()
        return lambda clock: MemoryBackend() if clock is None else MemoryBackend(clock)
    if parts.scheme == "local":
        if parts.netloc:
            raise ValueError(f"state url {url!r}: write local:///absolute/path (three slashes)")
        lock_timeout = _seconds(params, "lock_timeout", local.DEFAULT_LOCK_TIMEOUT)
        refuse_unknown_options()
        path = Path(parts.path) if parts.path else None

        def make_local(clock: Clock | None) -> Backend:
            if clock is None:
                return local.LocalBackend(path, lock_timeout=lock_timeout)
            return local.LocalBackend(path, lock_timeout=lock_timeout, clock=clock)

        return make_local
    if parts.scheme in _REDIS_SCHEMES:
        timeout = _seconds(params, "timeout", DEFAULT_REDIS_TIMEOUT)
        connect_timeout = _seconds(params, "connect_timeout", DEFAULT_REDIS_CONNECT_TIMEOUT)
        retry_interval = _seconds(params, "retry_interval", DEFAULT_REDIS_RETRY_INTERVAL)
        prefix = params.pop("prefix", DEFAULT_REDIS_PREFIX)
        # The other options are redis-py's (db, password, ...). Rebuilt by hand:
        # urlunsplit would turn unix:///path into unix:/path.
        rest = url.partition("?")[0] + (f"?{urlencode(params)}" if params else "")
        from runner.state import redis_backend

        # redis-py reads the URL only when it first connects: a bad port or option
        # would fail every call instead of the start.
        redis_backend.check_url(rest)

        def make_redis(_clock: Clock | None) -> Backend:
            return redis_backend.RedisBackend(
                rest,
                timeout=timeout,
                connect_timeout=connect_timeout,
                retry_interval=retry_interval,
                prefix=prefix,
            )

        return make_redis
    raise ValueError(
        f"state url {redact_url(url)!r}: unknown scheme; use local://, memory://, redis://, "
        "rediss:// or unix://"
    )


def check_state_url(url: str) -> None:
    """Raise ValueError (saying what is wrong) if ``open_state(url)`` would refuse ``url``
    as written. Makes nothing: a ``local://`` file that cannot be created, or a Redis
    that is not there, shows only when the store is opened or used."""
    _read(url)


def open_state(url: str = DEFAULT_STATE_URL, *, clock: Clock | None = None) -> StateStore:
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
    # Read whole before any backend is made: a refused URL leaves no temporary file.
    make = _read(url)
    return StateStore(make(clock), redact_url(url))


def redact_url(url: str) -> str:
    """``url`` without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
