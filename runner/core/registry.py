"""The plugin registry: finds Plugin subclasses in packages and directories, by name."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import pkgutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from runner.core.chain import create_plugin
from runner.core.errors import UnknownPlugin
from runner.plugin import Plugin

log = logging.getLogger("a6.registry")


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


class PluginRegistry:
    """Plugin classes by name, with where each came from and what failed to import."""

    def __init__(self) -> None:
        self._plugins: dict[str, type[Plugin[Any]]] = {}
        self._origins: dict[str, str] = {}
        # module origin (file path) -> one-line reason; kept so PrepareConf can say why
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

    def load_package(self, package: str) -> None:
        """Import every module of an installed package (e.g. the bundled ``plugins``)."""
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1].startswith("_"):
                continue
            module = self._import(info.name, lambda n=info.name: importlib.import_module(n))
            if module is not None:
                self._add_module(module)

    def load_dir(self, directory: Path) -> None:
        """Import every ``*.py`` file of a directory (not ``_``-prefixed, not tests)."""
        directory = directory.resolve()
        if not directory.is_dir():
            raise PluginLoadError(f"plugin directory {directory} does not exist")
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith(("_", "test_")):
                continue
            module = self._import(str(path), lambda p=path: import_file(p))
            if module is not None:
                self._add_module(module)

    def _import(self, origin: str, do_import: Any) -> ModuleType | None:
        try:
            module: ModuleType = do_import()
        except Exception as exc:
            if isinstance(exc, SyntaxError):  # its own message says where
                reason = f"{type(exc).__name__}: {exc}"
            else:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                reason = f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})"
            self.import_errors[origin] = reason
            log.error("plugin module %s failed to import: %s", origin, reason)
            return None
        self.import_errors.pop(origin, None)
        return module

    def _add_module(self, module: ModuleType) -> None:
        origin = getattr(module, "__file__", None) or module.__name__
        for cls in plugins_in(module):
            self.add(cls, origin)

    def get(self, name: str) -> type[Plugin[Any]] | None:
        return self._plugins.get(name)

    def create(self, name: str, raw_config: str) -> Plugin[Any]:
        """A plugin instance for one route: its config checked, or an error naming why."""
        cls = self._plugins.get(name)
        if cls is None:
            error = UnknownPlugin(name, sorted(self._plugins))
            if self.import_errors:
                failed = "; ".join(f"{k}: {v}" for k, v in self.import_errors.items())
                error.args = (f"{error.args[0]}; modules that failed to import: {failed}",)
            raise error
        return create_plugin(cls, raw_config)

    def origin(self, name: str) -> str:
        return self._origins[name]

    def names(self) -> list[str]:
        return sorted(self._plugins)

    def __iter__(self) -> Iterator[type[Plugin[Any]]]:
        return iter(self._plugins[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._plugins)


class _SourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles a plugin file from its source every time, without a bytecode cache.

    The cache is keyed by the source's size and whole-second mtime: after a quick edit
    that keeps the size, a hot reload would run the previous version.
    """

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


def import_file(path: Path) -> ModuleType:
    """Import a plugin file under a module name of its own, so two directories may both
    hold an ``auth.py``. The file's directory is importable for its helper modules."""
    name = "a6_plugin_" + "_".join(path.with_suffix("").parts[-2:]).replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path, loader=_SourceLoader(name, str(path)))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    parent = str(path.parent)
    if parent not in sys.path:
        sys.path.append(parent)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
