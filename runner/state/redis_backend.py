"""State shared by every runner that points at one Redis: one limit across gateway nodes.

**Atomicity on the server.** ``get``, ``set`` (with ``PX``), ``delete`` and ``incr``
without a TTL are single Redis commands. ``incr`` with a TTL and ``take`` are Lua scripts
(``register_script``: ``EVALSHA``, loaded again by redis-py after a server restart), which
Redis runs with nothing else in between: no read-modify-write travels through Python.
``take`` reads the server's ``TIME`` inside the script, so the bucket refills by one clock
however far apart the gateway nodes' clocks are. The scripts follow the rules of
``model.py`` step for step and store buckets in the same ``"<tokens> <timestamp>"`` form.

**Faults.** Every call is bounded: ``connect_timeout`` to connect, ``timeout`` for each
reply, redis-py's own retries off, and an ``asyncio.timeout`` of both together over the
call in case any other step stalls. A call that fails that way raises ``StateUnavailable``
and marks Redis *lost* (one warning in the log); while lost, calls raise
``StateUnavailable`` at once instead of each waiting its timeout, and one background task
PINGs (at once, then every ``retry_interval``) until Redis answers, then marks it *back*
(one more line).
Errors that are the plugin's (``incr`` on text) raise ``ValueError`` and lose nothing.

**Processes.** The client is made on first use in each process (and again after a fork),
so a store opened by the supervisor before forking gives each worker its own connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import DataError, RedisError, ResponseError

from runner.state.model import StateUnavailable, Take
from runner.state.url import (
    DEFAULT_REDIS_CONNECT_TIMEOUT,
    DEFAULT_REDIS_PREFIX,
    DEFAULT_REDIS_RETRY_INTERVAL,
    DEFAULT_REDIS_TIMEOUT,
    redact_url,
)

log = logging.getLogger("a6.state")

T = TypeVar("T")

DEFAULT_TIMEOUT = DEFAULT_REDIS_TIMEOUT
DEFAULT_CONNECT_TIMEOUT = DEFAULT_REDIS_CONNECT_TIMEOUT
DEFAULT_RETRY_INTERVAL = DEFAULT_REDIS_RETRY_INTERVAL
DEFAULT_PREFIX = DEFAULT_REDIS_PREFIX

# KEYS[1]: the counter. ARGV[1]: the amount, ARGV[2]: TTL in ms, set only when the key has
# no expiry (PTTL -1: just created, or set without one), which makes the TTL a window.
_INCR_WITH_TTL = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""

# KEYS[1]: the bucket. ARGV: rate (tokens a second), burst, cost. The same steps as
# model.take_from_bucket; floats travel as '%.17g' text, since Redis would truncate a Lua
# number in a reply to an integer.
_TAKE = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local tokens = burst
local stored = redis.call('GET', KEYS[1])
if stored then
  local old, stamp = string.match(stored, '^(%S+) (%S+)$')
  old, stamp = tonumber(old or ''), tonumber(stamp or '')
  if not old or not stamp then
    return redis.error_reply('WRONGTYPE the key holds a value that is not a token bucket')
  end
  tokens = math.min(burst, old + math.max(0, now - stamp) * rate)
end
if tokens >= cost then
  tokens = tokens - cost
  local ttl = math.max(1, math.ceil((burst - tokens) / rate * 1000))
  redis.call('SET', KEYS[1], string.format('%.17g %.17g', tokens, now), 'PX', ttl)
  return {1, string.format('%.17g', tokens), '0'}
end
return {0, string.format('%.17g', tokens), string.format('%.17g', (cost - tokens) / rate)}
"""

# What Redis says when the plugin used a key the wrong way: its bug, reported as ValueError.
_MISUSE = ("WRONGTYPE", "not an integer", "overflow")


def _ms(ttl: float) -> int:
    # Redis keeps TTLs in whole milliseconds; 0 would mean "already expired".
    return max(1, math.ceil(ttl * 1000))


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def check_url(url: str) -> None:
    """Raise ValueError if redis-py would refuse ``url`` (a bad port, db or option) when
    it first connects. Builds a connection object without connecting it."""
    try:
        pool = redis.asyncio.ConnectionPool.from_url(url)
        # What pool.make_connection() does (untyped): the options reach the class here.
        pool.connection_class(**pool.connection_kwargs)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"state url {redact_url(url)!r}: {exc}") from None


class RedisBackend:
    """redis-py's asyncio client behind the fault handling described above."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self._url = url
        self.where = redact_url(url)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._retry_interval = retry_interval
        self._prefix = prefix
        self._pid = 0
        self._redis: redis.asyncio.Redis | None = None
        self._incr_script: AsyncScript | None = None
        self._take_script: AsyncScript | None = None
        self._lost_at: float | None = None
        self._probe: asyncio.Task[None] | None = None

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None or self._pid != os.getpid():
            # After a fork the parent's client (and its sockets) is left alone, unused.
            client = redis.asyncio.Redis.from_url(
                self._url,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._connect_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self._redis, self._pid = client, os.getpid()
            self._incr_script = client.register_script(_INCR_WITH_TTL)
            self._take_script = client.register_script(_TAKE)
            self._lost_at, self._probe = None, None
        return self._redis

    async def _call(self, command: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        client = self._client()
        if self._lost_at is not None:
            if self._probe is None or self._probe.done():
                # The probe went with a loop that has ended (a test's, a restarted worker's).
                self._probe = asyncio.get_running_loop().create_task(self._reconnect())
            raise StateUnavailable(
                f"Redis at {self.where} is unreachable; retrying every {self._retry_interval} s"
            )
        try:
            async with asyncio.timeout(self._connect_timeout + self._timeout):
                return await command(client)
        except ResponseError as exc:
            if any(sign in str(exc) for sign in _MISUSE):
                raise ValueError(str(exc).split(" script:")[0]) from None
            # OOM, READONLY, a replica loading...: Redis is there but cannot do it.
            raise StateUnavailable(f"Redis at {self.where}: {exc}") from exc
        except DataError:
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self._lose(exc)
            raise StateUnavailable(f"Redis at {self.where}: {_reason(exc)}") from exc

    def _lose(self, exc: BaseException) -> None:
        if self._lost_at is not None:
            return  # calls that were in flight together fail together: one line
        self._lost_at = time.monotonic()
        log.warning(
            "state: lost Redis at %s (%s); state calls raise StateUnavailable until it answers",
            self.where,
            _reason(exc),
        )
        self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        client = self._client()
        # The first PING goes at once: after one slow reply from a live Redis, calls are
        # refused for one round trip, not for a whole retry_interval.
        while True:
            try:
                async with asyncio.timeout(self._connect_timeout + self._timeout):
                    await client.ping()
                break
            except (RedisError, OSError, TimeoutError):
                await asyncio.sleep(self._retry_interval)
        lost_for = time.monotonic() - (self._lost_at or 0.0)
        self._lost_at, self._probe = None, None
        log.warning("state: Redis at %s is back after %.1f s", self.where, lost_for)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def get(self, key: str) -> bytes | None:
        async def command(client: redis.asyncio.Redis) -> bytes | None:
            value = await client.get(self._key(key))
            # decode_responses is off: a value comes back as bytes (the types allow str).
            return value.encode() if isinstance(value, str) else value

        return await self._call(command)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        async def command(client: redis.asyncio.Redis) -> None:
            await client.set(self._key(key), value, px=None if ttl is None else _ms(ttl))

        await self._call(command)

    async def delete(self, key: str) -> bool:
        async def command(client: redis.asyncio.Redis) -> bool:
            return bool(await client.delete(self._key(key)))

        return await self._call(command)

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        async def command(client: redis.asyncio.Redis) -> int:
            if ttl is None:
                return int(await client.incrby(self._key(key), amount))
            assert self._incr_script is not None
            return int(await self._incr_script([self._key(key)], [amount, _ms(ttl)]))

        return await self._call(command)

    async def take(self, key: str, rate: float, burst: int, cost: int) -> Take:
        async def command(client: redis.asyncio.Redis) -> Take:
            assert self._take_script is not None
            reply: list[Any] = await self._take_script([self._key(key)], [repr(rate), burst, cost])
            allowed, tokens, retry_after = reply
            return Take(bool(allowed), math.floor(float(tokens)), float(retry_after))

        return await self._call(command)

    async def close(self) -> None:
        if self._pid != os.getpid():
            return
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
