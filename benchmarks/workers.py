"""The runner at 1 and at 2 workers, side by side: calls/s and CPU per call.

Each case starts ``a6-runner run --workers W`` on a temporary socket and drives it with
several ``a6-runner bench --socket ...`` client processes at once (each with its own
connections; the kernel spreads connections over the workers). The runner's CPU is
read from ``/proc/<pid>/stat`` (user + system time) of every process of the runner's
tree (the supervisor and its workers; at 1 worker the single process) before the
clients start and after they have all exited, and divided by the calls the clients
made in between. The supervisor's own CPU is reported apart.

Two plugins: ``say`` (a Stop, the runner's floor) and ``jwt-auth`` (HS256 verification
of a bearer token, then a pass-through with the subject in a header): a realistic auth
step. Runs are interleaved (repetition, then case, then workers) so that noise from
other work on the machine hits every case alike; medians are printed.

    .venv/bin/python benchmarks/workers.py --repeat 3 --duration 5 --clients 4

This is a benchmark, not a test: it prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
SECRET = "benchmark-secret-of-a-reasonable-length"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_token() -> str:
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"sub": "alice", "exp": int(time.time()) + 86_400}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


@dataclass(frozen=True)
class Case:
    name: str
    conf: list[dict[str, str]]
    bench_args: tuple[str, ...] = ()


CASES = (
    Case("say", [{"name": "say", "value": "{}"}]),
    Case(
        "jwt-auth",
        [{"name": "jwt-auth", "value": json.dumps({"secret": SECRET, "subject_header": "x-user"})}],
        ("--header", f"authorization:Bearer {jwt_token()}"),
    ),
)


@dataclass
class Run:
    workers: int
    case: str
    calls: int
    calls_per_s: float
    errors: int
    cpu_us_per_call: float
    supervisor_cpu_s: float
    seconds: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a runner's supervisor and workers)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


class Runner:
    def __init__(self, workers: int, directory: Path) -> None:
        self.socket = directory / f"w{workers}.sock"
        self.workers = workers
        self.log = (directory / f"w{workers}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "run", "--listen", str(self.socket),
             "--workers", str(workers), "--log-level", "warning"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        want = workers + 1 if workers > 1 else 1
        while not (self.socket.exists() and len(tree(self.proc.pid)) >= want):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the runner with {workers} workers did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def drive(runner: Runner, case: Case, args: argparse.Namespace) -> Run:
    pids = tree(runner.proc.pid)
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    command = [
        sys.executable, "-m", "runner", "bench", "--socket", str(runner.socket),
        "--pid", str(runner.proc.pid), "--conf", json.dumps(case.conf),
        "-c", str(args.connections), "-d", str(args.duration), "--warmup", "0",
        "--json", "--no-progress", *case.bench_args,
    ]  # fmt: skip
    clients = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(args.clients)
    ]
    results = []
    for client in clients:
        out, err = client.communicate()
        if client.returncode != 0:
            raise RuntimeError(f"bench failed: {err.decode(errors='replace')[-2000:]}")
        results.append(json.loads(out))
    seconds = time.monotonic() - started
    after = {pid: cpu_seconds(pid) for pid in tree(runner.proc.pid)}
    if set(after) != set(before):
        raise RuntimeError("a worker was replaced during the run; its CPU would be lost")
    calls = sum(r["calls"] for r in results)
    used = sum(after[pid] - before[pid] for pid in before)
    supervisor = runner.proc.pid if runner.workers > 1 else None
    return Run(
        workers=runner.workers,
        case=case.name,
        calls=calls,
        calls_per_s=sum(r["throughput"] for r in results),
        errors=sum(sum(r["errors"].values()) for r in results),
        cpu_us_per_call=used / calls * 1e6,
        supervisor_cpu_s=0.0 if supervisor is None else after[supervisor] - before[supervisor],
        seconds=seconds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per client run")
    parser.add_argument("--clients", type=int, default=4, help="bench processes at once")
    parser.add_argument("--connections", type=int, default=16, help="per bench process")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="a6-wb-") as tmp:
        runners = {w: Runner(w, Path(tmp)) for w in args.workers}
        try:
            for rep in range(args.repeat):
                for case in CASES:
                    for workers, runner in runners.items():
                        run = drive(runner, case, args)
                        runs.append(run)
                        print(
                            f"# rep {rep + 1} {case.name:8} workers={workers}: "
                            f"{run.calls_per_s:8,.0f} calls/s {run.cpu_us_per_call:6.1f} us/call "
                            f"supervisor {run.supervisor_cpu_s * 1000:.0f} ms "
                            f"errors {run.errors}",
                            file=sys.stderr,
                        )
        finally:
            for runner in runners.values():
                runner.stop()

    print(
        f"\n{args.clients} bench processes x {args.connections} connections, "
        f"{args.duration:g} s each, median of {args.repeat}; CPU = supervisor + workers\n"
    )
    print("| plugin | workers | calls/s | runner CPU us/call | vs 1 worker | "
          "supervisor CPU (ms per run) | errors |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for case in CASES:
        base = None
        for workers in args.workers:
            mine = [r for r in runs if r.case == case.name and r.workers == workers]
            cpu = statistics.median(r.cpu_us_per_call for r in mine)
            base = cpu if base is None else base
            print(
                f"| {case.name} | {workers} | {statistics.median(r.calls_per_s for r in mine):,.0f}"
                f" | {cpu:.1f} | {cpu / base - 1:+.1%} | "
                + (
                    f"{statistics.median(r.supervisor_cpu_s for r in mine) * 1000:.0f}"
                    if workers > 1
                    else "-"
                )
                + f" | {sum(r.errors for r in mine)} |"
            )


if __name__ == "__main__":
    main()
