"""The benchmark suite: the runner's CPU time per call, side by side with the transport floor.

One run measures six servers, each at 1, 16 and 64 connections, driven by the same load
generator (``runner.tools.bench``, the engine of ``a6-runner bench``):

  floor     benchmarks/floor_server.py: canned replies over a uvloop Unix socket
  stop      a6-runner, plugin ``say`` (a Stop)
  stop1h    a6-runner, plugin ``say`` (a Stop with a body and one header)
  rewrite   a6-runner, plugin ``rewrite`` (path, header, arg and response header)
  var       a6-runner, plugin ``request-info``: one ExtraInfo variable per call
  body64k   a6-runner, plugin ``request-info``: a 64 KiB request body read via ExtraInfo

Every server runs in its own process for the whole suite; the runs are interleaved
(repetition, then connections, then case) so that a burst of noise from other work on
the machine hits every case alike. Reported per case: medians over the repetitions of
throughput, p99 latency and runner CPU per call, and the median of the per-repetition
ratios of CPU per call to the floor's at the same connection count.

    .venv/bin/python benchmarks/suite.py --repeat 5 --duration 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import uvloop

from runner.tools.bench import BenchConfig, BenchResult, RequestShape, SpawnedRunner, run_bench
from runner.tools.client import wait_for_socket

HERE = Path(__file__).resolve().parent

REWRITE_CONF = {
    "path": "/v2/bench",
    "set_headers": {"x-gateway": "apisix"},
    "set_args": {"v": "2"},
    "response_headers": {"x-served-by": "a6-runner"},
}


@dataclass(frozen=True)
class Case:
    name: str
    conf: tuple[tuple[str, str], ...]
    shape: RequestShape = field(default_factory=RequestShape)
    floor: bool = False


CASES = (
    Case("floor", (), floor=True),
    Case("stop", (("say", "{}"),)),
    Case("stop1h", (("say", json.dumps({"headers": {"content-type": "text/plain"}})),)),
    Case("rewrite", (("rewrite", json.dumps(REWRITE_CONF)),)),
    Case("var", (("request-info", "{}"),)),
    Case(
        "body64k",
        (("request-info", json.dumps({"vars": {}, "body_length_header": "x-body-length"})),),
        RequestShape(method="POST", body_size=64 * 1024),
    ),
)


class FloorServer:
    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "floor_server.py"), socket],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "uvloop": metadata.version("uvloop"),
        "kernel": platform.release(),
    }


async def start_servers(
    cases: list[Case], tmp: str, runner_path: str | None
) -> dict[str, FloorServer | SpawnedRunner]:
    servers: dict[str, FloorServer | SpawnedRunner] = {}
    for case in cases:
        socket = os.path.join(tmp, f"{case.name}.sock")
        if case.floor:
            servers[case.name] = FloorServer(socket)
            await wait_for_socket(socket, 15)
        else:
            runner = SpawnedRunner(socket=socket, cwd=runner_path)
            await runner.start()
            servers[case.name] = runner
    return servers


async def suite(args: argparse.Namespace) -> tuple[dict[str, Any], list[Run]]:
    cases = [c for c in CASES if c.name in args.cases]
    runs: list[Run] = []
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="a6-suite-") as tmp:
        servers = await start_servers(cases, tmp, args.runner_path)
        try:
            for rep in range(args.repeat):
                for conns in args.connections:
                    for case in cases:
                        server = servers[case.name]
                        config = BenchConfig(
                            socket=server.socket,
                            conf=case.conf,
                            shape=case.shape,
                            connections=conns,
                            duration=args.duration,
                            warmup=args.warmup,
                            pid=server.pid,
                            # The floor's canned reply carries id 0 whatever the request's.
                            check_id=not case.floor,
                        )
                        result = await run_bench(config)
                        runs.append(_run(case.name, conns, rep, result))
                        print(_progress_line(runs[-1]), file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    info = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "seconds": round(time.time() - started),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runner_path": args.runner_path,
        "settings": {
            "repeat": args.repeat,
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
        },
    }
    return info, runs


@dataclass(frozen=True)
class Run:
    case: str
    connections: int
    rep: int
    calls: int
    errors: int
    throughput: float
    p99_ms: float
    cpu_us: float | None
    bench_cpu_us: float | None
    reply: str


@dataclass(frozen=True)
class Cell:
    case: str
    connections: int
    throughput: float
    p99_ms: float
    cpu_us: float | None
    cpu_min: float | None
    cpu_max: float | None
    ratio: float | None  # median of the per-repetition ratios to the floor
    errors: int


def _run(case: str, conns: int, rep: int, result: BenchResult) -> Run:
    return Run(
        case=case,
        connections=conns,
        rep=rep,
        calls=result.calls,
        errors=sum(result.errors.values()),
        throughput=result.throughput,
        p99_ms=result.latency_ms["p99"],
        cpu_us=result.runner_cpu_us_per_call,
        bench_cpu_us=result.bench_cpu_us_per_call,
        reply=result.first_reply,
    )


def _progress_line(run: Run) -> str:
    cpu = "n/a" if run.cpu_us is None else f"{run.cpu_us:.1f}"
    return (
        f"rep {run.rep} {run.case:>8} c={run.connections:<3} {run.throughput:>9,.0f}/s"
        f"  p99 {run.p99_ms:.2f} ms  cpu {cpu} us/call  errors {run.errors}  ({run.reply})"
    )


def summarize(runs: list[Run]) -> list[Cell]:
    floor = {(r.connections, r.rep): r.cpu_us for r in runs if r.case == "floor"}
    order = [c.name for c in CASES]
    keys = sorted({(r.case, r.connections) for r in runs}, key=lambda k: (k[1], order.index(k[0])))
    cells = []
    for case, conns in keys:
        rows = [r for r in runs if r.case == case and r.connections == conns]
        cpus = [r.cpu_us for r in rows if r.cpu_us is not None]
        ratios = []
        for r in rows:
            base = floor.get((conns, r.rep))
            if r.cpu_us is not None and base:
                ratios.append(r.cpu_us / base)
        cells.append(
            Cell(
                case=case,
                connections=conns,
                throughput=statistics.median(r.throughput for r in rows),
                p99_ms=statistics.median(r.p99_ms for r in rows),
                cpu_us=statistics.median(cpus) if cpus else None,
                cpu_min=min(cpus) if cpus else None,
                cpu_max=max(cpus) if cpus else None,
                ratio=statistics.median(ratios) if ratios else None,
                errors=sum(r.errors for r in rows),
            )
        )
    return cells


def markdown(info: dict[str, Any], cells: list[Cell]) -> str:
    m = info["machine"]
    s = info["settings"]
    load = f"{_load(info['loadavg_before'])} / {_load(info['loadavg_after'])}"
    lines = [
        f"Run {info['started']}, {info['seconds']} s; {m['cpu']}, {m['cores']} cores,"
        f" Python {m['python']}, uvloop {m['uvloop']}, Linux {m['kernel']}.",
        f"{s['repeat']} repetitions x {s['duration']} s (+{s['warmup']} s warm-up) per cell,"
        f" medians shown; load average before / after: {load}.",
        *(
            [f"Runner under test imported from {info['runner_path']}."]
            if info["runner_path"]
            else []
        ),
        "",
        "| case | conns | calls/s | p99 | runner CPU per call (min-max) | x floor | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        cpu = "n/a" if c.cpu_us is None else f"{c.cpu_us:.1f} us ({c.cpu_min:.1f}-{c.cpu_max:.1f})"
        ratio = "n/a" if c.ratio is None else f"{c.ratio:.2f}"
        lines.append(
            f"| {c.case} | {c.connections} | {c.throughput:,.0f} | {c.p99_ms:.2f} ms | {cpu} |"
            f" {ratio} | {c.errors} |"
        )
    return "\n".join(lines)


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every cell")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 16, 64], help="connection counts"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=[c.name for c in CASES],
        choices=[c.name for c in CASES],
        help="cases to run (floor is needed for ratios)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument(
        "--runner-path",
        help="run the runner under test from this directory (its runner, plugins and"
        " ext_plugin_proto packages), e.g. an older version unpacked with 'git archive',"
        " to measure before and after",
    )
    args = parser.parse_args()
    info, runs = uvloop.run(suite(args))
    cells = summarize(runs)
    if args.json:
        data = {
            **info,
            "runs": [asdict(r) for r in runs],
            "cells": [asdict(c) for c in cells],
        }
        args.json.write_text(json.dumps(data, indent=2))
    print(markdown(info, cells))


if __name__ == "__main__":
    main()
