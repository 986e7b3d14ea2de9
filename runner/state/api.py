"""The plugin-facing state handle, and the store the server owns.

Rules a plugin can rely on, whichever backend is behind the handle:

- Every operation is one atomic step on the shared state: two workers (or two gateway
  nodes on one Redis) calling ``incr`` on one key never lose an increment, and ``take``
  never lets more than the bucket holds through.
- Keys live in the plugin's namespace (its name): ``rate-limit`` and ``api-key`` may both
  use the key ``"alice"`` without seeing each other's value.
- Values are bytes (``str`` values are stored as UTF-8). A TTL is in seconds; a key past
  its TTL reads as missing.
- A call either answers or raises ``StateUnavailable`` within a bounded time; it never
  hangs the request. A wrong use (a negative TTL, ``incr`` on a key that holds text)
  raises ``ValueError``: that is the plugin's bug, not the state's.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

from runner.state.model import StateUnavailable, Take

IfUnavailable = Literal["raise", "allow", "deny"]
"""What ``State.take`` answers when the state cannot be reached: ``"raise"``
``StateUnavailable``, or ``"allow"`` (fail open) / ``"deny"`` (fail closed) the request.
A plugin usually takes it from its config, e.g. ``if_state_unavailable: Literal["allow",
"deny"] = "allow"``."""

_SEPARATOR = ":"


class Backend(Protocol):
    """One place that keeps the state. Keys arrive with their namespace already on."""

    kind: str
    where: str  # for log lines: a file, a URL without its password, "memory"

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl: float | None) -> None: ...
    async def delete(self, key: str) -> bool: ...
    async def incr(self, key: str, amount: int, ttl: float | None) -> int: ...
    async def take(self, key: str, rate: float, burst: int, cost: int) -> Take: ...
    async def close(self) -> None: ...


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")


def _check_name(name: str) -> None:
    # A separator inside a name would let namespace "a:b" read namespace "a"'s key "b:...".
    if not name or _SEPARATOR in name:
        raise ValueError(f"a state namespace is a non-empty name without {_SEPARATOR!r}: {name!r}")


class State:
    """A plugin's handle on the shared state: its own namespace of keys.

    Get one from the runner (``StateStore.for_plugin``); make a narrower one with
    ``namespace``. Handles are cheap and share the store's connections.
    """

    __slots__ = ("_backend", "_prefix")

    def __init__(self, backend: Backend, prefix: str) -> None:
        self._backend = backend
        self._prefix = prefix

    @property
    def prefix(self) -> str:
        """What this handle puts before every key (e.g. ``"rate-limit:"``)."""
        return self._prefix

    def namespace(self, name: str) -> State:
        """A handle on a sub-namespace: its keys never meet this handle's other keys
        unless those contain ``":"``."""
        _check_name(name)
        return State(self._backend, f"{self._prefix}{name}{_SEPARATOR}")

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if it is missing or expired."""
        return await self._backend.get(self._prefix + key)

    async def set(self, key: str, value: bytes | str, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any value and TTL it had.

        With ``ttl`` the key expires ``ttl`` seconds from now; without it, never.
        """
        _check_ttl(ttl)
        data = value.encode() if isinstance(value, str) else bytes(value)
        await self._backend.set(self._prefix + key, data, ttl)

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there (and not expired)."""
        return await self._backend.delete(self._prefix + key)

    async def incr(self, key: str, amount: int = 1, *, ttl: float | None = None) -> int:
        """Add ``amount`` to the integer counter at ``key`` and return the new value.

        A missing key counts from 0. ``ttl`` is a window: it is set when the counter has
        no expiry (it was just created, or ``set`` without one), not on every call, so a
        counter made with ``ttl=60`` counts one minute from its first increment, then
        starts again from 0 (a fixed window, as APISIX's ``limit-count``). Raises
        ValueError if the key holds something other than a decimal integer or the sum
        leaves the signed 64-bit range.
        """
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ValueError(f"amount must be an int, not {amount!r}")
        _check_ttl(ttl)
        return await self._backend.incr(self._prefix + key, amount, ttl)

    async def take(
        self,
        key: str,
        *,
        rate: float,
        burst: int,
        cost: int = 1,
        if_unavailable: IfUnavailable = "raise",
    ) -> Take:
        """Take ``cost`` tokens from the token bucket at ``key``, atomically.

        The bucket holds at most ``burst`` tokens (a new one is full) and gains ``rate``
        tokens a second. If ``cost`` tokens are there they are taken and the answer is
        allowed; if not, nothing is taken and ``retry_after`` says when they will be.
        However many workers, processes or nodes share the state, at most ``burst``
        takes pass at once and ``rate`` a second after that. The clock is the store's
        (Redis: the server's), not the caller's.

        ``if_unavailable`` chooses the answer when the state cannot be reached: raise
        ``StateUnavailable`` (the default), or ``"allow"`` / ``"deny"``, answered with
        ``unavailable=True``.
        """
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of tokens a second, not {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an int of at least 1, not {burst!r}")
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= burst:
            # More than the burst could never be taken: refuse it here, not forever.
            raise ValueError(f"cost must be an int from 1 to burst ({burst}), not {cost!r}")
        try:
            return await self._backend.take(self._prefix + key, float(rate), burst, cost)
        except StateUnavailable:
            if if_unavailable == "raise":
                raise
            allowed = if_unavailable == "allow"
            return Take(allowed, 0, 0.0 if allowed else cost / rate, unavailable=True)


class StateStore:
    """The runner's one shared state, opened by ``open_state``; the server owns it.

    Plugins never see the store, only ``State`` handles from ``for_plugin``. Open it once,
    before forking workers; each process then uses it from its one event loop (a Redis
    connection belongs to the loop that made it) and closes it when done. The process
    that opened a ``local://`` store closes it last: that removes the file.
    """

    __slots__ = ("_backend", "url")

    def __init__(self, backend: Backend, url: str) -> None:
        self._backend = backend
        self.url = url

    @property
    def kind(self) -> str:
        """``"memory"``, ``"local"`` or ``"redis"``."""
        return self._backend.kind

    @property
    def location(self) -> str:
        """Where the state is, for log lines: a local store's file (``local://`` alone
        names none), the URL (without its password) otherwise."""
        return self._backend.where

    def for_plugin(self, name: str) -> State:
        """The handle for the plugin called ``name``: keys under ``"<name>:"``."""
        _check_name(name)
        return State(self._backend, f"{name}{_SEPARATOR}")

    async def close(self) -> None:
        """Release this process's connections (and, for a temporary local file, the file,
        when the process that opened the store closes it). Closing twice is harmless."""
        await self._backend.close()

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
