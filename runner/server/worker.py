"""One worker process of ``a6-runner run --workers N``: its life after the fork.

A worker serves the listening socket it inherited from the supervisor, with its own
plugins, conf cache and event loop, and the supervisor's shared conf store for tokens
it does not hold. It stops like a single runner (SIGTERM or SIGINT: stop accepting,
let calls in flight finish within the grace, close), and also when its supervisor is
gone: nobody would own the socket it serves any more.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import uvloop

from runner.core.config import Config
from runner.core.confstore import ConfStore
from runner.core.dispatch import Dispatcher
from runner.core.logs import setup_logging
from runner.core.metrics import Metrics, MetricsPublisher, snapshot_path
from runner.core.registry import PluginLoadError, PluginRegistry, load_registry
from runner.server.lifecycle import build_dispatcher, close_shared_state, load_tracing
from runner.server.listener import RunnerServer, StartupError
from runner.server.reload import Reloader
from runner.state import StateStore

log = logging.getLogger("a6.worker")


def worker_main(
    number: int,
    config: Config,
    registry: PluginRegistry,
    listener: socket.socket,
    store_dir: Path,
    state: StateStore,
    supervisor_pipe: int,
    metrics_dir: Path | None = None,
) -> int:
    """Run worker ``number`` until it is told to stop; its exit status.

    ``state`` is the supervisor's state store, opened before the fork: this worker
    connects to it on first use and closes its own handle when it stops (the supervisor
    closes last). ``supervisor_pipe`` is the read end of a pipe whose write end only the
    supervisor holds: it reads as end-of-file once the supervisor has exited, however
    it died.
    ``metrics_dir``: where the worker publishes its counts for the supervisor to sum.
    """
    setup_logging(config.log_level, f"worker {number} pid {os.getpid()}", config.log_format, number)
    if config.reload:
        # The registry inherited from the supervisor was loaded at its start: a worker
        # started later (a replacement) loads the plugin files as they are now.
        try:
            registry = load_registry(config)
        except PluginLoadError as exc:
            log.error("cannot start: %s", exc)
            return 2
    dispatcher: Dispatcher
    store = ConfStore(
        store_dir, config.conf_ttl, lambda key, conf: dispatcher.build_chain(key, conf)
    )
    publisher: MetricsPublisher | None = None
    metrics: Metrics | None = None
    if metrics_dir is not None:
        metrics = Metrics()
        publisher = MetricsPublisher(metrics, snapshot_path(metrics_dir, number, os.getpid()))
    try:
        tracer = load_tracing(config)  # here, after the fork: its exporter runs a thread
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    dispatcher = build_dispatcher(
        config, registry, state, shared=store, metrics=metrics, tracer=tracer
    )

    async def main() -> None:
        try:
            await serve_worker(config, dispatcher, listener, supervisor_pipe, publisher)
        finally:
            await close_shared_state(state)

    try:
        uvloop.run(main())
    finally:
        if dispatcher.executor is not None:
            dispatcher.executor.shutdown(wait=False, cancel_futures=True)
        if tracer is not None:
            tracer.flush()  # the caller leaves with os._exit: nothing flushes at exit
        sys.stderr.flush()
    # The caller leaves with os._exit: a plugin thread stuck in blocking code does not
    # hold the worker (as in a single runner), and nothing of the supervisor's runs here.
    return 0


async def serve_worker(
    config: Config,
    dispatcher: Dispatcher,
    listener: socket.socket,
    supervisor_pipe: int,
    publisher: MetricsPublisher | None = None,
) -> None:
    """Serve until SIGTERM, SIGINT or the supervisor's exit, then shut down gracefully."""
    metrics = publisher.metrics if publisher is not None else None
    server = RunnerServer(config, dispatcher, listener=listener, metrics=metrics)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def supervisor_gone() -> None:
        loop.remove_reader(supervisor_pipe)
        if not stop.is_set():
            log.warning("the supervisor is gone: stopping")
            stop.set()

    loop.add_reader(supervisor_pipe, supervisor_gone)
    watcher: asyncio.Task[None] | None = None
    if config.reload and config.plugin_dirs:
        reloader = Reloader(config.plugin_dirs, dispatcher, lambda: load_registry(config))
        watcher = loop.create_task(reloader.run())
    # The first snapshot also tells the supervisor (and /readyz) that this worker serves.
    publishing = loop.create_task(publisher.run(asyncio.sleep)) if publisher else None
    log.info("serving")
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        try:
            await server.stop()
        finally:
            if publishing is not None and publisher is not None:
                publishing.cancel()
                try:
                    publisher.publish()  # the calls finished during the grace count too
                except OSError as exc:
                    log.warning("cannot write the last metrics snapshot: %s", exc)
            loop.remove_reader(supervisor_pipe)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if watcher is not None:
                watcher.cancel()
    log.info("stopped")
