"""The runner's configuration: one object, filled by the CLI, read by the server.

Nothing else in the runner reads the environment or a config file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runner.core.cache import CONF_TTL_MARGIN
from runner.protocol.frame import MAX_PAYLOAD

DEFAULT_SOCKET = "/tmp/runner.sock"


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of ``a6-runner run``; see ``conf/a6-runner.toml`` for each one's meaning."""

    listen: str = DEFAULT_SOCKET
    conf_expire_time: float = 3600.0
    plugin_dirs: tuple[Path, ...] = ()
    builtin_plugins: bool = True
    log_level: str = "info"
    call_timeout: float = 50.0
    shutdown_grace: float = 0.5
    max_connections: int = 4096
    max_frame_size: int = MAX_PAYLOAD
    max_confs: int = 100_000
    socket_mode: int = 0o766
    socket_group: str | None = None
    blocking_workers: int = 16
    reload: bool = False
    # Worker processes serving the socket; 1 is a single process without a supervisor.
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def socket_path(self) -> Path:
        """``listen`` without the ``unix:`` prefix the gateway puts on it."""
        return Path(self.listen.removeprefix("unix:"))

    @property
    def conf_ttl(self) -> float:
        return self.conf_expire_time + CONF_TTL_MARGIN

    def check(self) -> None:
        """Refuse settings that would make the runner misbehave under the gateway."""
        addr = self.listen
        if not addr.removeprefix("unix:"):
            raise ValueError("listen: an empty socket path")
        if "\0" in addr:
            # A leading NUL would make an abstract socket: no file, so no mode or group
            # could keep other users (or other network namespaces' peers) out.
            raise ValueError(f"listen: {addr!r} holds a NUL byte; give a file path")
        if ":" in addr.removeprefix("unix:") and not addr.removeprefix("unix:").startswith("/"):
            raise ValueError(
                f"listen: {addr!r} is not a unix socket path (the runner never "
                "listens on a network address)"
            )
        if not 1 <= self.max_frame_size <= MAX_PAYLOAD:
            raise ValueError(f"max_frame_size must be between 1 and {MAX_PAYLOAD}")
        if self.call_timeout <= 0 or self.conf_expire_time <= 0:
            raise ValueError("call_timeout and conf_expire_time must be positive")
        if self.max_connections < 1 or self.max_confs < 1 or self.blocking_workers < 1:
            raise ValueError("max_connections, max_confs and blocking_workers must be >= 1")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"socket_mode {self.socket_mode:o} is not a file mode")


def read_config_file(path: Path) -> dict[str, Any]:
    """The ``[runner]`` table of a TOML config file, keys as in Config.

    Unknown keys are an error, so that a typo does not silently keep a default.
    """
    with path.open("rb") as f:
        data = tomllib.load(f)
    table = data.get("runner", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [runner] must be a table")
    known = {f.name for f in fields(Config)} - {"extra"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return table
