"""``a6-runner plugins`` and ``a6-runner new-plugin``: the plugin author's commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.protocol.messages import Rewrite
from tests.conftest import connect, serving, test_config

GOOD = '''
from dataclasses import dataclass
from runner.plugin import Plugin, Request

@dataclass(frozen=True)
class GoodConfig:
    limit: int
    label: str = "x"

class Good(Plugin[GoodConfig]):
    """Does good things.

    More detail that the listing leaves out.
    """
    name = "good"

    def on_request(self, request: Request) -> None:
        pass
'''


def assert_generated_test_passes(test_file: Path) -> None:
    """The skeleton's own test passes as written, run the way its author will run it."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file.name],
        cwd=test_file.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_plugins_lists_each_plugin_with_its_hooks_summary_and_config(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    result = invoke("plugins", "--plugins-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("good  (on_request)  ")
    assert lines[0].endswith("good.py")
    assert lines[1:] == ["    Does good things.", "    config: {limit: int, label: str = 'x'}"]


def test_plugins_reads_the_same_config_file_as_run(tmp_path: Path) -> None:
    # What `run --config F` would load is what `plugins --config F` lists.
    plugins = tmp_path / "my-plugins"
    plugins.mkdir()
    (plugins / "good.py").write_text(GOOD)
    conf_file = tmp_path / "a6-runner.toml"
    conf_file.write_text(
        f'[runner]\nplugin_dirs = ["{plugins}"]\nexamples = false\ncall_timeout = 5\n'
    )
    result = invoke("plugins", "--config", str(conf_file))
    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in result.output.splitlines() if line[:1] != " "] == ["good"]


def test_plugins_includes_the_bundled_examples_by_default() -> None:
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "response-rewrite  (on_response)" in result.output
    assert "api-key  (on_request)" in result.output


def test_plugins_reports_import_errors_and_fails(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    result = CliRunner().invoke(main, ["plugins", "--plugins-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "good  (on_request)" in result.stdout
    assert "import error: " in result.stderr
    assert "broken.py: ModuleNotFoundError: No module named 'no_such_module_here'" in (
        result.stderr
    )


def test_plugins_refuses_two_plugins_with_one_name(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "good_again.py").write_text(GOOD)
    result = CliRunner().invoke(main, ["plugins", "--plugins-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "two plugins are named 'good'" in result.stderr
    as_json = CliRunner().invoke(main, ["plugins", "--json", "--plugins-dir", str(tmp_path)])
    assert as_json.exit_code == 2
    assert "two plugins are named 'good'" in json.loads(as_json.stdout)["error"]


def test_plugins_serves_the_examples_as_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "good.py").write_text(GOOD)

    def names(*args: str) -> list[str]:
        result = invoke("plugins", "--json", *args)
        assert result.exit_code == 0, result.output
        return [plugin["name"] for plugin in json.loads(result.stdout)["plugins"]]

    assert "say" in names()
    assert names("--plugins-dir", str(tmp_path)) == ["good"]
    assert "say" in names("--plugins-dir", str(tmp_path), "--examples")
    monkeypatch.setenv("A6_RUNNER_EXAMPLES", "false")
    assert names() == []


def test_new_plugin_writes_a_plugin_and_a_test_that_passes(tmp_path: Path) -> None:
    target = tmp_path / "my-plugins"
    result = invoke("new-plugin", "header-stamp", "--plugins-dir", str(target))
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.py")) == [
        "header_stamp.py",
        "tests/test_header_stamp.py",
    ]
    assert "a6-runner run --plugins-dir" in result.output
    assert_generated_test_passes(target / "tests" / "test_header_stamp.py")

    listing = invoke("plugins", "--plugins-dir", str(target))
    assert listing.exit_code == 0, listing.output
    assert listing.output.startswith("header-stamp  (on_request)")
    assert "config: {header: str = 'x-header-stamp', value: str = 'hello'" in listing.output


def test_new_plugin_never_overwrites_without_force(tmp_path: Path) -> None:
    assert invoke("new-plugin", "stamp", "--plugins-dir", str(tmp_path)).exit_code == 0
    (tmp_path / "stamp.py").write_text("# my work\n")
    result = CliRunner().invoke(main, ["new-plugin", "stamp", "--plugins-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "already exist" in result.output
    assert (tmp_path / "stamp.py").read_text() == "# my work\n"
    assert invoke("new-plugin", "stamp", "--plugins-dir", str(tmp_path), "--force").exit_code == 0
    assert "class Stamp(Plugin[StampConfig])" in (tmp_path / "stamp.py").read_text()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("My Plugin", "lower-case letters"),
        ("1st", "lower-case letters"),
        ("trailing-", "lower-case letters"),
        ("class", "Python keyword"),
        ("test-it", "the runner skips modules named test_*.py"),
    ],
)
def test_new_plugin_refuses_names_that_would_not_work(
    tmp_path: Path, name: str, reason: str
) -> None:
    result = CliRunner().invoke(main, ["new-plugin", name, "--plugins-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert reason in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["json", "jwt", "runner", "click"])
async def test_new_plugin_named_like_a_module_or_an_example_works_in_tests_and_in_the_runner(
    tmp_path: Path, sock_dir: Path, name: str
) -> None:
    # Such files used to shadow the module under pytest (or be shadowed by it).
    target = tmp_path / "my-plugins"
    assert invoke("new-plugin", name, "--plugins-dir", str(target)).exit_code == 0
    assert_generated_test_passes(target / "tests" / f"test_{name}.py")

    config = test_config(sock_dir, plugin_dirs=(target,), examples=None)
    async with serving(config) as server, await connect(config) as conn:
        assert server.dispatcher.registry.names() == [name]
        token = await conn.prepare_conf([(name, '{"value": "served"}')])
        reply = await conn.req_call(token)
        assert isinstance(reply.action, Rewrite)
        assert reply.action.headers == ((f"x-{name}", "served"),)


def test_plugins_json_lists_plugins_and_import_errors_as_data(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    result = CliRunner().invoke(main, ["plugins", "--json", "--plugins-dir", str(tmp_path)])
    assert result.exit_code == 1
    listing = json.loads(result.stdout)
    assert listing["plugins"] == [
        {
            "name": "good",
            "hooks": ["on_request"],
            "blocking": False,
            "summary": "Does good things.",
            "config": "{limit: int, label: str = 'x'}",
            "origin": str((tmp_path / "good.py").resolve()),
        }
    ]
    [error] = listing["import_errors"]
    assert error["origin"] == str((tmp_path / "broken.py").resolve())
    assert "No module named 'no_such_module_here'" in error["reason"]
