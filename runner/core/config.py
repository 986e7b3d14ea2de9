"""The runner's configuration: one object, filled by the CLI, read by the server.

``Config`` is the one source of every setting's default, meaning and validation: each
field carries a ``Setting`` (help text, environment variable, parser), from which the
command line builds its options (``runner/cli.py``) and by whose name a config file sets
it. Nothing else in the runner reads the environment or a config file.

Adding a setting is adding a field here with ``setting(...)``: its ``--option``, its
environment variable, its config-file key, its help and its checks follow.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from runner.core.cache import conf_ttl
from runner.protocol.frame import MAX_PAYLOAD
from runner.state import DEFAULT_STATE_URL, check_state_url

DEFAULT_SOCKET = "/tmp/runner.sock"
ENV_PREFIX = "A6_RUNNER_"
TABLE = "runner"

# sun_path holds 108 bytes on Linux, the terminating NUL included: a longer path cannot
# be bound at all, and the kernel's own error ("AF_UNIX path too long") names no setting.
MAX_SOCKET_PATH = 107

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")

# APISIX SIGKILLs the runner 1 s after SIGTERM. The socket file goes first, then calls in
# flight get this long; what is left of the second closes the connections, gives idle
# blocking-plugin threads up to 0.2 s to end (runner/server/lifecycle.py) and exits, so
# that the gateway never kills us half-way and finds a socket file left behind.
DEFAULT_SHUTDOWN_GRACE = 0.7


class ConfigError(ValueError):
    """A setting's value is unusable; the message is one line naming the setting and,
    for a config file, the file."""


# -------------------------------------------------------------------- parsers
# Each takes a value as the command line or the environment give it (a string) or as a
# TOML file gives it (str, int, float, bool, list) and returns the setting's type, or
# raises ValueError with a message that the caller prefixes with the setting's name.


def parse_float(raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ValueError(f"{raw!r} is not a number")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{raw!r} is not a finite number")
    return value


def parse_int(raw: object) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise ValueError(f"{raw!r} is not a whole number")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None


def parse_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{raw!r} is not true or false")


def parse_optional_bool(raw: object) -> bool | None:
    """On, off, or None (auto, the default)."""
    if raw is None or (isinstance(raw, str) and raw.strip().lower() == "auto"):
        return None
    return parse_bool(raw)


def parse_workers(raw: object) -> int:
    """A number of worker processes, or ``auto``: the CPUs this process may run on
    (its affinity, so a taskset or a cgroup cpuset is respected)."""
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # no affinity on this platform
            return os.cpu_count() or 1
    try:
        count = parse_int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{raw!r} is not a number of workers (1, 2, ...) nor 'auto'")
    return count


def parse_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is not a string")
    return raw


def parse_mode(raw: object) -> int:
    """An octal file mode: the string "0766" (or "766", "0o766"), or a TOML integer,
    which is only unambiguous written as ``0o766``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw > 0o777 and set(str(raw)) <= set("01234567"):
            # TOML reads 770 as the decimal number, not the mode: say how to write it.
            raise ValueError(f'{raw} is a decimal number; write the mode as "0{raw}" or 0o{raw}')
        return raw
    if isinstance(raw, str):
        text = raw.strip().lower().removeprefix("0o")
        if text and all(c in "01234567" for c in text):
            return int(text, 8)
    raise ValueError(f'{raw!r} is not an octal file mode such as "0766" (TOML: 0o766)')


def parse_paths(raw: object) -> tuple[Path, ...]:
    """Directories: a list, or one string that may join several with ``os.pathsep``."""
    items: list[object] = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    out: list[Path] = []
    for item in items:
        if isinstance(item, os.PathLike):
            out.append(Path(item))
        elif isinstance(item, str):
            out.extend(Path(p) for p in item.split(os.pathsep) if p)
        else:
            raise ValueError(f"{item!r} is not a directory path")
    for path in out:
        if not path.is_dir():
            raise ValueError(f"{str(path)!r} is not a directory")
    return tuple(out)


def parse_log_level(raw: object) -> str:
    text = parse_str(raw).strip().lower()
    # "warn" is the name APISIX and nginx give this level.
    text = {"warn": "warning"}.get(text, text)
    if text not in LOG_LEVELS:
        raise ValueError(f"{raw!r} is not one of {', '.join(LOG_LEVELS)} (or warn)")
    return text


def known_log_level(value: str) -> None:
    if value not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")


def parse_optional_str(raw: object) -> str | None:
    return parse_str(raw) or None


def parse_log_format(raw: object) -> str:
    text = parse_str(raw).strip().lower()
    if text not in LOG_FORMATS:
        raise ValueError(f"{raw!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


def known_log_format(value: str) -> None:
    if value not in LOG_FORMATS:
        raise ValueError(f"{value!r} is not one of {', '.join(LOG_FORMATS)}")


@dataclass(frozen=True, slots=True)
class StatusAddress:
    """Where the metrics and health endpoint listens: a Unix socket ``path``, or TCP
    ``host`` and ``port``."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    @property
    def loopback(self) -> bool:
        """True for a Unix socket or a loopback address: only this host can connect."""
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may resolve to anything

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def status_address(value: str) -> StatusAddress:
    """``metrics_listen``'s value as an address: ``/path`` or ``unix:/path``, or
    ``host:port`` (``[::1]:port`` for IPv6); ValueError says what is wrong."""
    if value.startswith(("/", "unix:")):
        path = value.removeprefix("unix:")
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{value!r}: a Unix socket takes an absolute path")
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ValueError(f"{value!r}: a Unix socket path holds at most {MAX_SOCKET_PATH} bytes")
        return StatusAddress(path=Path(path))
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is neither host:port nor a Unix socket path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, [::1]:9091")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{value!r}: {port_text!r} is not a port (0-65535)")
    return StatusAddress(host=host, port=port)


def optional_status_address(value: str | None) -> None:
    if value is not None:
        status_address(value)


# ----------------------------------------------------------------- validators
# Checks of a parsed value, shared by the parsers above and by Config.check (for a
# Config built in code). They raise ValueError without the setting's name.


def positive(value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be a positive number of seconds (got {value:g})")


def non_negative(value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be 0 or more seconds (got {value:g})")


def at_least(minimum: int, maximum: int | None = None) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound} (got {value})")

    return check


def file_mode(value: int) -> None:
    if not 0 <= value <= 0o777:
        raise ValueError(f"{value:o} (octal) is not a file mode: at most 0777")


def unix_socket_address(addr: str) -> None:
    path = addr.removeprefix("unix:")
    if not path:
        raise ValueError("an empty socket path")
    if "\0" in addr:
        # A leading NUL would make an abstract socket: no file, so no mode or group
        # could keep other users (or other network namespaces' peers) out.
        raise ValueError(f"{addr!r} holds a NUL byte; give a file path")
    if ":" in path and not path.startswith("/"):
        raise ValueError(
            f"{addr!r} is not a unix socket path (the runner never listens on a network address)"
        )
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"the socket path is {size} bytes long; a Unix socket path holds at most "
            f"{MAX_SOCKET_PATH}: choose a shorter one"
        )


def state_url(url: str) -> None:
    # Only how the URL is written: whether its file can be made or its Redis answers
    # shows when the runner opens the store (a start-up failure) or uses it.
    check_state_url(url)


def _no_check(_value: Any) -> None:
    pass


# ------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class Setting:
    """How one Config field is set from outside: the CLI and the config file read this."""

    help: str
    parse: Callable[[object], Any]
    check: Callable[[Any], None] = _no_check
    metavar: str | None = None
    # The option is --<option with dashes>, the file key <option> (or the field's name);
    # the environment variable defaults to A6_RUNNER_<OPTION>.
    option: str | None = None
    env: str | None = None
    # A boolean shown as --x/--no-x; a repeatable option.
    flag: bool = False
    multiple: bool = False
    # The default as the help shows it; None shows none.
    show: Callable[[Any], str | None] = str


def setting(default: Any, **kwargs: Any) -> Any:
    """A Config field with its Setting (see ``Setting`` for the arguments)."""
    meta = {"setting": Setting(**kwargs)}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of ``a6-runner run``; ``a6-runner config --example`` documents each."""

    listen: str = setting(
        DEFAULT_SOCKET,
        env="APISIX_LISTEN_ADDRESS",
        metavar="PATH",
        parse=parse_str,
        check=unix_socket_address,
        help="Unix socket to serve, as a path or unix:/path. The gateway sets it.",
    )
    conf_expire_time: float = setting(
        3600.0,
        env="APISIX_CONF_EXPIRE_TIME",
        metavar="SECONDS",
        parse=parse_float,
        check=positive,
        help="Seconds the gateway caches a conf token (the gateway sets it). Confs are kept "
        "that long again, at most 300 s more, then forgotten if unused.",
    )
    plugin_dirs: tuple[Path, ...] = setting(
        (),
        option="plugins_dir",
        metavar="DIR",
        multiple=True,
        parse=parse_paths,
        show=lambda dirs: None,
        help="Directory of plugin modules to load (repeatable; in the environment "
        f"variable, separate with '{os.pathsep}').",
    )
    # None (auto): serve the examples only if there is no plugin directory and no
    # entry-point plugin.
    examples: bool | None = setting(
        None,
        flag=True,
        parse=parse_optional_bool,
        show=lambda value: "auto" if value is None else str(value).lower(),
        help="Serve the example plugins shipped with a6-runner (say, rewrite, api-key, ...). "
        "Default: only when there is no plugin directory and no installed entry-point plugin.",
    )
    log_level: str = setting(
        "info",
        metavar="[" + "|".join(LOG_LEVELS) + "]",
        parse=parse_log_level,
        check=known_log_level,
        help="Lowest level logged to stderr (warn is warning).",
    )
    call_timeout: float = setting(
        50.0,
        metavar="SECONDS",
        parse=parse_float,
        check=positive,
        help="Seconds one call's plugin chain may take before it fails with an error "
        "(the gateway itself gives up after 60 s).",
    )
    shutdown_grace: float = setting(
        DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        parse=parse_float,
        check=non_negative,
        help="Seconds calls in flight get to finish on SIGTERM. The gateway kills the "
        "runner 1 s after SIGTERM; the rest of that second is for closing and exiting.",
    )
    max_connections: int = setting(
        4096,
        metavar="N",
        parse=parse_int,
        check=at_least(1),
        help="Connections served at once; more are refused.",
    )
    max_frame_size: int = setting(
        MAX_PAYLOAD,
        metavar="BYTES",
        parse=parse_int,
        check=at_least(1, MAX_PAYLOAD),
        help="Largest frame payload accepted or sent, in bytes.",
    )
    max_confs: int = setting(
        100_000,
        metavar="N",
        parse=parse_int,
        check=at_least(1),
        help="Prepared confs kept at most; the least recently used go first.",
    )
    socket_mode: int = setting(
        0o766,
        metavar="MODE",
        parse=parse_mode,
        check=file_mode,
        show=lambda mode: f"{mode:04o}",
        help="Octal mode of the socket file. Gateway workers often run as another "
        "user (nobody) and need write access.",
    )
    socket_group: str | None = setting(
        None,
        metavar="GROUP",
        parse=parse_optional_str,
        show=lambda group: group,
        help="Group to give the socket file, e.g. with --socket-mode 0770 to admit "
        "only that group's users.",
    )
    blocking_workers: int = setting(
        16,
        metavar="N",
        parse=parse_int,
        check=at_least(1),
        help="Threads for plugins marked blocking.",
    )
    reload: bool = setting(
        False,
        flag=True,
        parse=parse_bool,
        help="Watch plugin directories and re-import changed modules.",
    )
    # 1 is a single process without a supervisor (what the runner always was).
    workers: int = setting(
        1,
        metavar="N|auto",
        parse=parse_workers,
        check=at_least(1),
        help="Worker processes serving the socket; auto: one per CPU this process may "
        "run on. With more than 1, a supervisor binds the socket, forks the workers and "
        "replaces any that dies.",
    )
    log_format: str = setting(
        "text",
        metavar="[" + "|".join(LOG_FORMATS) + "]",
        parse=parse_log_format,
        check=known_log_format,
        help="text: one line per event; json: one JSON object per line (time, level, "
        "process, worker, logger, message and the event's fields).",
    )
    metrics_listen: str | None = setting(
        None,
        metavar="HOST:PORT|PATH",
        parse=parse_optional_str,
        check=optional_status_address,
        show=lambda value: value,
        help="Serve Prometheus metrics (/metrics) and health (/healthz, /readyz) on this "
        "loopback host:port or Unix socket path. Off by default.",
    )
    metrics_allow_remote: bool = setting(
        False,
        flag=True,
        parse=parse_bool,
        help="Let --metrics-listen take an address other hosts can reach (0.0.0.0, a "
        "public address or a host name). The endpoint has no authentication.",
    )
    tracing: bool = setting(
        False,
        flag=True,
        parse=parse_bool,
        help="Trace each call with OpenTelemetry (pip install 'a6-runner[otel]'), "
        "continuing the request's traceparent; export over OTLP as the standard OTEL_* "
        "environment variables say.",
    )
    state_url: str = setting(
        DEFAULT_STATE_URL,
        metavar="URL",
        parse=parse_str,
        check=state_url,
        help="Where plugins keep shared state (counters, rate-limit buckets): local:// "
        "(every worker of this runner, on this node), redis://host:port/db, rediss://..., "
        "unix:///path/redis.sock (every runner on that Redis) or memory:// (each process "
        "its own).",
    )

    @property
    def socket_path(self) -> Path:
        """``listen`` without the ``unix:`` prefix the gateway puts on it."""
        return Path(self.listen.removeprefix("unix:"))

    @property
    def conf_ttl(self) -> float:
        return conf_ttl(self.conf_expire_time)

    def check(self) -> None:
        """Refuse settings that would make the runner misbehave under the gateway
        (ConfigError names the setting)."""
        for name, spec in settings():
            try:
                spec.check(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        address = self.status_address
        if address is not None and not address.loopback and not self.metrics_allow_remote:
            raise ConfigError(
                f"metrics_listen: {self.metrics_listen!r} is not a loopback address, and the "
                "endpoint has no authentication; use 127.0.0.1:PORT or a socket path, or "
                "allow it explicitly with --metrics-allow-remote"
            )

    @property
    def status_address(self) -> StatusAddress | None:
        """``metrics_listen`` parsed; None when the endpoint is off."""
        return None if self.metrics_listen is None else status_address(self.metrics_listen)

    @classmethod
    def from_values(cls, values: Mapping[str, tuple[object, str]]) -> Config:
        """A checked Config from raw values, ``field name -> (value, where)``; ``where``
        names the value's origin in errors (an option, a variable, a file's key)."""
        return cls(
            **{name: cls.parse_value(name, raw, where) for name, (raw, where) in values.items()}
        )

    @staticmethod
    def parse_value(name: str, raw: object, where: str) -> Any:
        """Field ``name``'s value from ``raw`` (a string, or a TOML value), checked;
        ConfigError prefixed with ``where``."""
        spec = _setting(name)
        try:
            value = spec.parse(raw)
            spec.check(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return value


def _setting(name: str) -> Setting:
    spec: Setting = Config.__dataclass_fields__[name].metadata["setting"]
    return spec


def settings() -> Iterator[tuple[str, Setting]]:
    """``(field name, Setting)`` of every Config field, in declaration order."""
    for f in fields(Config):
        if "setting" not in f.metadata:
            # Without it the field would have no option, variable or file key.
            raise TypeError(f"Config.{f.name} must be declared with setting(...)")
        yield f.name, f.metadata["setting"]


def option_name(name: str) -> str:
    """The option (and file key) of a field: ``plugin_dirs`` -> ``plugins_dir``."""
    return _setting(name).option or name


def env_var(name: str) -> str:
    return _setting(name).env or ENV_PREFIX + option_name(name).upper()


def default(name: str) -> Any:
    value = Config.__dataclass_fields__[name].default
    assert value is not MISSING
    return value


def read_config_file(path: Path) -> dict[str, tuple[object, str]]:
    """The settings of a TOML file's ``[runner]`` table: ``field name -> (value, where)``.

    A key is a field's name or its option's (``plugin_dirs`` or ``plugins_dir``). Unknown
    keys and tables are errors, so that a typo does not silently keep a default.
    """
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    others = sorted(set(data) - {TABLE})
    if others:
        raise ConfigError(
            f"{path}: unknown table or key {', '.join(others)}; settings go in a [{TABLE}] table"
        )
    table = data.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table: [{TABLE}]")
    keys: dict[str, str] = {}
    for name, _spec in settings():
        keys[name] = name
        keys[option_name(name)] = name
    out: dict[str, tuple[object, str]] = {}
    for key, value in table.items():
        found = keys.get(key)
        if found is None:
            raise ConfigError(
                f"{path}: unknown setting {key!r} in [{TABLE}]; known: "
                + ", ".join(option_name(n) for n, _ in settings())
            )
        if found in out:
            raise ConfigError(f"{path}: {key} set twice (as {out[found][1].split(': ')[-1]})")
        out[found] = (value, f"{path}: {key}")
    return out
