"""The plugin registry: Plugin subclasses by name, from plugin directories, installed
distributions (entry points) and the bundled examples.

Plugin files are imported under a private package per directory and per registry
(``_a6_plugins_<generation>_<n>``), never through ``sys.path``: a plugin file named
``json.py`` neither shadows nor is shadowed by an installed module, two directories
may both hold an ``auth.py``, and a new registry (a reload) imports fresh copies of
every file without touching the modules the previous one still serves with. A
plugin's helper modules beside it are imported relatively (``from . import helpers``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import itertools
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from runner.core.chain import create_plugin
from runner.core.config import Config
from runner.core.errors import UnknownPlugin
from runner.plugin import Plugin
from runner.state import StateStore

log = logging.getLogger("a6.registry")

ENTRY_POINT_GROUP = "a6_runner.plugins"
# Where the example plugins (plugins/ in the source tree) are installed.
EXAMPLES_PACKAGE = "runner.examples"
NAMESPACE = "_a6_plugins"

# Only makes module names unique within the process: a name must never be reused, or
# an import would find the previous generation's module in sys.modules.
_generations = itertools.count(1)


class PluginLoadError(Exception):
    """Plugins cannot be loaded as configured; the runner must not start."""


def plugins_in(module: ModuleType) -> list[type[Plugin[Any]]]:
    """The plugin classes a module defines (not the ones it imports)."""
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Plugin)
        and obj is not Plugin
        and obj.__module__ == module.__name__
        and isinstance(getattr(obj, "name", None), str)
    ]


def examples_dir() -> Path:
    """The directory of the example plugins, in a wheel as in an editable install."""
    # find_spec locates the package without importing it: the examples are loaded as a
    # plugin directory, like any other, never as the package `runner.examples`.
    spec = importlib.util.find_spec(EXAMPLES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PluginLoadError(
            f"the example plugins ({EXAMPLES_PACKAGE}) are not installed: reinstall "
            "a6-runner (in a checkout: pip install -e . again)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


class PluginImporter:
    """Imports plugin files, each directory as a private package of this generation.

    Every importer is a new generation: importing a file that an earlier importer
    imported runs it again, as a new module; the earlier module is left as it was.
    """

    def __init__(self) -> None:
        _PluginFinder.install()
        self._generation = next(_generations)
        self._packages: dict[Path, str] = {}

    def import_file(self, path: Path) -> ModuleType:
        """Import a ``.py`` file; raises what its top-level code raises."""
        path = path.resolve()
        if path.suffix != ".py" or "." in path.stem:
            raise ImportError(f"{path} is not a Python module file")
        return importlib.import_module(f"{self.package_for(path.parent)}.{path.stem}")

    def package_for(self, directory: Path) -> str:
        """The private package whose modules are ``directory``'s files."""
        directory = directory.resolve()
        name = self._packages.get(directory)
        if name is None:
            name = f"{NAMESPACE}_{self._generation}_{len(self._packages)}"
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(directory)]
            # The import system finds submodules through the parent in sys.modules; the
            # package has no code of its own (an __init__.py there is not run).
            sys.modules[name] = importlib.util.module_from_spec(spec)
            self._packages[directory] = name
        return name


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles a plugin module from its source every time, and writes no bytecode.

    Bytecode caches are keyed by the source's size and whole-second mtime: after a
    quick edit that keeps the size, a reload would run the previous version.
    """

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


_LOADERS: list[tuple[Any, list[str]]] = [
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (_SourceLoader, importlib.machinery.SOURCE_SUFFIXES),
]


class _PluginFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of the private plugin packages (plugins and their helpers),
    in the package's directory only, with ``_SourceLoader``. Other names: not ours."""

    @classmethod
    def install(cls) -> None:
        # Once per process, and first: the path finder would otherwise load our modules
        # (with bytecode caches). Names outside the private namespace get None at once,
        # so no other import is affected.
        if not any(isinstance(finder, cls) for finder in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if path is None or not fullname.startswith(NAMESPACE + "_"):
            return None
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *_LOADERS).find_spec(fullname)
            if spec is not None and spec.loader is not None:
                return spec
        return None


class PluginRegistry:
    """Plugin classes by name, with where each came from and what failed to import.

    Each registry imports its plugin files afresh (see ``PluginImporter``).
    """

    def __init__(self) -> None:
        self._importer = PluginImporter()
        self._plugins: dict[str, type[Plugin[Any]]] = {}
        self._origins: dict[str, str] = {}
        # origin (file path, entry point) -> one-line reason; kept so PrepareConf can say why
        self.import_errors: dict[str, str] = {}

    def add(self, cls: type[Plugin[Any]], origin: str) -> None:
        name = cls.name
        if not name:
            raise PluginLoadError(f"plugin class {cls.__qualname__} in {origin} has an empty name")
        if name in self._plugins and self._origins[name] != origin:
            raise PluginLoadError(
                f"two plugins are named {name!r}: in {self._origins[name]} and in {origin}"
            )
        self._plugins[name] = cls
        self._origins[name] = origin

    def load_dir(self, directory: Path) -> None:
        """Import every ``*.py`` file of a directory (not ``_``-prefixed, not tests)."""
        for path in self._plugin_files(directory):
            module = self._import(str(path), partial(self._importer.import_file, path))
            if module is not None:
                for cls in plugins_in(module):
                    self.add(cls, str(path))

    def load_examples(self) -> None:
        """Import the example plugins; an example whose name a plugin already has is
        left out (an operator's own ``say`` wins over the example)."""
        for path in self._plugin_files(examples_dir()):
            module = self._import(str(path), partial(self._importer.import_file, path))
            for cls in plugins_in(module) if module is not None else ():
                if cls.name in self._plugins:
                    log.info(
                        "example plugin %r left out: %s has one", cls.name, self.origin(cls.name)
                    )
                else:
                    self.add(cls, str(path))

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> int:
        """Import the plugins installed distributions declare in the entry-point group:
        each entry point names a module (its plugin classes are loaded) or a Plugin
        subclass. Returns how many entry points there are."""
        found = importlib.metadata.entry_points(group=group)
        for ep in found:
            dist = f" in {ep.dist.name}" if ep.dist is not None else ""
            origin = f"entry point {ep.name} = {ep.value}{dist}"
            loaded = self._import(origin, ep.load)
            if loaded is None:
                continue
            if isinstance(loaded, ModuleType):
                classes = plugins_in(loaded)
            elif isinstance(loaded, type) and issubclass(loaded, Plugin):
                classes = [loaded]
            else:
                self.import_errors[origin] = "names neither a module nor a Plugin subclass"
                continue
            for cls in classes:
                self.add(cls, origin)
        return len(found)

    @staticmethod
    def _plugin_files(directory: Path) -> list[Path]:
        directory = directory.resolve()
        if not directory.is_dir():
            raise PluginLoadError(f"plugin directory {directory} does not exist")
        return [
            path
            for path in sorted(directory.glob("*.py"))
            if not path.name.startswith(("_", "test_"))
        ]

    def _import(self, origin: str, do_import: Callable[[], Any]) -> Any:
        """What ``do_import`` returns, or None with the reason kept in import_errors."""
        try:
            loaded = do_import()
        except Exception as exc:
            if isinstance(exc, SyntaxError):  # its own message says where
                reason = f"{type(exc).__name__}: {exc}"
            else:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                reason = f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
            self.import_errors[origin] = reason
            return None
        self.import_errors.pop(origin, None)
        return loaded

    def get(self, name: str) -> type[Plugin[Any]] | None:
        return self._plugins.get(name)

    def create(self, name: str, raw_config: str, state: StateStore, route: str) -> Plugin[Any]:
        """A plugin instance for one route: its config checked, or an error naming why;
        ``state`` and ``route`` as for ``create_plugin``."""
        cls = self._plugins.get(name)
        if cls is None:
            error = UnknownPlugin(name, sorted(self._plugins))
            if self.import_errors:
                failed = "; ".join(f"{k}: {v}" for k, v in self.import_errors.items())
                error.args = (f"{error.args[0]}; modules that failed to import: {failed}",)
            raise error
        return create_plugin(cls, raw_config, state, route)

    def origin(self, name: str) -> str:
        return self._origins[name]

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[type[Plugin[Any]]]:
        return iter(self._plugins[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._plugins)


def load_registry(config: Config) -> PluginRegistry:
    """The plugins ``config`` asks for: its directories, the installed entry points,
    and the examples if ``config.examples`` says so (None: only if there is neither a
    plugin directory nor an entry point, as in the standalone demo).

    Raises PluginLoadError if a directory is missing or two plugins share a name;
    modules that fail to import are in the registry's ``import_errors``.
    """
    registry = PluginRegistry()
    for directory in config.plugin_dirs:
        registry.load_dir(directory)
    entry_points = registry.load_entry_points()
    examples = config.examples
    if examples is None:
        examples = not config.plugin_dirs and not entry_points
    if examples:
        registry.load_examples()
    return registry
