"""``open_state``: which URLs open what, and which are refused with a reason."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from runner.state import check_state_url, local, open_state


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", "memory"),
        ("redis://localhost:6379/0", "redis"),
        ("rediss://cache.internal:6380/2?timeout=0.02&prefix=edge:", "redis"),
        ("unix:///run/redis/redis.sock?db=1&retry_interval=2", "redis"),
    ],
)
async def test_each_scheme_opens_its_backend_without_connecting(url: str, kind: str) -> None:
    # Nothing listens at these addresses: opening must not try.
    async with open_state(url) as store:
        assert store.kind == kind


def test_local_is_the_default_a_temporary_file_removed_on_close() -> None:
    store = open_state()
    assert store.kind == "local"
    path: Path = store._backend.path  # type: ignore[attr-defined]
    assert path.exists()
    if os.access("/dev/shm", os.W_OK):
        assert path.is_relative_to("/dev/shm")  # tmpfs: no disk write per request
    asyncio.run(store.close())
    assert not path.parent.exists()


def test_the_password_stays_out_of_what_is_logged() -> None:
    store = open_state("redis://user:s3cret@cache:6379/0")
    assert "s3cret" not in store.url
    assert "user:***@cache" in store.url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://example.com", "unknown scheme"),
        ("local://relative/path", "three slashes"),
        ("local://?timeout=1", "unknown option"),
        ("memory://?lock_timeout=1", "unknown option"),
        ("redis://localhost?timeout=0", "positive number"),
        ("redis://localhost?connect_timeout=soon", "positive number"),
        ("local://?lock_timeout=inf", "positive number"),
        # redis-py reads these only when it connects: refused at once all the same.
        ("redis://localhost:63790000", "Port out of range"),
        ("unix:///run/redis.sock?db=first", "db"),
        ("redis://localhost?no_such_option=1", "no_such_option"),
    ],
)
@pytest.mark.parametrize("read", [open_state, check_state_url])
def test_a_wrong_url_is_refused_with_its_reason(
    url: str,
    complaint: str,
    read: object,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Temporary state files go to tmp_path, so other runs on this machine cannot interfere.
    monkeypatch.setattr(local, "_tmpfs", lambda: str(tmp_path))
    assert callable(read)
    with pytest.raises(ValueError, match=complaint):
        read(url)
    assert not list(tmp_path.iterdir()), "a refused URL left a temporary state file behind"


def test_checking_a_good_url_makes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_tmpfs", lambda: str(tmp_path))
    for url in ("local://", f"local://{tmp_path}/kept.db", "memory://", "redis://cache:6379/1"):
        check_state_url(url)
    assert not list(tmp_path.iterdir())


def test_a_refused_redis_url_keeps_its_password_out_of_the_message() -> None:
    with pytest.raises(ValueError, match=r"user:\*\*\*@cache") as refused:
        check_state_url("redis://user:s3cret@cache:notaport/0")
    assert "s3cret" not in str(refused.value)
