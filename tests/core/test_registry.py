"""Where plugins come from: directories, installed distributions, the examples; and how
their files are imported (a private namespace, never ``sys.path``)."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from runner.core.config import Config
from runner.core.errors import UnknownPlugin
from runner.core.registry import PluginLoadError, PluginRegistry, load_registry
from runner.plugin import Plugin
from runner.state import open_state
from runner.testing import load_plugin, prepare, run_request

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_NAMES = [
    "api-key",
    "jwt-auth",
    "rate-limit",
    "redact-body",
    "request-info",
    "response-rewrite",
    "rewrite",
    "say",
]


def plugin_source(name: str, body: str = "'hi'", imports: str = "") -> str:
    """A plugin named ``name`` whose request hook answers 200 with ``body`` (an
    expression evaluated in the hook)."""
    return imports + textwrap.dedent(f"""
        from runner.plugin import Plugin, Request

        class P(Plugin[None]):
            name = {name!r}

            def on_request(self, request: Request) -> None:
                request.stop(200, {body})
    """)


def write(directory: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def answer(cls: type[Plugin[None]] | None) -> bytes:
    assert cls is not None
    stop = run_request(prepare(cls, None)).stop
    return stop.body


def test_a_directory_s_modules_are_loaded_but_not_private_or_test_ones(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "greet.py": plugin_source("greet"),
            "_private.py": plugin_source("private"),
            "test_greet.py": plugin_source("from-a-test"),
            "notes.txt": "not code",
        },
    )
    registry = PluginRegistry()
    registry.load_dir(tmp_path)
    assert registry.names() == ["greet"]
    assert registry.origin("greet") == str((tmp_path / "greet.py").resolve())
    assert answer(registry.get("greet")) == b"hi"


def test_a_missing_directory_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError, match="does not exist"):
        load_registry(Config(plugin_dirs=(tmp_path / "nowhere",)))


def test_a_plugin_named_json_gets_the_stdlib_json_and_shadows_nothing(tmp_path: Path) -> None:
    path_before = list(sys.path)
    write(
        tmp_path,
        {
            "json.py": plugin_source(
                "json", body="json.dumps({'ok': True})", imports="import json"
            ),
            "typing.py": plugin_source("typing", body="repr(typing.Any)", imports="import typing"),
        },
    )
    registry = load_registry(Config(plugin_dirs=(tmp_path,)))
    assert registry.names() == ["json", "typing"]
    assert answer(registry.get("json")) == b'{"ok": true}'
    assert answer(registry.get("typing")) == b"typing.Any"
    # Nothing else sees the plugin files: the stdlib modules are the stdlib's.
    assert sys.path == path_before
    assert json.dumps([1]) == "[1]"
    assert Path(sys.modules["json"].__file__ or "").parent != tmp_path


def test_two_directories_may_both_hold_an_auth_py(tmp_path: Path) -> None:
    first = write(tmp_path / "team-a", {"auth.py": plugin_source("auth-a", body="'a'")})
    second = write(tmp_path / "team-b", {"auth.py": plugin_source("auth-b", body="'b'")})
    registry = load_registry(Config(plugin_dirs=(first, second)))
    assert registry.names() == ["auth-a", "auth-b"]
    assert answer(registry.get("auth-a")) == b"a"
    assert answer(registry.get("auth-b")) == b"b"


def test_helpers_beside_a_plugin_are_imported_relatively(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "helpers.py": "GREETING = 'hello'\n",
            "lib/__init__.py": "",
            "lib/words.py": "WORD = 'world'\n",
            "greet.py": plugin_source(
                "greet",
                body="f'{helpers.GREETING} {WORD}'",
                imports="from . import helpers\nfrom .lib.words import WORD\n",
            ),
        },
    )
    registry = load_registry(Config(plugin_dirs=(tmp_path,)))
    assert registry.names() == ["greet"]  # helpers.py defines no plugin
    assert answer(registry.get("greet")) == b"hello world"


def test_an_absolute_import_of_a_sibling_fails_as_it_would_in_the_runner(tmp_path: Path) -> None:
    # The directory is not on sys.path: `import helpers` is someone else's `helpers`.
    write(
        tmp_path,
        {
            "a6_sibling_helper.py": "X = 1\n",
            "greet.py": plugin_source("greet", imports="import a6_sibling_helper"),
        },
    )
    registry = load_registry(Config(plugin_dirs=(tmp_path,)))
    assert registry.names() == []
    [reason] = registry.import_errors.values()
    assert "No module named 'a6_sibling_helper'" in reason


def test_two_plugins_with_one_name_are_refused_naming_both_files(tmp_path: Path) -> None:
    first = write(tmp_path / "a", {"one.py": plugin_source("twin")})
    second = write(tmp_path / "b", {"two.py": plugin_source("twin")})
    with pytest.raises(PluginLoadError) as info:
        load_registry(Config(plugin_dirs=(first, second)))
    message = str(info.value)
    assert "two plugins are named 'twin'" in message
    assert str((first / "one.py").resolve()) in message
    assert str((second / "two.py").resolve()) in message


def test_a_module_that_fails_to_import_is_reported_and_the_others_serve(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "good.py": plugin_source("good"),
            "broken.py": "raise RuntimeError('no database')\n",
            "typo.py": "def broken(:\n",
        },
    )
    registry = load_registry(Config(plugin_dirs=(tmp_path,)))
    assert registry.names() == ["good"]
    errors = {Path(origin).name: reason for origin, reason in registry.import_errors.items()}
    assert sorted(errors) == ["broken.py", "typo.py"]
    assert errors["broken.py"].startswith("RuntimeError: no database (")
    assert errors["typo.py"].startswith("SyntaxError:")
    # A route asking for a plugin that is missing hears why.
    with pytest.raises(UnknownPlugin, match="RuntimeError: no database"):
        registry.create("broken", "", open_state("memory://"), "route")


def test_each_registry_imports_the_files_afresh(tmp_path: Path) -> None:
    write(tmp_path, {"counter.py": plugin_source("counter", body="str(COUNT)") + "COUNT = 0\n"})
    first = load_registry(Config(plugin_dirs=(tmp_path,)))
    (tmp_path / "counter.py").write_text(plugin_source("counter", body="'v2'"))
    second = load_registry(Config(plugin_dirs=(tmp_path,)))
    assert answer(first.get("counter")) == b"0"
    assert answer(second.get("counter")) == b"v2"


# ----------------------------------------------------------------- entry points


def install_distribution(site: Path, name: str, entry_points: str, files: dict[str, str]) -> None:
    """What `pip install` leaves behind, as importlib.metadata reads it."""
    dist_info = site / f"{name}-1.0.dist-info"
    write(
        site,
        {
            f"{dist_info.name}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
            f"{dist_info.name}/entry_points.txt": f"[a6_runner.plugins]\n{entry_points}\n",
            **files,
        },
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "site-packages"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    return directory


def test_entry_points_name_a_module_or_a_plugin_class(site: Path) -> None:
    install_distribution(
        site,
        "a6-ep-shop",
        "cart = a6_ep_shop.cart\ncheckout = a6_ep_shop.pay:Checkout",
        {
            "a6_ep_shop/__init__.py": "",
            "a6_ep_shop/cart.py": plugin_source("cart", body="'cart'"),
            "a6_ep_shop/pay.py": plugin_source("checkout", body="'pay'").replace(
                "class P(", "class Checkout("
            ),
        },
    )
    registry = load_registry(Config())
    assert registry.names() == ["cart", "checkout"]  # and no examples: auto is off
    assert answer(registry.get("cart")) == b"cart"
    assert answer(registry.get("checkout")) == b"pay"
    assert (
        registry.origin("checkout")
        == "entry point checkout = a6_ep_shop.pay:Checkout in a6-ep-shop"
    )


def test_broken_entry_points_are_reported_like_modules(site: Path) -> None:
    install_distribution(
        site,
        "a6-ep-broken",
        "missing = a6_ep_nowhere\nnot-a-plugin = a6_ep_broken:VALUE",
        {"a6_ep_broken.py": "VALUE = 42\n"},
    )
    registry = load_registry(Config(examples=False))
    assert registry.names() == []
    errors = registry.import_errors
    assert (
        "No module named 'a6_ep_nowhere'"
        in errors["entry point missing = a6_ep_nowhere in a6-ep-broken"]
    )
    assert errors["entry point not-a-plugin = a6_ep_broken:VALUE in a6-ep-broken"] == (
        "names neither a module nor a Plugin subclass"
    )


def test_an_entry_point_plugin_and_a_directory_plugin_with_one_name_are_refused(
    site: Path, tmp_path: Path
) -> None:
    install_distribution(
        site, "a6-ep-dup", "auth = a6_ep_dup", {"a6_ep_dup.py": plugin_source("auth")}
    )
    directory = write(tmp_path / "mine", {"auth.py": plugin_source("auth")})
    with pytest.raises(PluginLoadError) as info:
        load_registry(Config(plugin_dirs=(directory,)))
    assert "two plugins are named 'auth'" in str(info.value)
    assert "entry point auth = a6_ep_dup in a6-ep-dup" in str(info.value)
    assert str((directory / "auth.py").resolve()) in str(info.value)


# --------------------------------------------------------------------- examples


def test_the_examples_serve_when_nothing_else_is_configured() -> None:
    assert load_registry(Config()).names() == EXAMPLE_NAMES


def test_a_plugin_directory_turns_the_examples_off_unless_asked(tmp_path: Path) -> None:
    write(tmp_path, {"mine.py": plugin_source("mine")})
    assert load_registry(Config(plugin_dirs=(tmp_path,))).names() == ["mine"]
    both = load_registry(Config(plugin_dirs=(tmp_path,), examples=True)).names()
    assert both == sorted([*EXAMPLE_NAMES, "mine"])
    assert load_registry(Config(examples=False)).names() == []


def test_an_own_plugin_named_say_is_served_not_the_example(tmp_path: Path) -> None:
    write(tmp_path, {"say.py": plugin_source("say", body="'my own say'")})
    for examples in (None, True):
        registry = load_registry(Config(plugin_dirs=(tmp_path,), examples=examples))
        assert registry.origin("say") == str((tmp_path / "say.py").resolve())
        assert answer(registry.get("say")) == b"my own say"


def test_the_examples_ship_in_the_distribution() -> None:
    # Every package on disk is listed (a new one left out would be missing from the
    # wheel), and plugins/ is installed as runner/examples, not as a package `plugins`.
    # ext_plugin_proto (the generated reference codec) stays in the repository for the
    # tests and is not installed.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "runner").rglob("__init__.py")
    }
    assert set(config["packages"]) == on_disk | {"runner.examples"}
    assert config["package-dir"] == {"runner.examples": "plugins"}


# ---------------------------------------------------------- runner.testing


def test_load_plugin_imports_a_file_as_the_runner_does(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "helpers.py": "WORD = 'relative'\n",
            "json.py": plugin_source(
                "json", body="json.dumps(WORD)", imports="import json\nfrom .helpers import WORD\n"
            ),
        },
    )
    cls = load_plugin(tmp_path / "json.py")
    assert cls.name == "json"
    assert answer(cls) == b'"relative"'
    assert load_plugin(tmp_path / "json.py", "json") is not cls  # each call imports afresh


def test_load_plugin_raises_the_import_error_and_refuses_ambiguity(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "broken.py": "raise RuntimeError('no database')\n",
            "two.py": plugin_source("one") + plugin_source("two").replace("class P(", "class Q("),
        },
    )
    with pytest.raises(RuntimeError, match="no database"):
        load_plugin(tmp_path / "broken.py")
    with pytest.raises(LookupError, match="give name="):
        load_plugin(tmp_path / "two.py")
    assert load_plugin(tmp_path / "two.py", name="two").name == "two"
    with pytest.raises(LookupError, match="no plugin named 'three'"):
        load_plugin(tmp_path / "two.py", name="three")
