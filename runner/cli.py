"""The command line: translates options (and their environment variables) into a Config
and calls the server. The options of ``run`` are generated from Config's fields
(runner/cli_options.py).

``a6-runner run`` is what the gateway starts: it imports the server and nothing of the
tools (bench, client, scaffold), which load only when their own command runs.
"""

from __future__ import annotations

import importlib
import inspect
import json
from importlib import resources
from typing import Any

import click

from runner import __version__
from runner.cli_options import SettingsCommand, config_from_options, config_options
from runner.core.config import Config, option_name, settings

# name -> "module:attribute" of the commands imported only when used.
LAZY_COMMANDS = {
    "bench": "runner.tools.bench:bench",
    "new-plugin": "runner.tools.scaffold:new_plugin_command",
    "plugins": "runner.tools.scaffold:plugins_command",
}

EXAMPLE_CONFIG = "a6-runner.toml"


class LazyGroup(click.Group):
    """A group whose ``LAZY_COMMANDS`` are imported when one of them is run (or listed)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS and cmd_name not in self.commands:
            module, _, attr = LAZY_COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click cuts each summary at about 45 characters; a summary is one sentence that
        # the formatter can wrap, so show all of it.
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            text = command.short_help or inspect.cleandoc(command.help or "").split("\n\n")[0]
            rows.append((name, " ".join(text.split())))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="a6-runner")
def main() -> None:
    """a6-runner: run Python plugins for the Apache APISIX gateway (ext-plugin)."""


@main.command(cls=SettingsCommand)
@config_options()
@click.pass_context
def run(ctx: click.Context, /, **_options: Any) -> None:
    """Serve plugins on the gateway's Unix socket until SIGTERM or SIGINT; SIGHUP
    reloads the plugins."""
    config = config_from_options(ctx)
    from runner.core.logs import setup_logging
    from runner.server.lifecycle import run as run_runner  # keeps `a6-runner --help` fast

    setup_logging(config.log_level, fmt=config.log_format)
    raise SystemExit(run_runner(config))


@main.command("config", cls=SettingsCommand)
@click.option(
    "--example",
    is_flag=True,
    help="Print the example config file instead: every setting, its meaning and default.",
)
@config_options()
@click.pass_context
def config_command(ctx: click.Context, /, example: bool, **_options: Any) -> None:
    """Print the settings `run` would use, as a config file's [runner] table."""
    if example:
        click.echo(resources.files("runner").joinpath(EXAMPLE_CONFIG).read_text(), nl=False)
        return
    click.echo(config_as_toml(config_from_options(ctx)), nl=False)


def config_as_toml(config: Config) -> str:
    """``config`` as a ``[runner]`` table that ``--config`` reads back to the same Config."""
    lines = ["[runner]"]
    for name, _spec in settings():
        value = getattr(config, name)
        key = option_name(name)
        if value is None:
            lines.append(f"# {key} =")
        elif name == "socket_mode":
            lines.append(f'{key} = "{value:04o}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, tuple):
            lines.append(f"{key} = {json.dumps([str(v) for v in value])}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            # A JSON string is a valid TOML basic string.
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"
