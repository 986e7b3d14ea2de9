"""Hot reload (``a6-runner run --reload``): new plugin code without a restart.

The reloader polls the modification times of the Python files in the plugin
directories. On a change it imports every module of those directories afresh into a
new registry and, if that worked, swaps the new registry into the dispatcher and
retires every prepared conf: the gateway's next call with an old token gets
CONF_TOKEN_NOT_FOUND, so the gateway prepares the route again, with the new code.
Calls in flight finish with the plugins they started with.

If any module fails to import (or two plugins end up with one name), the previous
plugins keep serving, untouched, and one line says why; the next change tries again.

Every registry imports the plugin files under a private namespace of its own (see
``runner.core.registry``), so a reload imports new versions beside the old ones and
leaves the old ones as they were: calls in flight finish with them, and after a
failed reload they serve on.

Meant for development: each reload re-runs every plugin module's top-level code,
drops what plugin instances keep in their attributes (state kept through
``Plugin.state`` lives on in the state store) and keeps the previous
versions' modules in memory. ``reload_plugins`` also serves a reload on request
(SIGHUP), without watching.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from runner.core.dispatch import Dispatcher
from runner.core.registry import PluginLoadError, PluginRegistry

log = logging.getLogger("a6.reload")

Snapshot = dict[str, tuple[int, int]]

DEFAULT_INTERVAL = 1.0


class Reloader:
    """Watches ``directories`` and swaps a freshly loaded registry into ``dispatcher``.

    ``load`` builds a complete registry (directories, entry points, examples) the same way
    the runner did at start-up.
    """

    def __init__(
        self,
        directories: Iterable[Path],
        dispatcher: Dispatcher,
        load: Callable[[], PluginRegistry],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.directories = tuple(Path(d).resolve() for d in directories)
        self.dispatcher = dispatcher
        self.interval = interval
        self._load = load
        self._seen = self.scan()

    def scan(self) -> Snapshot:
        """``path -> (mtime_ns, size)`` of every watched source file."""
        snapshot: Snapshot = {}
        for path in _source_files(self.directories):
            try:
                st = path.stat()
            except OSError:
                continue  # deleted while we looked: the next scan sees it gone
            snapshot[str(path)] = (st.st_mtime_ns, st.st_size)
        return snapshot

    def check_once(self) -> bool:
        """Reload if a watched file changed since the last check; True if new plugins
        now serve."""
        current = self.scan()
        if current == self._seen:
            return False
        changed = sorted(
            p for p in current.keys() | self._seen.keys() if current.get(p) != self._seen.get(p)
        )
        self._seen = current
        return self.reload(changed)

    def reload(self, changed: Iterable[str] = ()) -> bool:
        """Import the plugins again; swap the result in only if all is well."""
        names = ", ".join(Path(p).name for p in changed)
        why = f"a change to {names}" if names else "a request"
        return reload_plugins(self.dispatcher, self._load, why)

    def reload_now(self) -> bool:
        """Import the plugins again now, changed or not (e.g. on SIGHUP); a change seen
        by this reload is not reloaded a second time by the next check."""
        self._seen = self.scan()
        return self.reload()

    async def run(self) -> None:
        """Check every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check_once()
            except Exception:
                # A reloader that dies stops reloading silently: say why and go on.
                log.exception("reload check failed")


def reload_plugins(
    dispatcher: Dispatcher, load: Callable[[], PluginRegistry], why: str = "a request"
) -> bool:
    """Build a new registry with ``load`` and, if every module imported, swap it into
    the dispatcher (retiring the prepared confs). Otherwise the previous plugins keep
    serving. One log line either way; True if the new plugins now serve."""
    try:
        registry = load()
        failures = [f"{where}: {reason}" for where, reason in registry.import_errors.items()]
    except (PluginLoadError, ImportError) as exc:
        failures = [str(exc)]
    if failures:
        log.error(
            "reload after %s failed, the previous plugins keep serving: %s",
            why,
            "; ".join(failures),
        )
        return False
    dispatcher.replace_registry(registry)
    log.info(
        "reloaded plugins after %s (prepared confs retired): %s",
        why,
        ", ".join(registry.names()) or "none",
    )
    return True


def _source_files(directories: Iterable[Path]) -> Iterator[Path]:
    """The ``.py`` files of each directory and of its packages (subdirectories with an
    ``__init__.py``); other subdirectories, such as a virtualenv, are not walked."""
    for top in directories:
        for root, dirs, files in os.walk(top):
            if Path(root) != top and "__init__.py" not in files:
                dirs.clear()
                continue
            dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
            for name in files:
                if name.endswith(".py") and not name.startswith("test_"):
                    yield Path(root, name)
