"""Cost per state operation on each backend: memory, local (SQLite on tmpfs), Redis.

One process, one task, on uvloop: each operation awaited in turn, so the numbers are the
latency a plugin pays per call, not a throughput under load. Redis is a redis-server this
script starts on a Unix socket in a temporary directory (skipped if it is not installed).
Prints the median over ``--repeats`` runs of ``--ops`` calls, in microseconds per call:

    .venv/bin/python benchmarks/state.py [--ops 2000] [--repeats 7] [--processes 4]

With ``--processes N`` it also forks N workers that ``take`` from one bucket of the local
backend at once (a store opened before the fork, as the runner's supervisor opens it) and
prints the calls a second they manage together and their latency percentiles: what the
lock costs when it is contended.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from runner.state import State, open_state

OPERATIONS: dict[str, Callable[[State, int], Awaitable[object]]] = {
    "incr": lambda state, i: state.incr("counter"),
    "incr+ttl": lambda state, i: state.incr("window", ttl=60),
    "get": lambda state, i: state.get("counter"),
    "set+ttl": lambda state, i: state.set("value", b"x" * 64, ttl=60),
    # Many clients, as a rate limiter sees them; a burst large enough that all pass.
    "take": lambda state, i: state.take(f"client-{i % 100}", rate=1e6, burst=1_000_000),
}


def start_redis(directory: Path) -> subprocess.Popen[bytes] | None:
    server = shutil.which("redis-server")
    if server is None:
        return None
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(str(sock))
                return proc
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise RuntimeError("redis-server did not start")


async def measure(url: str, ops: int, repeats: int) -> dict[str, float]:
    """Median microseconds per call of each operation."""
    async with open_state(url) as store:
        state = store.for_plugin("bench")
        result = {}
        for name, operation in OPERATIONS.items():
            for i in range(min(ops, 200)):  # warm: connections, script cache, statements
                await operation(state, i)
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(ops):
                    await operation(state, i)
                runs.append((time.perf_counter() - start) / ops * 1e6)
            result[name] = statistics.median(runs)
        return result


def contended(processes: int, ops: int) -> str:
    """Forked workers taking from one local bucket together."""
    store = open_state("local://?lock_timeout=10")
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()

    def worker() -> None:
        async def work() -> list[float]:
            state, latencies = store.for_plugin("bench"), []
            for _ in range(ops):
                start = time.perf_counter()
                await state.take("one-client", rate=1e6, burst=1_000_000)
                latencies.append(time.perf_counter() - start)
            await store.close()
            return latencies

        go.wait()
        results.put(uvloop.run(work()))

    workers = [ctx.Process(target=worker) for _ in range(processes)]
    for process in workers:
        process.start()
    start = time.perf_counter()
    go.set()
    latencies = sorted(t for _ in workers for t in results.get())
    elapsed = time.perf_counter() - start
    for process in workers:
        process.join()
    uvloop.run(store.close())

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e6

    return (
        f"local, {processes} processes on one bucket: {len(latencies) / elapsed:.0f} takes/s "
        f"together; us per take p50 {pct(0.5):.0f}, p90 {pct(0.9):.0f}, p99 {pct(0.99):.0f}, "
        f"max {latencies[-1] * 1e6:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="calls per run")
    parser.add_argument("--repeats", type=int, default=7, help="runs; the median is shown")
    parser.add_argument(
        "--processes", type=int, default=0, help="also measure N workers on one local bucket"
    )
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="a6-bench-"))
    redis = start_redis(directory)
    urls = {"memory": "memory://", "local": "local://"}
    if redis is not None:
        urls["redis (unix)"] = f"unix://{directory}/redis.sock?timeout=1&connect_timeout=1"
    try:
        columns = {
            name: uvloop.run(measure(url, args.ops, args.repeats)) for name, url in urls.items()
        }
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()
        shutil.rmtree(directory, ignore_errors=True)

    print(f"us per call, median of {args.repeats} x {args.ops} calls, one task, uvloop")
    print(f"{'operation':<10}" + "".join(f"{name:>14}" for name in columns))
    for operation in OPERATIONS:
        print(f"{operation:<10}" + "".join(f"{c[operation]:>14.1f}" for c in columns.values()))
    if redis is None:
        print("redis: skipped, redis-server is not installed")
    if args.processes:
        print(contended(args.processes, args.ops))


if __name__ == "__main__":
    main()
