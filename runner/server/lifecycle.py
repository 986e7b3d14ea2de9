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
from typing import TYPE_CHECKING

import uvloop

from runner import __version__
from runner.core.cache import ConfCache, SharedConfs
from runner.core.chain import Chain
from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.metrics import Metrics
from runner.core.registry import PluginLoadError, PluginRegistry, load_registry
from runner.server.listener import RunnerServer, StartupError, raise_open_file_limit
from runner.server.reload import Reloader
from runner.state import StateStore, open_state

if TYPE_CHECKING:
    from runner.core.tracing import CallTracer
    from runner.server.status import Health, StatusServer

log = logging.getLogger("a6.app")

BLOCKING_THREADS = "a6-blocking"


def build_dispatcher(
    config: Config,
    registry: PluginRegistry,
    state: StateStore | None = None,
    shared: SharedConfs[Chain] | None = None,
    metrics: Metrics | None = None,
    tracer: CallTracer | None = None,
) -> Dispatcher:
    """``state``: the store plugins keep their state in (default: one in this process's
    memory, for tests); ``shared``: the conf store of a worker process (``--workers``);
    ``metrics``: the process's counters (``--metrics-listen``); ``tracer``: its spans
    (``--tracing``)."""
    cache: ConfCache[Chain] = ConfCache(
        ttl=config.conf_ttl, maxsize=config.max_confs, shared=shared, metrics=metrics
    )
    executor = ThreadPoolExecutor(config.blocking_workers, thread_name_prefix=BLOCKING_THREADS)
    return Dispatcher(
        registry,
        cache,
        max_frame_size=config.max_frame_size,
        executor=executor,
        metrics=metrics,
        tracer=tracer,
        state=state,
    )


async def serve(
    config: Config,
    dispatcher: Dispatcher,
    ready: asyncio.Event | None = None,
    reloader: Reloader | None = None,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the plugins.

    ``health`` is told when the runner serves and when it stops (``/readyz``)."""
    server = RunnerServer(config, dispatcher, metrics=metrics)
    try:
        await server.start()
    except OSError as exc:
        # The socket functions turn the failures they expect into StartupError; any
        # other one still deserves one line rather than a traceback.
        raise StartupError(f"cannot listen on {config.socket_path}: {exc.strerror or exc}") from exc
    if reloader is None:
        reloader = Reloader(config.plugin_dirs, dispatcher, lambda: load_registry(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # As gunicorn does: new plugin code without dropping the socket. SIGHUP's default
    # action would kill the runner silently and leave its socket file behind. A failed
    # reload keeps the old plugins serving; the reloader logs one line either way.
    loop.add_signal_handler(signal.SIGHUP, reload_on_signal, reloader)
    log.info(
        "a6-runner %s listening on unix:%s (pid %d; state %s; plugins: %s)",
        __version__,
        config.socket_path,
        os.getpid(),
        dispatcher.state.location,
        ", ".join(dispatcher.registry.names()) or "none",
    )
    if ready is not None:
        ready.set()
    if health is not None:
        health.ready()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        if health is not None:
            health.not_ready("shutting down")
        # Handlers stay during the grace period: a second SIGTERM must not kill the
        # process half-way through its cleanup (and leave the socket file behind).
        try:
            await server.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    log.info("stopped")


def load_tracing(config: Config) -> CallTracer | None:
    """The process's tracer with ``--tracing`` (None without); StartupError if the otel
    extra is missing. Call it in the process that serves calls (after a fork)."""
    if not check_tracing(config):
        return None
    from runner.core.tracing import load_tracer

    return load_tracer()


def check_tracing(config: Config) -> bool:
    """True if ``--tracing`` is on and can work; StartupError if the extra is missing."""
    if not config.tracing:
        return False
    try:
        import runner.core.tracing  # noqa: F401
    except ImportError as exc:
        raise StartupError(
            f"tracing: OpenTelemetry is not installed ({exc.name or exc}); "
            "install it with: pip install 'a6-runner[otel]'"
        ) from None
    return True


def start_status(config: Config, metrics: Metrics) -> tuple[Health, StatusServer]:
    """The single runner's metrics and health endpoint, served from a thread."""
    from runner.server.status import Health, RunnerCollector, StatusServer, render

    address = config.status_address
    assert address is not None
    health = Health()
    collector = RunnerCollector(lambda: [(0, metrics.snapshot())])
    status = StatusServer(address, lambda: render(collector), lambda: health.reasons)
    status.start_thread()
    log.info("metrics and health on %s (/metrics, /healthz, /readyz)", status.bound)
    return health, status


def open_shared_state(config: Config) -> StateStore:
    """The runner's one state store (``--state-url``), opened before any worker is forked:
    a ``local://`` store is then one file for all of them. Connects to nothing; a
    store that cannot be made (a ``local:///path`` in a directory we cannot write)
    raises StartupError."""
    try:
        store = open_state(config.state_url)
    except ValueError as exc:
        raise StartupError(f"cannot open the state store: {exc}") from None
    log.debug("state store: %s", store.location)
    return store


async def close_shared_state(store: StateStore) -> None:
    """Release this process's handle on the store; a failure is logged, never raised:
    it must not turn a clean shutdown into a failed one."""
    try:
        await store.close()
    except Exception as exc:
        log.warning("closing the state store %s: %s", store.url, exc)


def reload_on_signal(reloader: Reloader) -> None:
    try:
        reloader.reload()
    except Exception:
        # A reload request must never end the runner: the previous plugins keep serving.
        log.exception("reload on SIGHUP failed; the previous plugins keep serving")


async def serve_reloading(
    config: Config,
    dispatcher: Dispatcher,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> None:
    """``serve``, with plugin directories watched for changes (``--reload``)."""
    reloader = Reloader(config.plugin_dirs, dispatcher, lambda: load_registry(config))
    if not config.plugin_dirs:
        log.warning("--reload: no plugin directory to watch (give --plugins-dir)")
    else:
        log.info("reload: watching %s", ", ".join(str(d) for d in reloader.directories))
    watcher = asyncio.get_running_loop().create_task(reloader.run())
    try:
        await serve(config, dispatcher, reloader=reloader, health=health, metrics=metrics)
    finally:
        watcher.cancel()


def run(config: Config) -> int:
    """Run the runner until a signal; returns the process exit status."""
    # Until serve() installs its handler, a SIGHUP (a reload request) must not kill the
    # starting runner the way its default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config.check()
        registry = load_registry(config)
    except (ValueError, PluginLoadError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    for origin, reason in registry.import_errors.items():
        # The runner serves the rest; PrepareConf for the missing plugin says why too.
        log.error("plugin module %s failed to import: %s", origin, reason)
    # Every gateway worker keeps up to 32 connections: make sure we can accept them all.
    raise_open_file_limit(config.max_connections + 64)
    if config.workers > 1:
        from runner.server.supervisor import supervise  # forks: only with --workers

        try:
            # Each worker makes its own tracer; a missing extra stops the start here.
            check_tracing(config)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 2
        return supervise(config, registry)
    try:
        tracer = load_tracing(config)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        state = open_shared_state(config)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    metrics: Metrics | None = None
    health: Health | None = None
    status: StatusServer | None = None
    if config.metrics_listen is not None:
        metrics = Metrics()
        try:
            health, status = start_status(config, metrics)
        except StartupError as exc:
            log.error("cannot start: %s", exc)
            return 1
    dispatcher = build_dispatcher(config, registry, state, metrics=metrics, tracer=tracer)

    async def main() -> None:
        try:
            if config.reload:
                await serve_reloading(config, dispatcher, health, metrics)
            else:
                await serve(config, dispatcher, health=health, metrics=metrics)
        finally:
            # On the loop that used it: a Redis client closes its connections there.
            await close_shared_state(state)

    try:
        uvloop.run(main())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        if status is not None:
            status.close()
        if tracer is not None:
            tracer.flush()
        if dispatcher.executor is not None:
            dispatcher.executor.shutdown(wait=False, cancel_futures=True)
        sys.stderr.flush()
    workers = [t for t in threading.enumerate() if t.name.startswith(BLOCKING_THREADS)]
    deadline = time.monotonic() + 0.2  # idle workers take a moment to see the shutdown
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    stuck = [t for t in workers if t.is_alive()]
    if tracer is not None and any(
        t.is_alive() and not t.daemon and t is not threading.main_thread()
        for t in threading.enumerate()
    ):
        # The span exporter's thread, still retrying an unreachable collector:
        # interpreter exit would wait for it, past the gateway's SIGKILL.
        logging.shutdown()
        os._exit(0)
    if stuck:
        # Interpreter exit would join these threads and wait for a hung plugin forever;
        # the gateway would then SIGKILL us mid-cleanup. Leave now, cleanly otherwise.
        log.warning("exiting with %d blocking plugin call(s) still running", len(stuck))
        logging.shutdown()
        os._exit(0)
    return 0
