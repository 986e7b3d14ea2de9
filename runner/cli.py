"""The command line: translates options (and their environment variables) into a Config."""

from __future__ import annotations

import os
from typing import Any

import click

from runner import __version__
from runner.cli_options import (
    builtin_plugins_option,
    config_file_option,
    plugin_dirs,
    plugins_dir_option,
)
from runner.core.config import DEFAULT_SOCKET, Config
from runner.core.logs import setup_logging
from runner.protocol.frame import MAX_PAYLOAD
from runner.tools.bench import bench
from runner.tools.scaffold import new_plugin_command, plugins_command


def _mode(value: Any) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 8)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an octal file mode such as 0766") from None


def _workers(value: Any) -> int:
    if str(value).strip().lower() == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # no affinity on this platform
            return os.cpu_count() or 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise click.BadParameter(f"{value!r} is not a number of workers (1, 2, ...) nor 'auto'")
    return count


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="a6-runner")
def main() -> None:
    """a6-runner: run Python plugins for the Apache APISIX gateway (ext-plugin)."""


@main.command()
@config_file_option
@click.option(
    "--listen",
    envvar="APISIX_LISTEN_ADDRESS",
    default=DEFAULT_SOCKET,
    show_default=True,
    show_envvar=True,
    help="Unix socket to serve, as a path or unix:/path. The gateway sets it.",
)
@click.option(
    "--conf-expire-time",
    envvar="APISIX_CONF_EXPIRE_TIME",
    type=float,
    default=3600.0,
    show_default=True,
    show_envvar=True,
    help="Seconds the gateway caches a conf token. Confs are kept 300 s longer.",
)
@plugins_dir_option
@builtin_plugins_option
@click.option(
    "--log-level",
    envvar="A6_RUNNER_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    show_envvar=True,
    help="Lowest level logged to stderr.",
)
@click.option(
    "--call-timeout",
    envvar="A6_RUNNER_CALL_TIMEOUT",
    type=float,
    default=50.0,
    show_default=True,
    show_envvar=True,
    help="Seconds one call's plugin chain may take before it fails with an error "
    "(the gateway itself gives up after 60 s).",
)
@click.option(
    "--shutdown-grace",
    envvar="A6_RUNNER_SHUTDOWN_GRACE",
    type=float,
    default=0.5,
    show_default=True,
    show_envvar=True,
    help="Seconds calls in flight get to finish on SIGTERM (the gateway kills "
    "the runner 1 s after SIGTERM).",
)
@click.option(
    "--max-connections",
    envvar="A6_RUNNER_MAX_CONNECTIONS",
    type=int,
    default=4096,
    show_default=True,
    show_envvar=True,
    help="Connections served at once; more are refused.",
)
@click.option(
    "--max-frame-size",
    envvar="A6_RUNNER_MAX_FRAME_SIZE",
    type=int,
    default=MAX_PAYLOAD,
    show_default=True,
    show_envvar=True,
    help="Largest frame payload accepted or sent, in bytes.",
)
@click.option(
    "--max-confs",
    envvar="A6_RUNNER_MAX_CONFS",
    type=int,
    default=100_000,
    show_default=True,
    show_envvar=True,
    help="Prepared confs kept at most; the least recently used go first.",
)
@click.option(
    "--socket-mode",
    envvar="A6_RUNNER_SOCKET_MODE",
    default="0766",
    show_default=True,
    show_envvar=True,
    help="Octal mode of the socket file. Gateway workers often run as another "
    "user (nobody) and need write access.",
)
@click.option(
    "--socket-group",
    envvar="A6_RUNNER_SOCKET_GROUP",
    default=None,
    show_envvar=True,
    help="Group to give the socket file, e.g. with --socket-mode 0770 to admit "
    "only that group's users.",
)
@click.option(
    "--blocking-workers",
    envvar="A6_RUNNER_BLOCKING_WORKERS",
    type=int,
    default=16,
    show_default=True,
    show_envvar=True,
    help="Threads for plugins marked blocking.",
)
@click.option(
    "--reload",
    is_flag=True,
    envvar="A6_RUNNER_RELOAD",
    show_envvar=True,
    help="Watch plugin directories and re-import changed modules.",
)
@click.option(
    "--workers",
    envvar="A6_RUNNER_WORKERS",
    default="1",
    show_default=True,
    show_envvar=True,
    help="Worker processes serving the socket, or 'auto' for one per CPU this process "
    "may run on. With more than 1, a supervisor binds the socket and restarts workers "
    "that die; 1 is a single process.",
)
def run(**options: Any) -> None:
    """Serve plugins on the gateway's Unix socket until SIGTERM or SIGINT."""
    from runner.server.lifecycle import run as run_runner  # keeps `a6-runner --help` fast

    config = Config(
        listen=options["listen"],
        conf_expire_time=options["conf_expire_time"],
        plugin_dirs=plugin_dirs(options["plugins_dir"]),
        builtin_plugins=options["builtin_plugins"],
        log_level=options["log_level"].lower(),
        call_timeout=options["call_timeout"],
        shutdown_grace=options["shutdown_grace"],
        max_connections=options["max_connections"],
        max_frame_size=options["max_frame_size"],
        max_confs=options["max_confs"],
        socket_mode=_mode(options["socket_mode"]),
        socket_group=options["socket_group"],
        blocking_workers=options["blocking_workers"],
        reload=options["reload"],
        workers=_workers(options["workers"]),
    )
    setup_logging(config.log_level)
    raise SystemExit(run_runner(config))


main.add_command(bench)
main.add_command(plugins_command)
main.add_command(new_plugin_command)
