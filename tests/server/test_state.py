"""The shared state store in the runner's life (``--state-url``): opened once per runner,
before the workers are forked, closed by each process at shutdown, the supervisor last.
Real processes; which worker served a call is read from the reply (``test-pid``)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.server.test_process import RunnerProcess, startup_failure
from tests.server.test_workers import running, workers_of

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

HAS_SHM = Path("/dev/shm").is_dir()


def state_file(output: str) -> Path:
    match = re.search(r"; state (\S+?);", output)
    assert match, output
    return Path(match.group(1))


async def test_the_workers_local_state_file_lives_as_long_as_the_runner(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        await workers_of(runner, 2)
        path = state_file(runner.output)
        assert path.exists()
        if HAS_SHM:
            assert path.is_relative_to("/dev/shm")  # tmpfs: no disk write per request
        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    assert not path.parent.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_state_file_that_cannot_be_made_stops_the_start_in_one_line(
    sock_dir: Path, workers: str
) -> None:
    sock = sock_dir / "runner.sock"
    where = sock_dir / "missing" / "state.db"
    runner = RunnerProcess(sock, "--workers", workers, "--state-url", f"local://{where}")
    assert await runner.exit_status() == 1
    line = startup_failure(runner, 1)
    assert "cannot start: cannot open the state store" in line
    assert str(where) in line
    assert not sock.exists()  # nothing listened


async def test_a_state_url_written_wrong_stops_the_start_naming_the_setting(
    sock_dir: Path,
) -> None:
    runner = RunnerProcess(sock_dir / "runner.sock", env={"A6_RUNNER_STATE_URL": "redis://h:x"})
    assert await runner.exit_status() == 2
    assert "A6_RUNNER_STATE_URL: state url 'redis://h:x'" in startup_failure(runner, 2)
