"""The plugin author's commands: ``a6-runner plugins`` and ``a6-runner new-plugin``."""

from __future__ import annotations

import json
import keyword
import os
import re
from pathlib import Path
from typing import Any

import click

from runner.cli_options import (
    config_file_option,
    examples_option,
    plugin_dirs,
    plugins_dir_option,
)
from runner.core.chain import implements, summary
from runner.core.config import Config
from runner.plugin import Plugin

PLUGIN_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")


@click.command("plugins")
@config_file_option
@plugins_dir_option
@examples_option
@click.option("--json", "as_json", is_flag=True, help="Print the listing as one JSON object.")
def plugins_command(plugins_dir: tuple[str, ...], examples: bool | None, as_json: bool) -> None:
    """List the plugins `run` would load, with their configs; report import errors.

    Exits with status 1 if a module failed to import, 2 if the plugins cannot be
    loaded at all (a missing directory, two plugins with one name).
    """
    from runner.core.registry import PluginLoadError, load_registry  # keeps --help fast

    config = Config(plugin_dirs=plugin_dirs(plugins_dir), examples=examples)
    try:
        registry = load_registry(config)
    except PluginLoadError as exc:
        if as_json:
            click.echo(json.dumps({"error": str(exc)}))
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    listing = [_describe(cls, registry.origin(cls.name)) for cls in registry]
    if as_json:
        errors = [{"origin": o, "reason": r} for o, r in registry.import_errors.items()]
        click.echo(json.dumps({"plugins": listing, "import_errors": errors}, indent=2))
    else:
        for plugin in listing:
            flags = ", ".join(plugin["hooks"] + (["blocking"] if plugin["blocking"] else []))
            click.echo(f"{plugin['name']}  ({flags or 'no hooks'})  {_shorten(plugin['origin'])}")
            if plugin["summary"]:
                click.echo(f"    {plugin['summary']}")
            click.echo(f"    config: {plugin['config']}")
        if not listing:
            click.echo("no plugins found")
    for origin, reason in registry.import_errors.items():
        click.echo(f"import error: {_shorten(origin)}: {reason}", err=True)
    if registry.import_errors:
        raise SystemExit(1)


def _describe(cls: type[Plugin[Any]], origin: str) -> dict[str, Any]:
    """One plugin of the listing, as plain data (the --json output's items)."""
    from runner.core.configschema import describe

    hooks = [h for h in ("on_request", "on_response") if implements(cls, h)]
    config_type = cls.config_type
    return {
        "name": cls.name,
        "hooks": hooks,
        "blocking": cls.blocking,
        "summary": summary(cls),
        "config": "none" if config_type in (None, type(None)) else describe(config_type),
        "origin": origin,
    }


@click.command("new-plugin")
@click.argument("name")
@click.option(
    "--plugins-dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Directory to write the plugin and its test into (created if missing).",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def new_plugin_command(name: str, directory: str, force: bool) -> None:
    """Write a commented skeleton plugin NAME and its test.

    NAME is how routes will refer to the plugin, e.g. `my-auth`: it gives
    `my_auth.py` (class MyAuth) and `tests/test_my_auth.py`. The test sits in a
    subdirectory so that pytest never puts the plugin directory on sys.path, where
    a plugin named like a module (json, jwt) would shadow it.
    """
    if not PLUGIN_NAME.fullmatch(name):
        raise click.BadParameter(
            "use lower-case letters and digits, words separated by '-' or '_' (e.g. my-auth)",
            param_hint="NAME",
        )
    module = name.replace("-", "_")
    if keyword.iskeyword(module):
        raise click.BadParameter(f"{module!r} is a Python keyword", param_hint="NAME")
    if module.startswith("test_"):
        raise click.BadParameter(
            "the runner skips modules named test_*.py; choose another name", param_hint="NAME"
        )
    cls = "".join(part.capitalize() for part in re.split(r"[-_]", name))
    target = Path(directory)
    files = {
        target / f"{module}.py": PLUGIN_TEMPLATE.format(name=name, cls=cls),
        target / "tests" / f"test_{module}.py": TEST_TEMPLATE.format(
            name=name, cls=cls, module=module
        ),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        raise click.ClickException(
            f"{', '.join(existing)} already exist(s); use --force to overwrite"
        )
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"wrote {path}")
    click.echo(
        "next:\n"
        f"  pytest {target / 'tests' / f'test_{module}.py'}\n"
        f"  a6-runner run --plugins-dir {target} --reload\n"
        f'  and on a route: {{"name": "{name}", "value": "{{}}"}}'
    )


def _shorten(origin: str) -> str:
    """A path relative to the current directory if it lies below it."""
    try:
        relative = os.path.relpath(origin)
    except ValueError:
        return origin
    return origin if relative.startswith("..") else relative


# The skeleton is a template, not an example: it must pass ruff and mypy --strict as
# written, and its test must pass as written.
PLUGIN_TEMPLATE = '''\
"""``{name}``: what this plugin does and how to configure it."""

from __future__ import annotations

from dataclasses import dataclass

from runner.plugin import ConfigError, Plugin, Request


@dataclass(frozen=True)
class {cls}Config:
    """The route's config, checked at PrepareConf: unknown fields, missing fields and
    wrong types are rejected with the field's name, and the route answers 503."""

    header: str = "x-{name}"
    value: str = "hello"
    # Answer 403 to requests that lack this query argument (None: let all through).
    required_arg: str | None = None

    def __post_init__(self) -> None:
        # Your own rules: ConfigError names the field in the gateway's error log.
        if not self.header:
            raise ConfigError("header", "must not be empty")


class {cls}(Plugin[{cls}Config]):
    """Adds a header to every request; optionally requires a query argument.

    The first line of this docstring is the summary `a6-runner plugins` shows.
    """

    name = "{name}"
    # Set to True if the hooks call blocking code (a synchronous HTTP client or
    # database driver, heavy CPU): plain `def` hooks then run in a thread pool.
    blocking = False

    def __init__(self, config: {cls}Config) -> None:
        # One instance per route config, reused for every request of that route:
        # prepare expensive things (compiled patterns, clients) here. Its attributes
        # are per worker process; counters every worker shares go in the shared state:
        # `await self.route_state.incr("hits", ttl=60)`, `await self.state.take(...)`.
        super().__init__(config)

    async def on_request(self, request: Request) -> None:
        # Read: request.method, .path, .src_ip, .headers, .args,
        #       await request.var("remote_addr"), await request.body().
        cfg = self.config
        if cfg.required_arg is not None and cfg.required_arg not in request.args:
            # A Stop answers the client now; later plugins and the upstream are skipped.
            request.stop(403, f"missing query argument {{cfg.required_arg}}\\n")
            return
        # Changes are collected and sent back as one rewrite.
        request.headers.set(cfg.header, cfg.value)

    # The post-response phase (routes with ext-plugin-post-resp), if you need it:
    # def on_response(self, response: Response) -> None:
    #     response.headers.set("x-seen-by", self.name)
'''

TEST_TEMPLATE = '''\
"""Tests of the ``{name}`` plugin: no gateway needed. Run with `pytest`."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner.testing import PluginConfigError, load_plugin, prepare, run_request

# Imported exactly as the runner imports it (under a private name, not from sys.path).
{cls} = load_plugin(Path(__file__).parent.parent / "{module}.py")


def test_it_adds_the_configured_header() -> None:
    plugin = prepare({cls}, {{"header": "x-greeting", "value": "hi"}})
    result = run_request(plugin, path="/anything")
    assert result.rewrite.headers == (("x-greeting", "hi"),)


def test_a_request_without_the_required_arg_is_refused() -> None:
    plugin = prepare({cls}, {{"required_arg": "token"}})
    assert run_request(plugin, args="other=1").stop.status == 403
    assert run_request(plugin, args="token=abc").rewrite.headers == (("x-{name}", "hello"),)


def test_a_bad_config_is_rejected_naming_the_field() -> None:
    with pytest.raises(PluginConfigError, match="field 'value'"):
        prepare({cls}, {{"value": 42}})
    with pytest.raises(PluginConfigError, match="field 'header'"):
        prepare({cls}, {{"header": ""}})
'''
