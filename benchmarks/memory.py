"""Does the runner's memory stay flat under load? RSS over a long run of calls.

Spawns ``a6-runner run``, warms it up, then drives ``--calls`` calls (1,000,000 by default)
through the load generator and samples the runner's resident set size as it goes. A
runner that keeps something per call (a task, a frame, a log record) grows with the call
count; one that does not stays within a few hundred KiB of where it started.

    .venv/bin/python benchmarks/memory.py --calls 1000000 --case stop
"""

from __future__ import annotations

import argparse
import json
import time

import uvloop

from runner.tools.bench import (
    BenchConfig,
    RequestShape,
    SpawnedRunner,
    process_rss_kib,
    run_bench,
)

CASES = {
    "stop": ((("say", "{}"),), RequestShape()),
    "var": ((("request-info", "{}"),), RequestShape()),
    "body64k": (
        (("request-info", json.dumps({"vars": {}, "body_length_header": "x-body-length"})),),
        RequestShape(method="POST", body_size=64 * 1024),
    ),
}


async def measure(args: argparse.Namespace) -> None:
    conf, shape = CASES[args.case]
    runner = SpawnedRunner()
    await runner.start()
    samples: list[tuple[int, int]] = []  # (calls so far, RSS KiB)
    try:
        # A first run warms every cache up (imports, freelists, the allocator's arenas).
        warm = BenchConfig(
            socket=runner.socket,
            conf=conf,
            shape=shape,
            connections=args.connections,
            requests=args.warmup_calls,
            duration=600,
            warmup=0,
            pid=runner.pid,
        )
        await run_bench(warm)
        start_rss = process_rss_kib(runner.pid)
        assert start_rss is not None
        samples.append((0, start_rss))
        last = [time.monotonic()]

        def sample(run: object) -> None:
            now = time.monotonic()
            if now - last[0] >= args.every:
                last[0] = now
                rss = process_rss_kib(runner.pid)
                if rss is not None:
                    samples.append((getattr(run, "completed", 0), rss))

        config = BenchConfig(
            socket=runner.socket,
            conf=conf,
            shape=shape,
            connections=args.connections,
            requests=args.calls,
            duration=args.max_seconds,
            warmup=0,
            pid=runner.pid,
        )
        result = await run_bench(config, sample)
        end_rss = process_rss_kib(runner.pid)
        assert end_rss is not None
        samples.append((result.calls, end_rss))
    finally:
        runner.stop()
    peak = max(rss for _, rss in samples)
    print(
        f"case {args.case}: {result.calls:,} calls on {args.connections} connections in"
        f" {result.seconds:.0f} s ({result.throughput:,.0f}/s), errors:"
        f" {sum(result.errors.values())}"
    )
    print(
        f"runner RSS: start {start_rss / 1024:.1f} MiB, end {end_rss / 1024:.1f} MiB,"
        f" peak {peak / 1024:.1f} MiB (growth {(end_rss - start_rss):+,} KiB)"
    )
    step = max(1, len(samples) // 10)
    print(
        "samples (calls: RSS MiB): "
        + ", ".join(f"{calls:,}: {rss / 1024:.1f}" for calls, rss in samples[::step])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="stop")
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup-calls", type=int, default=50_000)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--max-seconds", type=float, default=900, help="time bound")
    uvloop.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
