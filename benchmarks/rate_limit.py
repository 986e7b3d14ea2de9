"""The ``rate-limit`` example plugin on each state backend, side by side: calls/s and
the runner's CPU per call with its buckets in memory (this process only), local (SQLite
on tmpfs, shared by the workers) and Redis (a redis-server on a Unix socket, shared by
every runner on it).

Each run is ``a6-runner bench`` spawning ``a6-runner run --state-url URL`` and driving
it as the gateway does (one PrepareConf, then calls on kept-alive connections). Every
call asks the gateway for ``remote_addr`` (one ExtraInfo round trip) and takes one token
of that client's bucket; the rate is high enough that every call passes, so each is a
write. Runs are interleaved (repetition, then backend) so that noise from other work on
the machine hits every backend alike; medians are printed. The Redis server's own CPU
per call is shown apart: it is spent outside the runner (on this machine, on the same
cores). Redis is skipped if ``redis-server`` is not installed.

    .venv/bin/python benchmarks/rate_limit.py --repeat 3 --duration 3 [--workers 2]

This is a benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from state import start_redis  # benchmarks/state.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
CONF = [{"name": "rate-limit", "value": json.dumps({"rate": 1e9, "burst": 1_000_000_000})}]


@dataclass
class Run:
    backend: str
    calls: int
    calls_per_s: float
    p99_ms: float
    runner_cpu_us: float
    redis_cpu_us: float | None
    errors: int


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def drive(backend: str, url: str, args: argparse.Namespace, redis_pid: int | None) -> Run:
    command = [
        sys.executable, "-m", "runner", "bench", "--conf", json.dumps(CONF),
        "-c", str(args.connections), "-d", str(args.duration), "--warmup", str(args.warmup),
        "--json", "--no-progress",
        "--", "--state-url", url, "--workers", str(args.workers), "--log-level", "warning",
    ]  # fmt: skip
    redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"bench on {backend} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    # The Redis CPU covers the warm-up and the runner's start too: an upper bound.
    redis_cpu = cpu_seconds(redis_pid) - redis_before if redis_pid else None
    total_calls = result["calls"] + round(result["throughput"] * args.warmup)
    return Run(
        backend=backend,
        calls=result["calls"],
        calls_per_s=result["throughput"],
        p99_ms=result["latency_ms"]["p99"],
        runner_cpu_us=result.get("runner_cpu_us_per_call") or float("nan"),
        redis_cpu_us=None if redis_cpu is None else redis_cpu / total_calls * 1e6,
        errors=sum(result["errors"].values()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="runner worker processes")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="a6-rl-bench-"))
    redis = start_redis(directory)
    urls = {"memory": "memory://", "local": "local://"}
    if redis is not None:
        urls["redis"] = f"unix://{directory}/redis.sock"
    runs: list[Run] = []
    load_before = os.getloadavg()
    try:
        for rep in range(args.repeat):
            for backend, url in urls.items():
                redis_pid = redis.pid if redis is not None and backend == "redis" else None
                run = drive(backend, url, args, redis_pid)
                runs.append(run)
                print(
                    f"# rep {rep + 1} {backend:7} {run.calls_per_s:9,.0f} calls/s "
                    f"{run.runner_cpu_us:6.1f} us/call errors {run.errors}",
                    file=sys.stderr,
                )
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"\nrate-limit, {args.workers} worker(s), {args.connections} connections, "
        f"{args.duration:g} s per run, median of {args.repeat}; "
        f"load average before/after {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    print("| state | calls/s | p99 | runner CPU us/call | vs memory | redis-server CPU us/call "
          "| errors |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for backend in urls:
        mine = [r for r in runs if r.backend == backend]
        cpu = statistics.median(r.runner_cpu_us for r in mine)
        base = cpu if base is None else base
        redis_cpu = [r.redis_cpu_us for r in mine if r.redis_cpu_us is not None]
        print(
            f"| {backend} | {statistics.median(r.calls_per_s for r in mine):,.0f} "
            f"| {statistics.median(r.p99_ms for r in mine):.2f} ms | {cpu:.1f} "
            f"| {cpu - base:+.1f} us | "
            + (f"{statistics.median(redis_cpu):.1f}" if redis_cpu else "-")
            + f" | {sum(r.errors for r in mine)} |"
        )
    if redis is None:
        print("redis: skipped, redis-server is not installed")


if __name__ == "__main__":
    main()
