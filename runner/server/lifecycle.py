"""The runner's life: assemble it from a Config (registry, cache, dispatcher, server),
serve until a signal, shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvloop

from runner.core.cache import ConfCache
from runner.core.chain import Chain
from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.registry import PluginLoadError, PluginRegistry
from runner.server.listener import RunnerServer, StartupError, raise_open_file_limit
from runner.server.reload import Reloader

log = logging.getLogger("a6.app")

BUILTIN_PACKAGE = "plugins"
BLOCKING_THREADS = "a6-blocking"


def load_registry(config: Config) -> PluginRegistry:
    registry = PluginRegistry()
    if config.builtin_plugins:
        registry.load_package(BUILTIN_PACKAGE)
    for directory in config.plugin_dirs:
        registry.load_dir(directory)
    return registry


def build_dispatcher(config: Config, registry: PluginRegistry) -> Dispatcher:
    cache: ConfCache[Chain] = ConfCache(ttl=config.conf_ttl, maxsize=config.max_confs)
    executor = ThreadPoolExecutor(config.blocking_workers, thread_name_prefix=BLOCKING_THREADS)
    return Dispatcher(
        registry,
        cache,
        max_frame_size=config.max_frame_size,
        executor=executor,
    )


async def serve(config: Config, dispatcher: Dispatcher, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RunnerServer(config, dispatcher)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "listening on unix:%s (pid %d; plugins: %s)",
        config.socket_path,
        os.getpid(),
        ", ".join(dispatcher.registry.names()) or "none",
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        # Handlers stay during the grace period: a second SIGTERM must not kill the
        # process half-way through its cleanup (and leave the socket file behind).
        try:
            await server.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped")


async def serve_reloading(config: Config, dispatcher: Dispatcher) -> None:
    """``serve``, with plugin directories watched for changes (``--reload``)."""
    reloader = Reloader(config.plugin_dirs, dispatcher, lambda: load_registry(config))
    if not config.plugin_dirs:
        log.warning("--reload: no plugin directory to watch (give --plugins-dir)")
    else:
        log.info("reload: watching %s", ", ".join(str(d) for d in reloader.directories))
    watcher = asyncio.get_running_loop().create_task(reloader.run())
    try:
        await serve(config, dispatcher)
    finally:
        watcher.cancel()


def run(config: Config) -> int:
    """Run the runner until a signal; returns the process exit status."""
    if config.reload:
        # Bytecode caches are keyed by whole-second mtimes: a quick edit could reload stale code.
        sys.dont_write_bytecode = True
    try:
        config.check()
        registry = load_registry(config)
    except (ValueError, PluginLoadError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    # Every gateway worker keeps up to 32 connections: make sure we can accept them all.
    raise_open_file_limit(config.max_connections + 64)
    dispatcher = build_dispatcher(config, registry)
    try:
        main = serve_reloading if config.reload else serve
        uvloop.run(main(config, dispatcher))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        if dispatcher.executor is not None:
            dispatcher.executor.shutdown(wait=False, cancel_futures=True)
        sys.stderr.flush()
    workers = [t for t in threading.enumerate() if t.name.startswith(BLOCKING_THREADS)]
    deadline = time.monotonic() + 0.2  # idle workers take a moment to see the shutdown
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in workers if t.is_alive()]
    if stuck:
        # Interpreter exit would join these threads and wait for a hung plugin forever;
        # the gateway would then SIGKILL us mid-cleanup. Leave now, cleanly otherwise.
        log.warning("exiting with %d blocking plugin call(s) still running", len(stuck))
        logging.shutdown()
        os._exit(0)
    return 0
