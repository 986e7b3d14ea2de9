"""Who can reach the runner: the socket's mode, group and directory, and nothing but a
Unix socket. Tests that switch to another user run only as root (they are skipped
otherwise); the rest run as anyone."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.core.config import Config
from runner.protocol.frame import RPC, encode_frame
from runner.protocol.messages import decode_prepare_conf_reply, encode_prepare_conf
from runner.server.listener import StartupError
from tests.conftest import connect, serving, test_config

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

NOBODY = 65534
# A group nobody is not in: the test gives it to nobody explicitly when it should pass.
OTHER_GROUP = "daemon"


def _client_as(path: Path, uid: int, gid: int, groups: list[int], out: int) -> None:
    """In a forked child: become the user, connect, prepare an empty conf, report."""
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            try:
                s.connect(str(path))
            except OSError as exc:
                os.write(out, f"refused {exc.errno}".encode())
                return
            s.sendall(encode_frame(RPC.PREPARE_CONF, encode_prepare_conf([])))
            header = s.recv(4, socket.MSG_WAITALL)
            body = s.recv(int.from_bytes(header[1:], "big"), socket.MSG_WAITALL)
            os.write(out, f"answered {header[0]} {body.hex()}".encode())
    except BaseException as exc:
        os.write(out, f"failed {exc!r}".encode())


async def _connect_as(path: Path, uid: int, gid: int, groups: list[int]) -> tuple[str, ...]:
    # A fork, not a new interpreter: another user may not be allowed to run ours.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _client_as(path, uid, gid, groups, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        with os.fdopen(read_end, "rb") as f:
            read_end = -1
            result = f.read().decode()
    finally:
        if read_end != -1:
            os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    return tuple(result.split())


@pytest.fixture
def open_dir(sock_dir: Path) -> Path:
    """sock_dir, traversable by other users (mkdtemp makes it 0700)."""
    sock_dir.chmod(0o755)
    return sock_dir


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process umask after a test changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


# ------------------------------------------------------------------------ mode and group


@as_root
async def test_by_default_gateway_workers_of_another_user_can_connect(open_dir: Path) -> None:
    config = test_config(open_dir)
    async with serving(config):
        st = config.socket_path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o766
        got = await _connect_as(config.socket_path, NOBODY, NOBODY, [])
    assert got[:2] == ("answered", str(RPC.PREPARE_CONF))
    assert decode_prepare_conf_reply(bytes.fromhex(got[2])) != 0


@as_root
async def test_a_group_restricted_socket_admits_that_group_only(open_dir: Path) -> None:
    gid = grp.getgrnam(OTHER_GROUP).gr_gid
    config = test_config(open_dir, socket_mode=0o770, socket_group=OTHER_GROUP)
    async with serving(config):
        st = config.socket_path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o770, gid)
        outsider = await _connect_as(config.socket_path, NOBODY, NOBODY, [])
        member = await _connect_as(config.socket_path, NOBODY, NOBODY, [gid])
    assert outsider == ("refused", str(errno.EACCES))
    assert member[:2] == ("answered", str(RPC.PREPARE_CONF))


async def test_an_unknown_group_stops_the_start_with_a_clear_message(sock_dir: Path) -> None:
    config = test_config(sock_dir, socket_group="no-such-group-a6")
    with pytest.raises(StartupError, match="socket_group: no group named 'no-such-group-a6'"):
        async with serving(config):
            pass
    assert not config.socket_path.exists()  # nothing left behind, nothing listening


async def test_a_failed_chown_stops_the_start_and_leaves_no_socket(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    config = test_config(sock_dir, socket_mode=0o770, socket_group=OTHER_GROUP)
    with pytest.raises(StartupError, match=OTHER_GROUP):
        async with serving(config):
            pass
    assert not config.socket_path.exists()


async def test_nobody_can_connect_before_the_mode_is_set(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch, umask: None
) -> None:
    # Under a permissive umask the socket file is born world-writable; the configured
    # mode must be in place before the runner accepts a single connection.
    os.umask(0)
    seen: list[tuple[int, int | None]] = []
    real_chmod = os.chmod

    def watching_chmod(path: object, mode: int, *args: object, **kwargs: object) -> None:
        if Path(str(path)) == config.socket_path:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                accepted: int | None = None
            except OSError as exc:
                accepted = exc.errno
            finally:
                probe.close()
            seen.append((stat.S_IMODE(os.lstat(str(path)).st_mode), accepted))
        real_chmod(path, mode, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", watching_chmod)
    config = test_config(sock_dir, socket_mode=0o700)
    async with serving(config), await connect(config) as conn:
        assert stat.S_IMODE(config.socket_path.stat().st_mode) == 0o700
        assert await conn.prepare_conf([]) != 0
    assert seen, "the runner never set the socket's mode"
    for mode, accepted in seen:
        assert accepted == errno.ECONNREFUSED, "the socket accepted before its mode was set"
        assert mode & ~0o700 == 0, f"the socket was born with mode {mode:o}"


# --------------------------------------------------------------------------- directory


async def test_a_missing_directory_is_created_reachable_whatever_the_umask(
    sock_dir: Path, umask: None
) -> None:
    os.umask(0o077)
    config = test_config(sock_dir, listen=f"unix:{sock_dir / 'a' / 'b' / 'runner.sock'}")
    async with serving(config), await connect(config) as conn:
        assert await conn.prepare_conf([]) != 0
        for directory in (sock_dir / "a", sock_dir / "a" / "b"):
            # Others may traverse (to reach the socket) but not write (to replace it).
            assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory


async def test_an_existing_directory_keeps_its_mode(sock_dir: Path) -> None:
    private = sock_dir / "private"
    private.mkdir(mode=0o700)
    config = test_config(sock_dir, listen=f"unix:{private / 'runner.sock'}")
    async with serving(config):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700


async def test_a_directory_that_cannot_be_made_is_a_clear_startup_error(sock_dir: Path) -> None:
    (sock_dir / "file").write_text("not a directory")
    config = test_config(sock_dir, listen=f"unix:{sock_dir / 'file' / 'sub' / 'runner.sock'}")
    with pytest.raises(StartupError, match=r"socket in \S+/file: it is not a directory"):
        async with serving(config):
            pass


# ---------------------------------------------------------------- what is at the path


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
async def test_something_else_at_the_path_is_refused_and_left_alone(
    sock_dir: Path, kind: str
) -> None:
    config = test_config(sock_dir)
    path = config.socket_path
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(sock_dir / "elsewhere.sock")
    with pytest.raises(StartupError, match="is not a socket; refusing to replace it"):
        async with serving(config):
            pass
    if kind == "file":
        assert path.read_text() == "precious"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink()


async def test_a_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(config.socket_path))  # bound, never listening: what a killed runner leaves
    dead.close()
    assert stat.S_ISSOCK(config.socket_path.lstat().st_mode)
    async with serving(config), await connect(config) as conn:
        assert await conn.prepare_conf([]) != 0


async def test_a_live_socket_is_not_taken_over(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config):
        with pytest.raises(StartupError, match="another process is already listening"):
            async with serving(config):
                pass
        async with await connect(config) as conn:  # the first runner is untouched
            assert await conn.prepare_conf([]) != 0


async def test_stopping_does_not_remove_a_socket_that_is_not_ours(sock_dir: Path) -> None:
    # Someone removed our socket file and a new runner bound the path: when we stop, the
    # file at the path is the new runner's and must stay.
    config = test_config(sock_dir)
    async with serving(config) as first:
        config.socket_path.unlink()
        async with serving(config):
            successor = config.socket_path.lstat().st_ino
            await first.stop()
            assert config.socket_path.lstat().st_ino == successor
            async with await connect(config) as conn:
                assert await conn.prepare_conf([]) != 0
        # and the successor, stopping, removes its own socket
        assert not config.socket_path.exists()


# ----------------------------------------------------------------- never the network


@pytest.mark.parametrize(
    "listen",
    [
        "127.0.0.1:9999",
        "0.0.0.0:9999",
        "localhost:9999",
        "[::1]:9999",
        "tcp://127.0.0.1:9999",
        "unix:127.0.0.1:9999",
    ],
)
def test_a_network_address_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="network address"):
        Config(listen=listen).check()


@pytest.mark.parametrize("listen", ["", "unix:", "unix:\0abstract", "/tmp/a\0b.sock"])
def test_an_empty_or_abstract_socket_name_is_refused(listen: str) -> None:
    # An abstract socket (leading NUL) has no file, so no mode or group can guard it.
    with pytest.raises(ValueError, match="listen"):
        Config(listen=listen).check()


async def test_the_only_listening_socket_is_a_unix_socket(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server:
        assert server._server is not None
        sockets = server._server.sockets  # type: ignore[attr-defined]  # asyncio.Server's
        families = {sock.family for sock in sockets}
        assert families == {socket.AF_UNIX}
        # and it is the file at the configured path, not an abstract name
        assert sockets[0].getsockname() == str(config.socket_path)
