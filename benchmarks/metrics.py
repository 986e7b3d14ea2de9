"""The cost of --metrics-listen: the runner's CPU per call with metrics off and on, side
by side, in one run.

Each case (a route's plugin conf) is measured with `a6-runner bench` spawning the runner
itself, alternately without and with `--metrics-listen 127.0.0.1:0`, `--repeat` times;
the medians of the runner's CPU time per call are printed with their ratio. CPU time
moves with whatever else the machine does: `--callgrind` also counts the instructions
the runner executes per call (benchmarks/callgrind_runner.sh), which does not.

    .venv/bin/python benchmarks/metrics.py --repeat 5 --duration 3 --callgrind
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS_ON = ["--metrics-listen", "127.0.0.1:0"]

CASES = {
    "stop (say)": [{"name": "say", "value": "{}"}],
    "rewrite": [{"name": "rewrite", "value": '{"set_headers": {"x-gateway": "apisix"}}'}],
    "one ExtraInfo variable": [{"name": "request-info", "value": "{}"}],
}


def cpu_per_call(
    conf: list[dict[str, str]], runner_args: list[str], args: argparse.Namespace
) -> float:
    command = [
        sys.executable, "-m", "runner", "bench", "-c", str(args.connections),
        "-d", str(args.duration), "--json", "--no-progress", "--conf", json.dumps(conf),
        "--", "--log-level", "warning", *runner_args,
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    value = json.loads(out)["runner_cpu_us_per_call"]
    assert value is not None, out
    return float(value)


def instructions_per_call(conf: list[dict[str, str]], runner_args: list[str]) -> int:
    env = {**os.environ, "RUNNER_ARGS": " ".join(runner_args)}
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "callgrind_runner.sh"), json.dumps(conf)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per bench run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--callgrind", action="store_true", help="also count instructions")
    args = parser.parse_args()
    print(f"runner CPU per call, medians of {args.repeat} (us); metrics on: {' '.join(METRICS_ON)}")
    header = f"{'case':<24} {'off':>8} {'on':>8} {'on/off':>7}"
    if args.callgrind:
        header += f" {'instr off':>10} {'instr on':>10} {'on/off':>7}"
    print(header)
    for name, conf in CASES.items():
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.repeat):  # alternated, so that drift hits both alike
            off.append(cpu_per_call(conf, [], args))
            on.append(cpu_per_call(conf, METRICS_ON, args))
        a, b = statistics.median(off), statistics.median(on)
        line = f"{name:<24} {a:>8.2f} {b:>8.2f} {b / a:>7.3f}"
        if args.callgrind:
            i_off = instructions_per_call(conf, [])
            i_on = instructions_per_call(conf, METRICS_ON)
            line += f" {i_off:>10} {i_on:>10} {i_on / i_off:>7.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
