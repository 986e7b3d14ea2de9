"""The conf store shared by worker processes: real files in a real directory, several
workers' caches played by several ConfCaches over one directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.core.cache import ConfCache, TokenIssuer
from runner.core.chain import Chain
from runner.core.confstore import (
    DIR_PREFIX,
    ConfStore,
    make_store_dir,
    sweep,
)
from runner.core.dispatch import Dispatcher
from runner.core.errors import BadRequest, ConfRejected
from runner.core.registry import PluginRegistry
from runner.core.tmpdirs import remove_orphans
from tests.core.test_cache import FakeClock

TTL = 3900.0
CONF = (("say", '{"body": "hello"}'),)


def chain(key: str = "route#1", conf: tuple[tuple[str, str], ...] = CONF) -> Chain:
    return Chain.build(key, conf, [])


class Worker:
    """One worker's side: its own cache and issuer over the shared directory."""

    def __init__(self, directory: Path, clock: FakeClock, token_clock: FakeClock) -> None:
        self.built: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        self.store = ConfStore(directory, TTL, self._build, clock=clock)
        issuer = TokenIssuer(lambda: int(token_clock()))
        self.cache: ConfCache[Chain] = ConfCache(
            ttl=TTL, maxsize=100, timer=clock, issuer=issuer, shared=self.store
        )

    def _build(self, key: str, conf: tuple[tuple[str, str], ...]) -> Chain:
        self.built.append((key, conf))
        return chain(key, conf)


@pytest.fixture
def clock() -> FakeClock:
    # The wall clock of the files' ages and the caches' timer, moved together.
    return FakeClock(time.time())


def test_a_token_put_by_one_worker_is_found_by_another_and_built_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    a, b = Worker(tmp_path, clock, FakeClock(5000)), Worker(tmp_path, clock, FakeClock(5000))
    token = a.cache.put(chain())
    found = b.cache.lookup(token)
    assert (found.key, found.conf) == ("route#1", CONF)
    assert b.cache.lookup(token) is found  # cached: the file is read once
    assert b.built == [("route#1", CONF)]
    with pytest.raises(KeyError):
        b.cache.lookup(token + 1)


def test_two_workers_issuing_the_same_token_get_different_ones(
    tmp_path: Path, clock: FakeClock
) -> None:
    same_microsecond = FakeClock(777)
    a, b = Worker(tmp_path, clock, same_microsecond), Worker(tmp_path, clock, same_microsecond)
    first = a.cache.put(chain("route#a"))
    second = b.cache.put(chain("route#b"))
    assert first == 777
    assert second != first
    assert a.cache.lookup(second).key == "route#b"
    assert b.cache.lookup(first).key == "route#a"


def test_an_entry_expires_with_its_age_and_a_refresh_restarts_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    a = Worker(tmp_path, clock, FakeClock(1))
    token = a.cache.put(chain())
    path = tmp_path / str(token)
    created = clock.now
    os.utime(path, (created, created))

    clock.now = created + TTL - 1
    assert Worker(tmp_path, clock, FakeClock(1)).cache.get(token) is not None
    clock.now = created + TTL
    assert Worker(tmp_path, clock, FakeClock(1)).cache.get(token) is None

    os.utime(path, (created - 1000, created - 1000))
    a.cache.refresh(token, chain())  # the gateway prepared the same conf again
    assert path.stat().st_mtime >= created - 1


def test_an_expired_entry_blocks_its_token_until_the_sweep_removes_it(
    tmp_path: Path, clock: FakeClock
) -> None:
    a = Worker(tmp_path, clock, FakeClock(42))
    token = a.cache.put(chain("old"))
    path = tmp_path / str(token)
    os.utime(path, (clock.now - TTL - 1, clock.now - TTL - 1))  # expired, not yet swept
    # A worker whose clock comes round to the same number must not reuse it: another
    # worker may still hold the old chain under it.
    late = Worker(tmp_path, clock, FakeClock(42))
    assert late.cache.put(chain("new")) != token
    assert sweep(tmp_path, TTL, now=clock.now) == (0, 2)
    assert sweep(tmp_path, TTL, now=clock.now + TTL + 1) == (1, 1)
    assert not path.exists()


def test_the_sweep_removes_temporary_files_left_by_a_killed_worker(tmp_path: Path) -> None:
    left = tmp_path / ".123.999.tmp"
    left.write_text("{")
    now = left.stat().st_mtime
    assert sweep(tmp_path, TTL, now=now + 1) == (0, 0)
    assert sweep(tmp_path, TTL, now=now + 61) == (1, 0)


def test_a_conf_the_plugins_now_reject_fails_the_call_as_at_prepare(
    tmp_path: Path, clock: FakeClock
) -> None:
    registry = PluginRegistry()
    registry.load_examples()
    dispatcher: Dispatcher
    store = ConfStore(tmp_path, TTL, lambda k, c: dispatcher.build_chain(k, c), clock=clock)
    dispatcher = Dispatcher(registry, ConfCache(ttl=TTL, maxsize=10, timer=clock, shared=store))
    writer = Worker(tmp_path, clock, FakeClock(9))
    token = writer.cache.put(chain("route#9", (("api-key", '{"keys": []}'),)))
    with pytest.raises(ConfRejected, match="route#9") as info:
        dispatcher.cache.lookup(token)
    assert isinstance(info.value, BadRequest)  # the gateway gets BAD_REQUEST


def test_store_directories_are_private_and_orphans_are_removed(tmp_path: Path) -> None:
    # A directory left by a supervisor that is gone (a pid that has exited).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tmp_path / f"{DIR_PREFIX}{dead.stdout.strip()}-x"
    orphan.mkdir()
    (orphan / "1").write_text("{}")
    live = tmp_path / f"{DIR_PREFIX}{os.getpid()}-y"
    live.mkdir()
    remove_orphans(DIR_PREFIX, tmp_path)
    assert not orphan.exists()
    assert live.exists()

    made = make_store_dir(tmp_path / "runner.sock")
    try:
        assert made.name.startswith(f"{DIR_PREFIX}{os.getpid()}-")
        assert made.stat().st_mode & 0o777 == 0o700  # plugin configs hold secrets
    finally:
        made.rmdir()
