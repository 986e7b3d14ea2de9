"""Soak: a real runner process under a mixed gateway workload and bad frames, for minutes.

    .venv/bin/python -m tests.soak.run_soak --minutes 10

Starts ``python -m runner run`` the way the gateway does (APISIX_LISTEN_ADDRESS, the
fixture plugins), then keeps ``--workers`` keep-alive connections busy with every kind
of plugin (inline, async with ExtraInfo, blocking, request and response phase, MiB
bodies), calls that fail on purpose (a plugin that raises, hangs past the call deadline
or returns a value; stale tokens), a churn of distinct PrepareConf beyond the conf
limit, clients that vanish mid-call, and the socket fuzzer's bad connections.

Every answer is checked. Errors the workload provoked on purpose are "expected"; any
other is "unexpected" and printed. The runner's RSS is sampled all along. At the end the
runner gets SIGTERM and must exit 0 and remove its socket.

Exit status 0 only if: no unexpected error, the runner never died, its RSS is flat (the
last quarter's mean within 10% or 8 MiB of the second quarter's), and it stopped cleanly.
Not part of the test suite (its name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from runner.protocol.frame import RPC, encode_frame
from runner.protocol.messages import ErrCode, Rewrite, Stop, encode_req_call
from runner.tools.client import Connection, ProtocolViolation, RunnerError, wait_for_socket
from tests.server.test_fuzz import FuzzFailure, Routes, fuzz_connection, prepare_routes

ROOT = Path(__file__).resolve().parents[2]
FIXTURE_PLUGINS = ROOT / "tests" / "fixtures" / "plugins"

CALL_TIMEOUT = 1.0  # the runner's call deadline: hanging plugins fail after this
MAX_CONFS = 2000  # small, so the PrepareConf churn runs into the limit
MAX_FRAME = 4 * 1024 * 1024
MIB = 1 << 20

# Each route: the conf, and how often a worker picks it (weights).
ROUTES: dict[str, list[tuple[str, dict[str, object]]]] = {
    "say": [("say", {"body": "hi", "status": 201})],
    "rewrite": [("rewrite", {"path": "/new", "set_headers": {"x-a": "1"}, "add_args": {"q": "v"}})],
    "api-key": [("api-key", {"keys": ["k1", "k2"]}), ("rewrite", {"set_headers": {"x-ok": "1"}})],
    "rate-limit": [("rate-limit", {"rate": 50.0, "burst": 5})],
    "redact-body": [("redact-body", {"fields": ["password"]})],
    "request-info": [("request-info", {"vars": {"x-client": "remote_addr"}})],
    "response-rewrite": [("response-rewrite", {"status": 299, "replace": {"secret": "*"}})],
    "blocking": [("test-block", {"seconds": 0.005})],
    "sleep": [("test-sleep", {"seconds": 0.01})],
    "big-body": [("test-body-size", {})],
    "fail": [("test-fail", {})],
    "hang": [("test-hang", {})],
    "returns": [("test-returns", {"what": "coroutine"})],
}

WEIGHTS: dict[str, int] = {
    "say": 30,
    "rewrite": 20,
    "api-key": 20,
    "rate-limit": 10,
    "redact-body": 10,
    "request-info": 10,
    "response-rewrite": 10,
    "blocking": 8,
    "sleep": 8,
    "big-body": 1,
    "fail": 3,
    "hang": 0,  # rare: see HANG_EVERY
    "returns": 2,
    "stale-token": 2,
    "churn": 4,
    "old-token": 3,
    "vanish": 2,
    "fuzz": 2,
}
HANG_EVERY = 500  # one call in this many hangs until the runner's deadline


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    reprepared: int = 0

    def fail(self, kind: str, what: str) -> None:
        self.unexpected[kind] += 1
        if len(self.samples) < 20:
            self.samples.append(f"{kind}: {what}")


def check(ok: bool, context: object) -> None:
    """An answer the workload did not expect: counted as an unexpected error."""
    if not ok:
        raise AssertionError(f"unexpected answer: {context}")


def encode(conf: list[tuple[str, dict[str, object]]]) -> list[tuple[str, str]]:
    return [(name, json.dumps(cfg)) for name, cfg in conf]


class Workload:
    def __init__(self, path: str, stats: Stats, seed: int) -> None:
        self.path = path
        self.stats = stats
        self.rng = random.Random(seed)
        self.tokens: dict[str, int] = {}
        # (token, body) of churned confs: a token must give its own body or be unknown.
        self.old_confs: list[tuple[int, str]] = []
        self.churn_counter = 0
        self.call_counter = 0
        self.fuzz_routes: Routes | None = None

    async def setup(self) -> None:
        async with await Connection.open(self.path) as conn:
            for name, conf in ROUTES.items():
                self.tokens[name] = await conn.prepare_conf(encode(conf), key=f"route#{name}")
        self.fuzz_routes = await prepare_routes(self.path)

    async def token(self, conn: Connection, name: str, refresh: bool = False) -> int:
        if refresh:
            # What the gateway does on CONF_TOKEN_NOT_FOUND: prepare again and retry.
            self.stats.reprepared += 1
            self.tokens[name] = await conn.prepare_conf(encode(ROUTES[name]), key=f"route#{name}")
        return self.tokens[name]

    async def worker(self, n: int, deadline: float) -> None:
        rng = random.Random(self.rng.random())
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        conn: Connection | None = None
        while time.monotonic() < deadline:
            if conn is None or conn.closed:
                conn = await Connection.open(self.path, io_timeout=30)
            self.call_counter += 1
            kind = "hang" if self.call_counter % HANG_EVERY == 0 else rng.choices(kinds, weights)[0]
            self.stats.calls[kind] += 1
            try:
                await self.one(conn, kind, rng)
            except RunnerError as exc:
                self.stats.fail(kind, f"error frame {ErrCode(exc.code).name}")
            except (ProtocolViolation, TimeoutError, OSError, FuzzFailure, AssertionError) as exc:
                self.stats.fail(kind, f"{type(exc).__name__}: {exc}"[:400])
                conn.close()
        if conn is not None:
            await conn.aclose()

    async def call_route(self, conn: Connection, name: str, **kwargs: object):  # type: ignore[no-untyped-def]
        for attempt in range(3):
            token = await self.token(conn, name, refresh=attempt > 0)
            try:
                if name == "response-rewrite":
                    return await conn.resp_call(token, **kwargs)  # type: ignore[arg-type]
                return await conn.req_call(token, **kwargs)  # type: ignore[arg-type]
            except RunnerError as exc:
                if exc.code != ErrCode.CONF_TOKEN_NOT_FOUND or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def expect_error(self, conn: Connection, kind: str, code: ErrCode, coro) -> None:  # type: ignore[no-untyped-def]
        try:
            reply = await coro
        except RunnerError as exc:
            if exc.code != code:
                raise
            self.stats.expected[f"{kind}: {code.name}"] += 1
            return
        raise AssertionError(f"expected {code.name}, got {reply}")

    async def one(self, conn: Connection, kind: str, rng: random.Random) -> None:
        cid = rng.randrange(1 << 32)
        if kind == "say":
            reply = await self.call_route(conn, "say", id=cid)
            check(reply.id == cid and reply.action == Stop(201, (), b"hi"), reply)
        elif kind == "rewrite":
            reply = await self.call_route(conn, "rewrite", id=cid, args=[("flag", None)])
            check(isinstance(reply.action, Rewrite) and reply.action.path == "/new", reply)
        elif kind == "api-key":
            key = rng.choice([None, "k1", "k2", "bad"])
            headers = [] if key is None else [("x-api-key", key)]
            reply = await self.call_route(conn, "api-key", id=cid, headers=headers)
            action = reply.action
            if key is None:
                check(isinstance(action, Stop) and action.status == 401, reply)
            elif key == "bad":
                check(isinstance(action, Stop) and action.status == 403, reply)
            else:
                assert isinstance(action, Rewrite), reply
                assert ("x-ok", "1") in action.headers, reply
        elif kind == "rate-limit":
            addr = f"10.0.{rng.randrange(4)}.{rng.randrange(250)}"
            reply = await self.call_route(conn, "rate-limit", id=cid, vars={"remote_addr": addr})
            assert reply.action is None or (
                isinstance(reply.action, Stop) and reply.action.status == 429
            ), reply
        elif kind == "redact-body":
            body = json.dumps({"user": "u", "password": "p" * rng.randrange(1, 2000)}).encode()
            reply = await self.call_route(
                conn,
                "redact-body",
                id=cid,
                headers=[("content-type", "application/json")],
                body=body,
            )
            assert isinstance(reply.action, Rewrite), reply
            assert json.loads(reply.action.body or b"") == {"user": "u", "password": "[redacted]"}
        elif kind == "request-info":
            reply = await self.call_route(
                conn, "request-info", id=cid, vars={"remote_addr": "1.2.3.4"}
            )
            assert isinstance(reply.action, Rewrite), reply
            assert reply.action.headers == (("x-client", "1.2.3.4"),), reply
        elif kind == "response-rewrite":
            reply = await self.call_route(
                conn, "response-rewrite", id=cid, resp_body=b"a secret here", status=200
            )
            check(reply.status == 299 and reply.body == b"a * here", reply)
        elif kind == "blocking":
            reply = await self.call_route(conn, "blocking", id=cid, vars={"remote_addr": "5.6.7.8"})
            assert isinstance(reply.action, Rewrite), reply
            assert reply.action.headers == (("x-blocked-for", "0.005:5.6.7.8"),), reply
        elif kind == "sleep":
            reply = await self.call_route(conn, "sleep", id=cid)
            check(reply.id == cid and reply.action is None, reply)
        elif kind == "big-body":
            body = rng.randbytes(rng.randrange(MIB, 3 * MIB))
            reply = await self.call_route(conn, "big-body", id=cid, body=body)
            check(isinstance(reply.action, Rewrite) and reply.action.body == body[::-1], None)
        elif kind in ("fail", "hang", "returns"):
            await self.expect_error(
                conn, kind, ErrCode.SERVICE_UNAVAILABLE, self.call_route(conn, kind, id=cid)
            )
        elif kind == "stale-token":
            token = rng.randrange(1, 1000)  # tokens follow the monotonic clock: never this low
            await self.expect_error(
                conn, kind, ErrCode.CONF_TOKEN_NOT_FOUND, conn.req_call(token, id=cid)
            )
        elif kind == "churn":
            self.churn_counter += 1
            text = f"conf-{self.churn_counter}-{rng.random()}"
            token = await conn.prepare_conf(encode([("say", {"body": text})]))
            reply = await conn.req_call(token, id=cid)
            assert reply.action == Stop(200, (), text.encode()), reply
            self.old_confs.append((token, text))
            del self.old_confs[: -4 * MAX_CONFS]
        elif kind == "old-token":
            if not self.old_confs:
                return
            token, text = rng.choice(self.old_confs)
            try:
                reply = await conn.req_call(token, id=cid)
            except RunnerError as exc:
                if exc.code != ErrCode.CONF_TOKEN_NOT_FOUND:
                    raise
                self.stats.expected["old-token: CONF_TOKEN_NOT_FOUND (evicted)"] += 1
                return
            # Never another route's plugins: an old token answers with its own conf.
            assert reply.action == Stop(200, (), text.encode()), (token, text, reply)
        elif kind == "vanish":
            await self.vanish(rng)
        elif kind == "fuzz":
            assert self.fuzz_routes is not None
            await fuzz_connection(self.path, rng, self.fuzz_routes, MAX_FRAME)
        else:
            raise AssertionError(f"unknown kind {kind}")

    async def vanish(self, rng: random.Random) -> None:
        """A client that goes away mid-frame, mid-ExtraInfo or before reading its reply."""
        async with await Connection.open(self.path) as conn:
            how = rng.choice(["mid-frame", "mid-extra-info", "mid-reply"])
            if how == "mid-frame":
                frame = encode_frame(
                    RPC.HTTP_REQ_CALL, encode_req_call(conf_token=self.tokens["say"])
                )
                conn._writer.write(frame[: rng.randrange(1, len(frame))])
            elif how == "mid-extra-info":
                payload = encode_req_call(conf_token=self.tokens["request-info"])
                await conn.send_frame(RPC.HTTP_REQ_CALL, payload)
                rpc_type, _ = await conn.read_frame()
                assert rpc_type == RPC.EXTRA_INFO
            else:
                await conn.send_frame(
                    RPC.HTTP_REQ_CALL, encode_req_call(conf_token=self.tokens["sleep"])
                )
            await conn._writer.drain()
        self.stats.expected[f"vanish {how}"] += 1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def start_runner(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """The runner as the gateway starts it; its stdout and stderr go to ``log_path``."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "runner", "run"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def soak(args: argparse.Namespace) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="a6-soak-"))
    sock = work_dir / "runner.sock"
    log_path = work_dir / "runner.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "APISIX_LISTEN_ADDRESS": f"unix:{sock}",
        "APISIX_CONF_EXPIRE_TIME": "3600",
        "A6_RUNNER_PLUGINS_DIR": str(FIXTURE_PLUGINS),
        "A6_RUNNER_EXAMPLES": "true",
        "A6_RUNNER_CALL_TIMEOUT": str(CALL_TIMEOUT),
        "A6_RUNNER_MAX_CONFS": str(MAX_CONFS),
        "A6_RUNNER_MAX_FRAME_SIZE": str(MAX_FRAME),
        "A6_RUNNER_LOG_LEVEL": "warning",
    }
    proc = start_runner(env, log_path)
    try:
        await wait_for_socket(str(sock), timeout=20)
        stats = Stats()
        workload = Workload(str(sock), stats, args.seed)
        await workload.setup()
        start = time.monotonic()
        deadline = start + args.minutes * 60
        workers = [asyncio.create_task(workload.worker(n, deadline)) for n in range(args.workers)]
        rss: list[tuple[float, int, int, int]] = []
        print(
            f"soak: runner pid {proc.pid}, {args.workers} workers, {args.minutes} min", flush=True
        )
        print(
            f"{'t(s)':>6} {'calls':>8} {'calls/s':>8} {'RSS MiB':>8} {'fds':>5} {'thr':>4}"
            f" {'unexpected':>10}",
            flush=True,
        )
        last_calls, last_t = 0, start
        while time.monotonic() < deadline:
            await asyncio.sleep(min(args.sample, max(0.1, deadline - time.monotonic())))
            if proc.poll() is not None:
                stats.fail("runner", f"the runner died with status {proc.returncode}")
                break
            now = time.monotonic()
            total = sum(stats.calls.values())
            sample = (now - start, rss_kib(proc.pid), open_fds(proc.pid), threads(proc.pid))
            rss.append(sample)
            print(
                f"{sample[0]:6.0f} {total:8d} {(total - last_calls) / (now - last_t):8.0f}"
                f" {sample[1] / 1024:8.1f} {sample[2]:5d} {sample[3]:4d}"
                f" {sum(stats.unexpected.values()):10d}",
                flush=True,
            )
            last_calls, last_t = total, now
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - start

        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        stopped_cleanly = alive and status == 0 and not sock.exists()

        total = sum(stats.calls.values())
        print(
            f"\ncalls: {total} in {elapsed:.0f} s ({total / elapsed:.0f}/s),"
            f" re-prepared after CONF_TOKEN_NOT_FOUND: {stats.reprepared}"
        )
        for kind, n in sorted(stats.calls.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:18} {n:8d}")
        print("expected errors (provoked on purpose):")
        for what, n in sorted(stats.expected.items()):
            print(f"  {what:45} {n:8d}")
        print(f"unexpected errors: {sum(stats.unexpected.values())}")
        for what, n in sorted(stats.unexpected.items()):
            print(f"  {what:18} {n:8d}")
        for sample_line in stats.samples:
            print(f"    {sample_line}")

        flat = True
        if len(rss) >= 4:
            quarter = len(rss) // 4
            second = [r[1] for r in rss[quarter : 2 * quarter]]
            last = [r[1] for r in rss[-quarter:]]
            base, end = sum(second) / len(second), sum(last) / len(last)
            growth = end - base
            flat = growth <= max(0.10 * base, 8 * 1024)
            print(
                f"RSS: second quarter mean {base / 1024:.1f} MiB, last quarter mean"
                f" {end / 1024:.1f} MiB, growth {growth / 1024:+.1f} MiB: "
                f"{'flat' if flat else 'GROWING'}"
                f" (min {min(r[1] for r in rss) / 1024:.1f},"
                f" max {max(r[1] for r in rss) / 1024:.1f})"
            )
        # One event per line, except a traceback's indented lines under its event.
        events: list[str] = []
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(" ") and events:
                events[-1] += "\n" + line
            else:
                events.append(line)
        levels = Counter(e.split(" ", 3)[2] if e.count(" ") >= 3 else "?" for e in events)
        print(
            f"runner log: {len(events)} events ({dict(levels)}), exit status {status},"
            f" socket removed: {not sock.exists()}"
        )
        provoked = ("plugin 'test-fail'", "plugin 'test-returns'", "call deadline")
        unexpected_log = [e for e in events if " ERROR " in e and not any(p in e for p in provoked)]
        for event in unexpected_log[:10]:
            print(f"    unexpected log event: {event[:300]}")
        if unexpected_log:
            stats.fail("runner log", f"{len(unexpected_log)} unexpected ERROR events")
        ok = not stats.unexpected and flat and stopped_cleanly
        print("SOAK PASSED" if ok else "SOAK FAILED")
        return 0 if ok else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            sock.unlink(missing_ok=True)
        print(f"runner log kept in {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    raise SystemExit(uvloop.run(soak(args)))


if __name__ == "__main__":
    main()
