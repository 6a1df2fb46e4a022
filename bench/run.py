"""Headway's benchmark suite: every figure side by side with a bare grpc.aio baseline.

Starts the Headway server (`python -m headway_server serve`) and the bare baseline
(`bench/bare_server.py`) as separate processes on 127.0.0.1 and drives them
from this process (the load generator, one asyncio loop). Each figure is
measured against the bare server in the same run and reported as a ratio,
because absolute figures drift between runs and machines.

Sections (see `issues show 5`):

1. ingest: UpdateOperation calls/s and p50/p99 latency at 32 and 64 in flight,
   against the bare unary echo (goal: at least 0.8x).
2. streamed_reports: ReportProgress reports/s against the unary UpdateOperation
   rate; "not implemented" while the server answers UNIMPLEMENTED. The bare
   bidirectional echo is shown for reference.
3. batched: BatchUpdateOperations reports/s and server CPU per report with
   batches of 1, 10, 100 and 1,000 reports spread over 1,000 operations,
   against unary UpdateOperation on the same server and operations (goal:
   batches of 100 and 1,000 at least 10x the unary reports/s); every ack is
   checked (none rejected, none a duplicate). The bare batch echo (the same
   messages, no work per report) is shown for reference.
4. fanout: N watchers of one operation (WatchOperation) and N watchers of a
   project of 100 changing operations (WatchOperations). With pacing off
   (min_interval 0), against the bare fan-out: operation states delivered/s
   when over-driven (goals: 0.8x and 3x the bare per-message ceiling), and
   p50/p99 latency from a report's ack to a watcher's receipt at half the
   saturating rate (goal: p99 under 250 ms). With the server's default pacing
   (min_interval unset), what a default user gets: over-driven, states
   delivered/s, the producers' reports/s, ack-to-receipt latency and server
   CPU; and at the same half rate, latency and server CPU against pacing off.
5. slow_consumers: the project fan-out (default pacing) at a fixed rate with
   10 % of watchers that never read, against the same readers alone: their
   p99 (goal: within 1.1x), the producer's rate (goal: unchanged, within 5 %),
   server RSS over the run (goal: flat, under 5 % growth).
6. memory: server RSS per idle watcher against the bare stream (goal: at most
   1.25x), and per retained operation with a typical payload (goal: under 2 KiB).
7. admission: many WatchOperations streams opened at once: all admitted, none
   CANCELLED, time until all are SYNCED (the bare server's time for reference).
8. scaling: ingest at 1, 10, 100, 1,000 operations and fan-out (pacing off) at
   1, 10, 100, 1,000 watchers, each against the bare server.
9. unrelated_watchers (the scaling curve's other axis, issue 15): one producer
   reporting into one operation at 100 reports/s (unary UpdateOperation, paced
   by the wall clock) while 10, 1,000 and 10,000 WatchOperations watchers each
   watch a project of their own that nothing reports into: server CPU per
   report (goal: 10,000 watchers at most 1.2x the CPU per report with 10) and
   the producer's achieved rate (goal: at least 0.95x), beside the bare unary
   echo's CPU per call at the same rate. The 10-watcher run is repeated last
   and the others compared with the mean of both (drift between runs on a
   shared machine is of the goal's size). The server's CPU with the watchers
   open and no reports (their bookmarks) is measured over as long a window.
10. redis: the Redis store (`--store redis://...`) on a redis-server the bench
   starts itself, against the memory store, one server process each: unary
   and batched (100) reports/s (goals: at least 0.7x), with redis-server's CPU
   beside the server's; --workers 2 against one process under the same unary
   load over 16 connections (no goal: the machine's cores are shared with the
   load generator); WatchOperation delivery (min_interval 0) from a report's
   send through process A to a watcher on process B, against a watcher on A at
   the same time (goal: p99 within 10 ms of it); Redis round trips per report,
   counted under MONITOR (goal: 1); Redis memory per retained finished
   operation. A --quick run leaves it out unless named with --only.
11. sse: Server-Sent Events (`--http-listen`, GET /v1/operations:watch) against
   WatchOperations on the same server process in the same run: N SSE clients
   and N gRPC watchers of one project of 100 changing operations, pacing off
   (minInterval=0 / min_interval 0), each side alone in its runs: states
   delivered/s over-driven, and ack-to-receipt p50/p99 with both paced at the
   same rate (half the lower ceiling); server RSS per idle SSE stream against
   per idle gRPC watcher, first, on the fresh process (N gRPC watchers opened,
   then N SSE clients beside them). The SSE clients are the load generator's, as the
   gRPC watchers are: raw asyncio connections (HTTP/1.1, one per client, as a
   browser's EventSource opens), each event's revision read from its `id:`,
   its JSON left unparsed. Ratios are SSE / gRPC.
12. dashboard: the browser dashboard (`/` on --http-listen) in Debian's
   Chromium (Playwright, headless, 1400x860) showing one project of 5,000
   operations (`#/?project=...`; the page's one SSE stream of every operation
   at the server's default pacing), in idle windows (no reports) and loaded
   ones (producers updating every operation once a second, 5,000 reports/s in
   BatchUpdateOperations of 1,000), alternated twice, 4 s each: frames/s, frame
   interval p99 and max (requestAnimationFrame in the page), long tasks
   (PerformanceObserver), the renderer main thread's time in tasks, script
   and on a core (CDP Performance.getMetrics), the JS heap (CDP), the table's
   rows in the page, the CPU of Chromium, the server and the machine, the
   producers' achieved rate, and once they stop, the seconds until every row
   in view shows its operation's last report. Ratios are loaded / idle (goal:
   frames/s at least 0.8x). Skipped, and not a failure, without Chromium
   (HEADWAY_CHROMIUM, default /usr/bin/chromium).

The machine's cores are shared: the load generator competes with the server
for CPU, so every run records both processes' CPU use (100 % = one core).

    .venv/bin/python bench/run.py [--quick] [--out DIR] [--only SECTION ...]

Writes DIR/results.json and DIR/results.md (default bench/results/) and prints
the table. Exits 1 when a section failed or timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from google.protobuf import duration_pb2, struct_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from redis import exceptions as redis_errors
from redis.asyncio.client import MonitorCommandInfo

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DEFAULT_OUT = BENCH / "results"
BARE_SERVICE = "headway.bench.Bare"
SECTIONS = (
    "ingest",
    "streamed_reports",
    "batched",
    "fanout",
    "slow_consumers",
    "memory",
    "admission",
    "scaling",
    "unrelated_watchers",
    "redis",
    "sse",
    "dashboard",
)
# What --quick runs without --only: tests/test_bench_quick.py checks this set.
QUICK_SECTIONS = tuple(name for name in SECTIONS if name != "redis")
NOT_IMPLEMENTED = "not implemented"
CHANNEL_OPTIONS = [
    # Every channel gets its own connection (grpc otherwise shares subchannels).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]
# Channels of the watchers that never read. Without BDP probing a client's
# transport stops taking data once the HTTP/2 windows (64 KiB) are full, as a
# stuck consumer's does; with it, grpc's client keeps growing the windows and
# buffers megabytes for a stream nobody reads, so within a run such a watcher
# costs the server as much as a reader and is not slow at all (measured: 3,000
# messages taken by each of them, against ~190 without probing).
NEVER_READING_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
PROJECT_OPS = 100
# Producer tasks (unpaced, the reports in flight). A project's operations are
# separate jobs, each with its own worker reporting one report at a time: one
# producer per operation, so a run flat out is bound by delivery, not by a few
# producers' round trips.
PROJECT_PRODUCERS = PROJECT_OPS
FANOUT_PRODUCERS = 4
# Watchers whose receipts are kept for latency (all of them are counted).
LATENCY_SAMPLE = 100
# Of those, watchers whose view lag is computed (each one against every report).
LAG_SAMPLE = 20
# Seconds a fan-out run's producers get, once it is over, for the reports in flight.
PRODUCER_GRACE = 2.0
# Rate for the slow-consumer runs when the fan-out section gave none.
DEFAULT_SLOW_RATE = 200.0
# Reports per BatchUpdateOperations call measured (the server takes at most 1000).
BATCH_SIZES = (1, 10, 100, 1000)
# Unary UpdateOperation calls in flight in the batched section's baseline, as in ingest.
UNARY_IN_FLIGHT = 64
# A watch's min_interval for "pacing off": explicitly 0 (every state). Its
# presence matters: unset means the server's default pacing (--watch-min-interval).
UNPACED = duration_pb2.Duration()
# The producer's rate beside watchers of other projects (issue 15's table).
UNRELATED_RATE = 100.0


@dataclass(frozen=True)
class Sizes:
    mode: str
    duration: float  # measured seconds per run
    warmup: float
    watchers: int  # fan-out and slow-consumer watchers
    watcher_channels: int
    slow_duration: float
    idle_watchers: int
    retained_ops: int
    admission_streams: int
    admission_channels: int
    scaling_points: tuple[int, ...]
    scaling_duration: float
    # Watchers of other projects beside one paced producer; the first is the
    # reference the others are compared with.
    unrelated_watchers: tuple[int, ...]
    unrelated_channels: int
    # Measured seconds per run, and as long again with no reports. At the
    # server's default bookmark interval (60 s) a window holds a bookmark from
    # a sixth of the watchers at most.
    unrelated_duration: float
    batch_operations: int
    batch_duration: float  # measured seconds per batched/unary run
    section_timeout: float
    total_limit: float
    # The Redis section: seconds per run, operations reported into, reports
    # counted for round trips, seconds of watch delivery, operations retained.
    redis_duration: float
    redis_operations: int
    redis_round_trip_reports: int
    redis_watch_duration: float
    redis_retained_ops: int
    # The SSE section: clients of each kind (SSE, gRPC), seconds per run, and
    # rounds of the over-driven SSE and gRPC runs alternated (one in a full
    # run: the section's 1,000 SSE clients are opened four times, each with a
    # snapshot of the project, and the section is kept to about 40 s).
    sse_clients: int
    sse_duration: float
    sse_repeats: int
    # The dashboard section: operations in the project the page shows,
    # seconds per measured window, and rounds of an idle window then a loaded one.
    dashboard_operations: int
    dashboard_window: float
    dashboard_rounds: int
    # Headway and bare runs alternated this many times for the headline ratios;
    # each side's median run is reported (other tenants of a shared machine
    # move single runs by ±30 %).
    repeats: int = 1
    # The sections a run without --only runs.
    sections: tuple[str, ...] = SECTIONS


QUICK = Sizes(
    mode="quick",
    duration=0.8,
    warmup=0.2,
    watchers=50,
    watcher_channels=4,
    slow_duration=1.2,
    idle_watchers=200,
    retained_ops=400,
    admission_streams=500,
    admission_channels=4,
    scaling_points=(1, 10),
    scaling_duration=0.5,
    unrelated_watchers=(10, 200),
    unrelated_channels=4,
    unrelated_duration=0.5,
    batch_operations=1000,
    batch_duration=0.8,
    section_timeout=40.0,
    # About 85 s (the dashboard section ~11 s of it); tests/test_bench_quick.py
    # gives the run 135 s.
    total_limit=120.0,
    redis_duration=0.5,
    redis_operations=200,
    redis_round_trip_reports=100,
    redis_watch_duration=1.0,
    redis_retained_ops=100,
    sse_clients=50,
    sse_duration=0.8,
    sse_repeats=1,
    dashboard_operations=500,
    dashboard_window=2.0,
    dashboard_rounds=1,
    sections=QUICK_SECTIONS,
)
FULL = Sizes(
    mode="full",
    duration=5.0,
    warmup=0.5,
    watchers=1000,
    watcher_channels=8,
    slow_duration=12.0,
    idle_watchers=2000,
    retained_ops=10_000,
    admission_streams=10_000,
    admission_channels=16,
    scaling_points=(1, 10, 100, 1000),
    scaling_duration=2.0,
    unrelated_watchers=(10, 1000, 10_000),
    # 400 streams per connection, as an HTTP/2 client would spread them.
    unrelated_channels=25,
    unrelated_duration=10.0,
    batch_operations=1000,
    batch_duration=3.0,
    section_timeout=240.0,
    # A full run takes about 10 minutes: 550 s before the sse section, which
    # adds 35-45 s, then the dashboard section's 26-30 s; 631 s in all with
    # other tenants' tests on the machine before the dashboard section, so
    # ~660 s with it, and the watchdog leaves room for such a neighbour.
    total_limit=740.0,
    redis_duration=1.0,
    redis_operations=1000,
    redis_round_trip_reports=500,
    redis_watch_duration=3.0,
    redis_retained_ops=1000,
    sse_clients=1000,
    sse_duration=3.0,
    sse_repeats=1,
    dashboard_operations=5000,
    dashboard_window=4.0,
    dashboard_rounds=2,
    repeats=3,
)

Json = dict[str, Any]


# --------------------------------------------------------------------------
# Processes


_children: list[subprocess.Popen[bytes]] = []


def _kill_children() -> None:
    for proc in list(_children):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
        with contextlib.suppress(Exception):
            proc.wait(timeout=2)
    _children.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based), counted from after "(comm)".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server run as a child process on 127.0.0.1, with its RSS and CPU time."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _children.append(self.proc)

    async def ready(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        async with grpc.aio.insecure_channel(self.address) as channel:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready after {limit:.0f}s")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(channel.channel_ready(), 0.5)
                    return

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc in _children:
            _children.remove(self.proc)


def channel(address: str, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=options)


class Servers:
    """A fresh Headway server and a fresh bare server, each with a producer channel."""

    def __init__(self, log_dir: Path) -> None:
        hport, bport = free_port(), free_port()
        self.headway = ServerProcess(
            "headway",
            [
                sys.executable,
                "-m",
                "headway_server",
                "serve",
                "--listen",
                f"127.0.0.1:{hport}",
                "--log-level",
                "WARNING",
            ],
            hport,
            log_dir,
        )
        self.bare = ServerProcess(
            "bare",
            [sys.executable, str(BENCH / "bare_server.py"), "--port", str(bport)],
            bport,
            log_dir,
        )
        self._channels: list[grpc.aio.Channel] = []

    async def __aenter__(self) -> Servers:
        self.headway.start()
        self.bare.start()
        await asyncio.gather(self.headway.ready(), self.bare.ready())
        self.hchannel = self.channel(self.headway)
        self.bchannel = self.channel(self.bare)
        self.stub = pb_grpc.ProgressTrackerStub(self.hchannel)
        self.echo = bare_echo(self.bchannel)
        self.publish = self.bchannel.unary_unary(
            f"/{BARE_SERVICE}/Publish", request_serializer=None, response_deserializer=None
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ch in self._channels:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.close(None), 5)
        self.headway.stop()
        self.bare.stop()

    def channel(
        self, server: ServerProcess, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
    ) -> grpc.aio.Channel:
        ch = channel(server.address, options)
        self._channels.append(ch)
        return ch

    def channels(
        self,
        server: ServerProcess,
        count: int,
        options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    ) -> list[grpc.aio.Channel]:
        return [self.channel(server, options) for _ in range(count)]


def bare_echo(ch: grpc.aio.Channel) -> Any:
    # The client does what it does against Headway: serialize an
    # UpdateOperationRequest, parse an UpdateOperationResponse.
    return ch.unary_unary(
        f"/{BARE_SERVICE}/Echo",
        request_serializer=pb.UpdateOperationRequest.SerializeToString,
        response_deserializer=pb.UpdateOperationResponse.FromString,
    )


class CpuMeter:
    """Server and load-generator CPU over a run, as % of one core."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.wall = time.perf_counter()
        self.server_cpu = server.cpu_seconds()
        self.load_cpu = time.process_time()

    def result(self, items: int = 0) -> Json:
        """CPU shares; with `items`, also the server's CPU microseconds per item, a
        figure the load generator's own CPU use does not bound."""
        wall = max(time.perf_counter() - self.wall, 1e-9)
        server = self.server.cpu_seconds() - self.server_cpu
        out: Json = {
            "server_cpu_s": round(server, 3),
            "server_cpu_pct": round(100 * server / wall, 1),
            "loadgen_cpu_pct": round(100 * (time.process_time() - self.load_cpu) / wall, 1),
        }
        if items:
            out["server_cpu_us_per_item"] = round(1e6 * server / items, 1)
        return out


# --------------------------------------------------------------------------
# Helpers


def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


class StreamFailed(Exception):
    """A watcher of the bench's own making (not a grpc call) ended in error:
    `code` says how (an HTTP status line, a socket error's name)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def rpc_code(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, StreamFailed):
        return exc.code
    return type(exc).__name__


async def bounded_gather(coros: Sequence[Awaitable[Any]], limit: int) -> list[Any]:
    """Awaits `coros`, at most `limit` at once. Pass coroutines: a grpc.aio call
    starts when it is made, so a list of calls would all be in flight at once."""
    gate = asyncio.Semaphore(limit)

    async def one(coro: Awaitable[Any]) -> Any:
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def alternate(
    runs: Sequence[Callable[[], Awaitable[Json]]], repeats: int, key: str
) -> list[Json]:
    """Runs each of `runs` in turn, `repeats` rounds; returns each one's median
    run by `key`, with every round's figure under "repeats"."""
    results: list[list[Json]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results, strict=True):
            out.append(await run())
    medians = []
    for out in results:
        chosen = dict(sorted(out, key=lambda r: float(r.get(key) or 0.0))[len(out) // 2])
        chosen["repeats"] = [r.get(key) for r in out]
        medians.append(chosen)
    return medians


async def start_ops(stub: Any, prefix: str, count: int, project: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]

    async def start(op_id: str) -> None:
        await stub.StartOperation(
            pb.StartOperationRequest(
                operation_id=op_id,
                kind="bench",
                project=project,
                # Large enough never to be reached, small enough that the
                # ETA stays a valid Timestamp.
                total=10**7,
                unit="items",
                labels={"team": "bench"},
            )
        )

    await bounded_gather([start(op_id) for op_id in ids], 64)
    return ids


def report(op_id: str, sequence: int, completed: int) -> pb.UpdateOperationRequest:
    """A typical progress report: a count, a counter delta and a message."""
    return pb.UpdateOperationRequest(
        operation_id=op_id,
        sequence=sequence,
        completed=completed,
        counters={"items": 1},
        message=f"item {completed}",
    )


# --------------------------------------------------------------------------
# 1. Unary ingest


async def run_ingest(
    call: Callable[[pb.UpdateOperationRequest], Awaitable[Any]],
    op_ids: Sequence[str],
    in_flight: int,
    duration: float,
    warmup: float,
    server: ServerProcess,
    sequences: dict[str, int] | None = None,
) -> Json:
    """`in_flight` tasks call as fast as they can; with at least as many operations
    as tasks each task owns its operations (sequences), else they share them
    (sequence 0, completed rising). `sequences` carries each operation's last
    sequence from run to run: a run that started again at 1 would be sending
    duplicates, which the server acknowledges without applying (a cheaper path)."""
    owned = len(op_ids) >= in_flight
    sequences = {} if sequences is None else sequences
    counts = [sequences.get(op_id, 0) for op_id in op_ids]
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    measuring = False
    stop = False

    async def worker(w: int) -> None:
        mine = list(range(w, len(op_ids), in_flight)) if owned else [w % len(op_ids)]
        for i in itertools.cycle(mine):
            if stop:
                return
            counts[i] += 1
            request = report(op_ids[i], counts[i] if owned else 0, counts[i])
            started = time.perf_counter()
            try:
                await call(request)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(worker(w)) for w in range(in_flight)]
    try:
        await asyncio.sleep(warmup)
        meter = CpuMeter(server)
        measuring = True
        await asyncio.sleep(duration)
        measuring = False
        cpu = meter.result(len(latencies))
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        sequences.update(zip(op_ids, counts, strict=True))
    return {
        "in_flight": in_flight,
        "operations": len(op_ids),
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / duration, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "errors": dict(errors),
        **cpu,
    }


async def section_ingest(sizes: Sizes, log_dir: Path) -> Json:
    out: Json = {"runs": {}}
    async with Servers(log_dir) as s:
        ops = await start_ops(s.stub, "ingest", 64, "bench-ingest")
        sequences: dict[str, int] = {}  # carried over runs: no duplicates
        for in_flight in (32, 64):
            h, b = await alternate(
                [
                    functools.partial(
                        run_ingest,
                        s.stub.UpdateOperation,
                        ops[:in_flight],
                        in_flight,
                        sizes.duration,
                        sizes.warmup,
                        s.headway,
                        sequences,
                    ),
                    functools.partial(
                        run_ingest,
                        s.echo,
                        ops[:in_flight],
                        in_flight,
                        sizes.duration,
                        sizes.warmup,
                        s.bare,
                    ),
                ],
                sizes.repeats,
                "calls_per_s",
            )
            out["runs"][str(in_flight)] = {
                "headway": h,
                "bare": b,
                "ratio": ratio(h["calls_per_s"], b["calls_per_s"]),
            }
    return out


# --------------------------------------------------------------------------
# 2. Streamed reports


async def run_streamed(
    open_call: Callable[..., Any],
    op_ids: Sequence[str],
    window: int,
    duration: float,
    warmup: float,
    server: ServerProcess,
) -> Json:
    """One stream per operation, each keeping `window` reports unacknowledged."""
    # Probe first: a server without the RPC answers UNIMPLEMENTED.
    probe = open_call()
    try:
        await probe.write(report(op_ids[0], 1, 1))
        await asyncio.wait_for(probe.read(), 10)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return {"status": NOT_IMPLEMENTED, "detail": exc.details()}
        raise
    finally:
        probe.cancel()

    acks = 0
    rejected = 0
    latencies: list[float] = []
    measuring = False
    stop = False
    errors: Counter[str] = Counter()

    async def producer(op_id: str) -> None:
        nonlocal acks, rejected
        call = open_call()
        gate = asyncio.Semaphore(window)
        sent: deque[float] = deque()

        async def writer() -> None:
            sequence = 1  # the probe used 1 on the first operation
            while not stop:
                await gate.acquire()
                sequence += 1
                sent.append(time.perf_counter())
                await call.write(report(op_id, sequence, sequence))
            await call.done_writing()

        async def reader() -> None:
            nonlocal acks, rejected
            async for ack in call:
                gate.release()
                started = sent.popleft()
                if measuring:
                    acks += 1
                    latencies.append(time.perf_counter() - started)
                    if getattr(ack, "error_code", 0):
                        rejected += 1

        tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
        try:
            await asyncio.gather(*tasks)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        finally:
            for task in tasks:
                task.cancel()
            call.cancel()

    tasks = [asyncio.create_task(producer(op_id)) for op_id in op_ids]
    try:
        await asyncio.sleep(warmup)
        meter = CpuMeter(server)
        measuring = True
        await asyncio.sleep(duration)
        measuring = False
        cpu = meter.result(acks)
    finally:
        stop = True
        _, pending = await asyncio.wait(tasks, timeout=5)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "status": "ok",
        "streams": len(op_ids),
        "window": window,
        "reports_per_s": round(acks / duration, 1),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "rejected": rejected,
        "errors": dict(errors),
        **cpu,
    }


async def section_streamed(sizes: Sizes, log_dir: Path, unary_rate: float | None) -> Json:
    streams, window = 4, 64
    async with Servers(log_dir) as s:
        ops = await start_ops(s.stub, "stream", streams, "bench-stream")
        if unary_rate is None:
            unary = await run_ingest(
                s.stub.UpdateOperation, ops, 64, sizes.duration, sizes.warmup, s.headway
            )
            unary_rate = unary["calls_per_s"]
        bare_stream = s.bchannel.stream_stream(
            f"/{BARE_SERVICE}/EchoStream",
            request_serializer=pb.UpdateOperationRequest.SerializeToString,
            response_deserializer=pb.UpdateOperationResponse.FromString,
        )
        b = await run_streamed(bare_stream, ops, window, sizes.duration, sizes.warmup, s.bare)
        ops2 = await start_ops(s.stub, "stream2", streams, "bench-stream")
        h = await run_streamed(
            s.stub.ReportProgress, ops2, window, sizes.duration, sizes.warmup, s.headway
        )
    out: Json = {
        "streams": streams,
        "window": window,
        "unary_update_calls_per_s": unary_rate,
        "headway": h,
        "bare_bidi_echo": b,
    }
    if h["status"] == NOT_IMPLEMENTED:
        out["status"] = NOT_IMPLEMENTED
    else:
        out["ratio_vs_unary"] = ratio(h["reports_per_s"], unary_rate)
        out["ratio_vs_bare_bidi"] = ratio(h["reports_per_s"], b["reports_per_s"])
    return out


# --------------------------------------------------------------------------
# 3. Batched reports

# Sends a list of reports in one call; returns how many were rejected and how
# many acknowledged as not applied (a duplicate sequence).
SendReports = Callable[[list[pb.UpdateOperationRequest]], Awaitable[tuple[int, int]]]


def unary_sender(stub: Any) -> SendReports:
    async def send(reports: list[pb.UpdateOperationRequest]) -> tuple[int, int]:
        (request,) = reports
        ack = await stub.UpdateOperation(request)
        return 0, 0 if ack.applied else 1

    return send


def batch_sender(call: Any) -> SendReports:
    async def send(reports: list[pb.UpdateOperationRequest]) -> tuple[int, int]:
        response = await call(pb.BatchUpdateOperationsRequest(updates=reports))
        if len(response.results) != len(reports):
            raise RuntimeError(f"{len(response.results)} acks for {len(reports)} reports")
        rejected = not_applied = 0
        for ack in response.results:
            if ack.error_code:
                rejected += 1
            elif not ack.result.applied:
                not_applied += 1
        return rejected, not_applied

    return send


def batch_in_flight(batch: int) -> int:
    """Calls in flight for a batch size: about 64 reports, and at least 2 calls so
    the server has the next one while it answers the last."""
    return max(2, min(UNARY_IN_FLIGHT, UNARY_IN_FLIGHT // batch))


async def run_reports(
    send: SendReports,
    op_ids: Sequence[str],
    sequences: dict[str, int],
    *,
    batch: int,
    in_flight: int,
    duration: float,
    warmup: float,
    server: ServerProcess,
    acks: Counter[str],
) -> Json:
    """`in_flight` tasks send calls of `batch` reports as fast as they can. Each
    task owns its operations (so reports of one operation are never in two calls
    at once) and cycles over them, each report advancing `completed` with the
    operation's next sequence (`sequences` carries on across runs). Every ack,
    warm-up included, is counted into `acks` (rejected, not_applied, failed_calls)."""
    reports = calls = rejected = not_applied = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    measuring = False
    stop = False

    async def worker(w: int) -> None:
        nonlocal reports, calls, rejected, not_applied
        mine = itertools.cycle(op_ids[w::in_flight])
        while not stop:
            requests = []
            for _ in range(batch):
                op_id = next(mine)
                sequences[op_id] += 1
                requests.append(report(op_id, sequences[op_id], sequences[op_id]))
            started = time.perf_counter()
            try:
                bad, stale = await send(requests)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                acks["failed_calls"] += 1
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
                continue
            acks["reports"] += len(requests)
            acks["rejected"] += bad
            acks["not_applied"] += stale
            if measuring:
                rejected += bad
                not_applied += stale
                calls += 1
                reports += len(requests)
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(worker(w)) for w in range(in_flight)]
    try:
        await asyncio.sleep(warmup)
        meter = CpuMeter(server)
        measuring = True
        await asyncio.sleep(duration)
        measuring = False
        cpu = meter.result(reports)
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    return {
        "batch": batch,
        "in_flight": in_flight,
        "operations": len(op_ids),
        "calls": calls,
        "reports": reports,
        "reports_per_s": round(reports / duration, 1),
        "call_p50_ms": ms(percentile(latencies, 50)),
        "call_p99_ms": ms(percentile(latencies, 99)),
        "rejected": rejected,
        "not_applied": not_applied,
        "errors": dict(errors),
        **cpu,
    }


async def section_batched(sizes: Sizes, log_dir: Path) -> Json:
    async with Servers(log_dir) as s:
        ops = await start_ops(s.stub, "batch", sizes.batch_operations, "bench-batch")
        sequences = dict.fromkeys(ops, 0)
        batched = batch_sender(s.stub.BatchUpdateOperations)
        acks: Counter[str] = Counter()
        try:
            bad, stale = await batched([report(ops[0], 1, 1)])
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return {"status": NOT_IMPLEMENTED, "detail": exc.details()}
            raise
        sequences[ops[0]] = 1
        acks.update(reports=1, rejected=bad, not_applied=stale)

        def measure(send: SendReports, batch: int, in_flight: int, server: ServerProcess) -> Any:
            return functools.partial(
                run_reports,
                send,
                ops,
                sequences,
                batch=batch,
                in_flight=in_flight,
                duration=sizes.batch_duration,
                warmup=sizes.warmup,
                server=server,
                acks=acks if server is s.headway else Counter(),
            )

        unary, *runs = await alternate(
            [
                measure(unary_sender(s.stub), 1, UNARY_IN_FLIGHT, s.headway),
                *(measure(batched, b, batch_in_flight(b), s.headway) for b in BATCH_SIZES),
            ],
            sizes.repeats,
            "reports_per_s",
        )
        bare_call = s.bchannel.unary_unary(
            f"/{BARE_SERVICE}/EchoBatch",
            request_serializer=pb.BatchUpdateOperationsRequest.SerializeToString,
            response_deserializer=pb.BatchUpdateOperationsResponse.FromString,
        )
        bare = {
            str(b): await measure(batch_sender(bare_call), b, batch_in_flight(b), s.bare)()
            for b in BATCH_SIZES
            if b >= 100
        }
    unary_us = unary.get("server_cpu_us_per_item")
    return {
        "operations": len(ops),
        "unary": unary,
        "batches": {
            str(b): {
                "headway": run,
                "ratio_vs_unary": ratio(run["reports_per_s"], unary["reports_per_s"]),
                "cpu_ratio_unary_vs_batch": ratio(unary_us, run.get("server_cpu_us_per_item")),
            }
            for b, run in zip(BATCH_SIZES, runs, strict=True)
        },
        "bare_batch_echo": {
            n: {
                "bare": run,
                "ratio": ratio(
                    runs[BATCH_SIZES.index(int(n))]["reports_per_s"], run["reports_per_s"]
                ),
            }
            for n, run in bare.items()
        },
        # Over every Headway call, warm-up and all repeats included: all but
        # reports_checked must be 0.
        "reports_checked": acks["reports"],
        "rejected": acks["rejected"],
        "not_applied": acks["not_applied"],
        "failed_calls": acks["failed_calls"],
    }


# --------------------------------------------------------------------------
# 4, 5, 8. Fan-out

# A watcher: its first item says it is admitted and synced; then one list per
# message of the revisions of the operation states it carried.
OpenStream = Callable[[int], AsyncGenerator[list[int], None]]
# A producer task's next report: returns the operation it was about (any key
# that names it) and the acknowledged revision.
Produce = Callable[[int], Awaitable[tuple[str, int]]]


@dataclass
class Fanout:
    open_stream: OpenStream
    produce: Produce
    producers: int
    # Opens a watcher that never reads; returns the call (to cancel).
    open_idle: Callable[[int], Any] | None = None


def headway_operation_fanout(
    stub: Any,
    watch_stubs: Sequence[Any],
    op_id: str,
    *,
    min_interval: duration_pb2.Duration | None,
) -> Fanout:
    """Watchers of one operation; `min_interval` None = the server's default pacing,
    UNPACED = every state."""
    completed = 0
    request = pb.WatchOperationRequest(operation_id=op_id)
    if min_interval is not None:
        request.min_interval.CopyFrom(min_interval)

    async def open_stream(i: int) -> AsyncGenerator[list[int], None]:
        call = watch_stubs[i % len(watch_stubs)].WatchOperation(request)
        try:
            first = True
            async for event in call:
                if first:
                    first = False
                    yield []
                elif event.type == pb.OperationEvent.CHANGED:
                    yield [event.revision]
        finally:
            call.cancel()

    async def produce(w: int) -> tuple[str, int]:
        # Several producers share the operation: no sequence, completed rising.
        nonlocal completed
        completed += 1
        ack = await stub.UpdateOperation(report(op_id, 0, completed))
        return op_id, int(ack.revision)

    return Fanout(open_stream, produce, producers=FANOUT_PRODUCERS)


def headway_project_fanout(
    stub: Any,
    watch_stubs: Sequence[Any],
    project: str,
    op_ids: Sequence[str],
    idle_stubs: Sequence[Any] = (),
    *,
    min_interval: duration_pb2.Duration | None,
) -> Fanout:
    """Watchers of a project's operations; `min_interval` as for
    headway_operation_fanout."""
    counts = dict.fromkeys(op_ids, 0)
    owned = [itertools.cycle(op_ids[w::PROJECT_PRODUCERS]) for w in range(PROJECT_PRODUCERS)]
    request = pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project))
    if min_interval is not None:
        request.min_interval.CopyFrom(min_interval)

    async def open_stream(i: int) -> AsyncGenerator[list[int], None]:
        call = watch_stubs[i % len(watch_stubs)].WatchOperations(request)
        try:
            synced = False
            async for response in call:
                if not synced:
                    if any(e.type == pb.OperationEvent.SYNCED for e in response.events):
                        synced = True
                        yield []
                    continue
                yield [e.revision for e in response.events if e.type == pb.OperationEvent.CHANGED]
        finally:
            call.cancel()

    def open_idle(i: int) -> Any:
        # Never-reading watchers are other clients: on their own connections.
        stubs = idle_stubs or watch_stubs
        return stubs[i % len(stubs)].WatchOperations(request)

    async def produce(w: int) -> tuple[str, int]:
        op_id = next(owned[w % PROJECT_PRODUCERS])
        counts[op_id] += 1
        ack = await stub.UpdateOperation(report(op_id, counts[op_id], counts[op_id]))
        return op_id, int(ack.revision)

    return Fanout(open_stream, produce, producers=PROJECT_PRODUCERS, open_idle=open_idle)


def bare_fanout(publish: Any, channels: Sequence[grpc.aio.Channel], template: bytes) -> Fanout:
    """Every subscriber gets every published message: an OperationEvent as
    WatchOperation sends it, its revision the publish number."""
    subscribes = [
        ch.unary_stream(
            f"/{BARE_SERVICE}/Subscribe",
            request_serializer=None,
            response_deserializer=pb.OperationEvent.FromString,
        )
        for ch in channels
    ]
    hello = pb.OperationEvent(type=pb.OperationEvent.SYNCED, revision=1).SerializeToString()
    event = pb.OperationEvent.FromString(template)
    sequence = 0

    async def open_stream(i: int) -> AsyncGenerator[list[int], None]:
        call = subscribes[i % len(subscribes)](hello)
        try:
            first = True
            async for message in call:
                if first:
                    first = False
                    yield []
                else:
                    yield [message.revision]
        finally:
            call.cancel()

    def open_idle(i: int) -> Any:
        return subscribes[i % len(subscribes)](hello)

    async def produce(w: int) -> tuple[str, int]:
        nonlocal sequence
        sequence += 1
        revision = sequence
        event.revision = revision
        await publish(event.SerializeToString())
        return "", revision

    return Fanout(open_stream, produce, producers=FANOUT_PRODUCERS, open_idle=open_idle)


async def run_fanout(
    fan: Fanout,
    readers: int,
    *,
    rate: float | None,
    duration: float,
    warmup: float,
    server: ServerProcess,
    idle: int = 0,
    sample_rss: bool = False,
) -> Json:
    """`readers` watchers read everything; `idle` more never read. The producer
    runs flat out (rate None) or paced at `rate` reports/s.

    Two latencies: ack→receipt, for each state a watcher received, from its
    report's ack; and ack→view, for each report acknowledged, until a watcher
    received that state or a later one of the same operation. They agree when
    watchers get every state; when states are skipped (pacing, or a watcher
    behind), ack→receipt counts only the states that made it, and ack→view is
    how stale a watcher's view gets."""
    acked: dict[int, tuple[str, float]] = {}
    # The sampled watchers' receipts, each its own list of (revision, time).
    receipts: list[list[tuple[int, float]]] = [[] for _ in range(min(readers, LATENCY_SAMPLE))]
    delivered = 0
    messages = 0
    produced = 0
    skipped = 0
    measuring = False
    stop = False
    ready = 0
    all_ready = asyncio.Event()
    errors: Counter[str] = Counter()
    failed_early: list[str] = []

    idle_calls = [fan.open_idle(i) for i in range(idle)] if idle and fan.open_idle else []

    async def reader(i: int) -> None:
        nonlocal delivered, messages, ready
        sample = i < LATENCY_SAMPLE
        stream = fan.open_stream(i)
        first = True
        try:
            async for revisions in stream:
                if first:
                    first = False
                    ready += 1
                    if ready == readers:
                        all_ready.set()
                    continue
                if measuring and revisions:
                    messages += 1
                    delivered += len(revisions)
                    if sample:
                        now = time.perf_counter()
                        receipts[i].extend((r, now) for r in revisions)
            ended = "stream ended"
        except grpc.aio.AioRpcError as exc:
            ended = f"{exc.code().name}: {exc.details()}"
        except StreamFailed as exc:
            ended = str(exc)
        finally:
            await stream.aclose()
        # Only cancellation ends a reader normally: anything else is an error.
        errors[ended.split(":")[0]] += 1
        if first:
            failed_early.append(ended)
            all_ready.set()

    async def one_report(w: int) -> bool:
        nonlocal produced
        try:
            key, revision = await fan.produce(w)
        except grpc.aio.AioRpcError as exc:
            errors["producer " + exc.code().name] += 1
            return False
        acked[revision] = (key, time.perf_counter())
        if measuring:
            produced += 1
        return True

    async def flat_out(w: int) -> None:
        """Closed loop: one report after another."""
        while not stop:
            if not await one_report(w):
                await asyncio.sleep(0.01)

    async def paced(rate: float) -> None:
        """Open loop: a report every 1/rate s whatever the answers' latency
        (at most 4 per producer in flight; beyond that a report is skipped).
        Reports this load generator's own loop was too busy to send on time go
        out as soon as it can: its stalls are not the server's doing."""
        nonlocal skipped
        pending: set[asyncio.Task[bool]] = set()
        next_at = time.perf_counter()
        for i in itertools.count():
            if stop:
                break
            next_at += 1 / rate
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) >= 4 * fan.producers:
                skipped += 1
                continue
            task = asyncio.create_task(one_report(i % fan.producers))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending, return_exceptions=True)

    reader_tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    producer_tasks: list[asyncio.Task[None]] = []
    rss: list[tuple[float, int]] = []
    try:
        started = time.perf_counter()
        await asyncio.wait_for(all_ready.wait(), 30 + readers / 50)
        if failed_early:
            raise RuntimeError(f"{len(failed_early)} watchers failed, first: {failed_early[0]}")
        admitted_s = time.perf_counter() - started
        await asyncio.sleep(0.2)  # let idle watchers fill their windows
        producer_tasks = (
            [asyncio.create_task(paced(rate))]
            if rate
            else [asyncio.create_task(flat_out(w)) for w in range(fan.producers)]
        )
        await asyncio.sleep(warmup)
        meter = CpuMeter(server)
        t0 = time.perf_counter()
        measuring = True
        while (now := time.perf_counter()) < t0 + duration:
            if sample_rss:
                rss.append((round(now - t0, 3), server.rss()))
            await asyncio.sleep(min(0.25, t0 + duration - now))
        measuring = False
        cpu = meter.result(delivered)
        if sample_rss:
            rss.append((round(time.perf_counter() - t0, 3), server.rss()))
    finally:
        stop = True
        if producer_tasks:
            # The reports in flight, answered or, from a server far behind (an
            # over-driven SSE run's), abandoned: they would keep the run going.
            _, late = await asyncio.wait(producer_tasks, timeout=PRODUCER_GRACE)
            for task in late:
                task.cancel()
        await asyncio.gather(*producer_tasks, return_exceptions=True)
        for task in reader_tasks:
            task.cancel()
        await asyncio.gather(*reader_tasks, return_exceptions=True)
        for call in idle_calls:
            call.cancel()
    latencies = [max(0.0, t - acked[r][1]) for mine in receipts for r, t in mine if r in acked]
    # Reports acknowledged this long before the end may not be seen yet: left out.
    grace = min(1.0, duration / 4)
    lags, unseen = view_lags(acked, receipts[:LAG_SAMPLE], t0, t0 + duration - grace)
    out: Json = {
        "readers": readers,
        "idle": idle,
        "target_rate": rate,
        "producer_reports_per_s": round(produced / duration, 1),
        "producer_skipped": skipped,
        "states_delivered_per_s": round(delivered / duration, 1),
        "states_per_watcher_per_s": round(delivered / duration / readers, 1),
        "messages_per_s": round(messages / duration, 1),
        "states_per_message": round(delivered / messages, 2) if messages else None,
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "latency_samples": len(latencies),
        "view_p50_ms": ms(percentile(lags, 50)),
        "view_p99_ms": ms(percentile(lags, 99)),
        "view_samples": len(lags),
        # Reports of the window a sampled watcher never saw (nor anything newer).
        "view_unseen": unseen,
        "admitted_s": round(admitted_s, 3),
        "errors": dict(errors),
        **cpu,
        # Everything the server did (ingest and delivery) per report taken in.
        "server_cpu_us_per_report": (
            round(1e6 * cpu["server_cpu_s"] / produced, 1) if produced else None
        ),
    }
    if sample_rss:
        out["rss_bytes"] = rss
    return out


def view_lags(
    acked: dict[int, tuple[str, float]],
    receipts: Sequence[Sequence[tuple[int, float]]],
    start: float,
    end: float,
) -> tuple[list[float], int]:
    """For each report acknowledged between `start` and `end` and each watcher's
    receipts: the time from its ack until that watcher received its state or a
    later one of the same operation. Returns those lags and how many were never
    seen."""
    reports = [(key, r, t) for r, (key, t) in acked.items() if start <= t <= end]
    lags: list[float] = []
    unseen = 0
    for mine in receipts:
        # Per operation, its revisions as received (rising) and when.
        seen: dict[str, tuple[list[int], list[float]]] = {}
        for r, t in mine:
            if r not in acked:
                continue
            revisions, times = seen.setdefault(acked[r][0], ([], []))
            if not revisions or r > revisions[-1]:
                revisions.append(r)
                times.append(t)
        for key, r, t in reports:
            revisions, times = seen.get(key, ([], []))
            i = bisect.bisect_left(revisions, r)
            if i == len(revisions):
                unseen += 1
            else:
                lags.append(max(0.0, times[i] - t))
    return lags, unseen


async def saturated(fan: Fanout, readers: int, sizes: Sizes, server: ServerProcess) -> Json:
    """Over-driven: the ceiling."""
    return await run_fanout(
        fan, readers, rate=None, duration=sizes.duration, warmup=sizes.warmup, server=server
    )


async def at_half_rate(
    fan: Fanout, readers: int, ceiling: Json, sizes: Sizes, server: ServerProcess
) -> Json:
    """Paced at half the ceiling, for latency."""
    half = max(1.0, 0.5 * ceiling["states_per_watcher_per_s"])
    return await run_fanout(
        fan, readers, rate=half, duration=sizes.duration, warmup=sizes.warmup, server=server
    )


async def typical_event(stub: Any, op_id: str) -> bytes:
    """A real Headway operation, as an OperationEvent: the bare fan-out's message."""
    op = await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))
    return pb.OperationEvent(
        type=pb.OperationEvent.CHANGED, revision=op.revision, operation=op
    ).SerializeToString()


async def section_fanout(sizes: Sizes, log_dir: Path) -> Json:
    n = sizes.watchers
    async with Servers(log_dir) as s:
        hwatch = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.watcher_channels)
        ]
        bwatch = s.channels(s.bare, sizes.watcher_channels)
        (single,) = await start_ops(s.stub, "fan-one", 1, "bench-fan-one")
        project_ops = await start_ops(s.stub, "fan-proj", PROJECT_OPS, "bench-fan")
        # The default-pacing runs have operations of their own: each fan-out
        # numbers its producers' reports from 1, and a repeated sequence is ignored.
        (single_paced,) = await start_ops(s.stub, "fan-one-paced", 1, "bench-fan-one-paced")
        paced_ops = await start_ops(s.stub, "fan-proj-paced", PROJECT_OPS, "bench-fan-paced")
        template = await typical_event(s.stub, single)
        # Pacing off (min_interval 0): the delivery capacity, against the bare ceiling.
        fans = [
            (headway_operation_fanout(s.stub, hwatch, single, min_interval=UNPACED), s.headway),
            (
                headway_project_fanout(
                    s.stub, hwatch, "bench-fan", project_ops, min_interval=UNPACED
                ),
                s.headway,
            ),
            (bare_fanout(s.publish, bwatch, template), s.bare),
        ]
        # The server's default pacing (min_interval unset): what a default user gets.
        paced_fans = [
            headway_operation_fanout(s.stub, hwatch, single_paced, min_interval=None),
            headway_project_fanout(s.stub, hwatch, "bench-fan-paced", paced_ops, min_interval=None),
        ]
        ceilings = await alternate(
            [
                *(functools.partial(saturated, fan, n, sizes, server) for fan, server in fans),
                *(functools.partial(saturated, fan, n, sizes, s.headway) for fan in paced_fans),
            ],
            sizes.repeats,
            "states_delivered_per_s",
        )
        one, project, bare = [
            {"saturated": ceiling, "half_rate": await at_half_rate(fan, n, ceiling, sizes, server)}
            for (fan, server), ceiling in zip(fans, ceilings[: len(fans)], strict=True)
        ]
        # At the rate the unpaced watchers had, for latency and CPU at equal load.
        one_paced, project_paced = [
            {
                "saturated": ceiling,
                "half_rate": await run_fanout(
                    fan,
                    n,
                    rate=unpaced["half_rate"]["target_rate"],
                    duration=sizes.duration,
                    warmup=sizes.warmup,
                    server=s.headway,
                ),
            }
            for fan, ceiling, unpaced in zip(
                paced_fans, ceilings[len(fans) :], (one, project), strict=True
            )
        ]
    bare_rate = bare["saturated"]["states_delivered_per_s"]
    return {
        "watchers": n,
        "project_operations": PROJECT_OPS,
        "message_bytes": len(template),
        "operation": one,
        "project": project,
        "bare": bare,
        "operation_paced": one_paced,
        "project_paced": project_paced,
        "operation_ratio": ratio(one["saturated"]["states_delivered_per_s"], bare_rate),
        "project_ratio": ratio(project["saturated"]["states_delivered_per_s"], bare_rate),
        "project_half_rate_reports_per_s": project["half_rate"]["target_rate"],
        # Default pacing against pacing off: server CPU at the same rate, and per
        # report taken in when the producers run flat out.
        "paced_cpu_ratio": {
            key: {
                "half_rate": ratio(
                    paced["half_rate"]["server_cpu_pct"], unpaced["half_rate"]["server_cpu_pct"]
                ),
                "flat_out_per_report": ratio(
                    paced["saturated"].get("server_cpu_us_per_report"),
                    unpaced["saturated"].get("server_cpu_us_per_report"),
                ),
            }
            for key, paced, unpaced in (
                ("operation", one_paced, one),
                ("project", project_paced, project),
            )
        },
    }


async def section_slow(sizes: Sizes, log_dir: Path, rate: float | None) -> Json:
    n = sizes.watchers
    slow = max(1, n // 10)
    readers = n - slow
    rate = rate or DEFAULT_SLOW_RATE
    async with Servers(log_dir) as s:
        hwatch = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.watcher_channels)
        ]
        ops = await start_ops(s.stub, "slow", PROJECT_OPS, "bench-slow")
        idle_stubs = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, 2, NEVER_READING_OPTIONS)
        ]
        # Default pacing, as a user's watchers get it.
        fan = headway_project_fanout(
            s.stub, hwatch, "bench-slow", ops, idle_stubs, min_interval=None
        )
        alone, mixed = await alternate(
            [
                functools.partial(
                    run_fanout,
                    fan,
                    readers,
                    idle=idle,
                    rate=rate,
                    duration=sizes.slow_duration,
                    warmup=sizes.warmup,
                    server=s.headway,
                    sample_rss=True,
                )
                for idle in (0, slow)
            ],
            sizes.repeats,
            "p99_ms",
        )

    def growth(run: Json) -> tuple[float, float]:
        rss = [b for _, b in run["rss_bytes"]]
        quarter = max(1, len(rss) // 4)
        return statistics.mean(rss[:quarter]), statistics.mean(rss[-quarter:])

    first, last = growth(mixed)
    alone_first, alone_last = growth(alone)
    return {
        "watchers": n,
        "never_read": slow,
        "pacing": "server default (min_interval unset)",
        "rate": rate,
        "without_slow": alone,
        "with_slow": mixed,
        "p99_ratio": ratio(mixed["p99_ms"], alone["p99_ms"]),
        "producer_ratio": ratio(mixed["producer_reports_per_s"], alone["producer_reports_per_s"]),
        "rss_first_quarter_bytes": round(first),
        "rss_last_quarter_bytes": round(last),
        "rss_growth": ratio(last - first, first),
        "rss_growth_without_slow": ratio(alone_last - alone_first, alone_first),
    }


async def section_scaling(sizes: Sizes, log_dir: Path) -> Json:
    ingest: Json = {}
    fanout: Json = {}
    duration, warmup = sizes.scaling_duration, sizes.warmup
    async with Servers(log_dir) as s:
        hwatch = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.watcher_channels)
        ]
        bwatch = s.channels(s.bare, sizes.watcher_channels)
        bare_ops = await start_ops(s.stub, "scale-bare", 32, "bench-scale")
        bare = await run_ingest(s.echo, bare_ops, 32, duration, warmup, s.bare)
        # A run thrown away first: a freshly started server's first window is
        # slower (the 1-operation point measured 0.38x with either code version),
        # and the bare server above is warm by now.
        warm_ops = await start_ops(s.stub, "scale-warm", 32, "bench-scale-warm")
        await run_ingest(s.stub.UpdateOperation, warm_ops, 32, duration, warmup, s.headway)
        for n in sizes.scaling_points:
            ops = await start_ops(s.stub, f"scale-{n}", n, f"bench-scale-{n}")
            h = await run_ingest(s.stub.UpdateOperation, ops, 32, duration, warmup, s.headway)
            ingest[str(n)] = {
                "headway": h,
                "bare_calls_per_s": bare["calls_per_s"],
                "ratio": ratio(h["calls_per_s"], bare["calls_per_s"]),
            }
        (single,) = await start_ops(s.stub, "scale-fan", 1, "bench-scale-fan")
        template = await typical_event(s.stub, single)
        for n in sizes.scaling_points:
            h = await run_fanout(
                headway_operation_fanout(s.stub, hwatch, single, min_interval=UNPACED),
                n,
                rate=None,
                duration=duration,
                warmup=warmup,
                server=s.headway,
            )
            b = await run_fanout(
                bare_fanout(s.publish, bwatch, template),
                n,
                rate=None,
                duration=duration,
                warmup=warmup,
                server=s.bare,
            )
            fanout[str(n)] = {
                "headway": h,
                "bare": b,
                "ratio": ratio(h["states_delivered_per_s"], b["states_delivered_per_s"]),
            }
    return {"in_flight": 32, "bare_ingest": bare, "ingest": ingest, "fanout": fanout}


# --------------------------------------------------------------------------
# 6. Memory, 7. Admission


async def open_synced(open_stream: OpenStream, indices: Sequence[int]) -> list[Any]:
    """Opens streams at once and waits for each one's first item; returns the
    open iterators (or the exception a stream failed with)."""

    async def one(i: int) -> Any:
        stream = open_stream(i)
        try:
            await anext(stream)
        except BaseException as exc:
            await stream.aclose()
            return exc
        return stream

    return await asyncio.gather(*(one(i) for i in indices))


async def close_streams(streams: Sequence[Any]) -> None:
    await asyncio.gather(
        *(s.aclose() for s in streams if not isinstance(s, BaseException)),
        return_exceptions=True,
    )


async def rss_per_stream(
    open_stream: OpenStream, indices: Sequence[int], server: ServerProcess
) -> tuple[list[Any], Json]:
    """Opens streams `indices` (each until its first item) and measures the
    server's RSS growth per stream; returns the streams, left open, and that."""
    before = server.rss()
    streams = await open_synced(open_stream, indices)
    await asyncio.sleep(0.5)
    after = server.rss()
    failed = sum(isinstance(s, BaseException) for s in streams)
    opened = len(streams) - failed
    return streams, {
        "watchers": opened,
        "failed": failed,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_watcher": round((after - before) / opened) if opened else None,
    }


async def idle_memory(open_stream: OpenStream, count: int, server: ServerProcess) -> Json:
    warm = await open_synced(open_stream, range(count // 10))
    await asyncio.sleep(0.5)
    streams, out = await rss_per_stream(
        open_stream, range(count // 10, count + count // 10), server
    )
    await close_streams([*warm, *streams])
    return out


async def finished_operation(stub: Any, op_id: str) -> None:
    """An operation with a typical payload, run to completion: started, three
    reports, completed."""
    details = struct_pb2.Struct()
    details.update({"repository": "acme/search", "branch": "main"})
    result = struct_pb2.Struct()
    result.update({"files": 1000, "symbols": 48000})
    await stub.StartOperation(
        pb.StartOperationRequest(
            operation_id=op_id,
            kind="github-ingest",
            project="acme",
            labels={"team": "search", "source": "github", "env": "prod"},
            total=1000,
            unit="files",
            stages=[
                pb.StageSpec(name="clone", weight=1),
                pb.StageSpec(name="index", weight=4),
                pb.StageSpec(name="embed", weight=2),
            ],
            heartbeat_timeout=duration_pb2.Duration(seconds=3600),
        )
    )
    updates = [
        pb.UpdateOperationRequest(stage="clone", stage_completed=1, stage_total=1),
        pb.UpdateOperationRequest(
            stage="index",
            stage_completed=500,
            stage_total=1000,
            completed=500,
            counters={"files": 500, "symbols": 24000},
            checkpoint="src/search/index/file-0500.py",
            message="indexing src/search/index",
            details=details,
        ),
        pb.UpdateOperationRequest(
            stage="embed",
            stage_completed=1000,
            stage_total=1000,
            completed=1000,
            counters={"files": 500, "symbols": 24000},
            checkpoint="src/search/index/file-1000.py",
            message="embedding",
        ),
    ]
    for sequence, update in enumerate(updates, 1):
        update.operation_id = op_id
        update.sequence = sequence
        await stub.UpdateOperation(update)
    await stub.CompleteOperation(
        pb.CompleteOperationRequest(
            operation_id=op_id, result=result, message="done", request_id=f"{op_id}-done"
        )
    )


async def retained_memory(stub: Any, count: int, server: ServerProcess) -> Json:
    """Operations with a typical payload, run to completion and retained."""
    warm = max(50, count // 10)
    await bounded_gather([finished_operation(stub, f"warm-{i}") for i in range(warm)], 32)
    await asyncio.sleep(0.3)
    before = server.rss()
    await bounded_gather([finished_operation(stub, f"retained-{i}") for i in range(count)], 32)
    await asyncio.sleep(0.3)
    after = server.rss()
    op = await stub.GetOperation(pb.GetOperationRequest(operation_id="retained-0"))
    return {
        "operations": count,
        "serialized_operation_bytes": op.ByteSize(),
        "rss_before": before,
        "rss_after": after,
        "bytes_per_operation": round((after - before) / count),
    }


async def section_memory(sizes: Sizes, log_dir: Path) -> Json:
    n = sizes.idle_watchers
    async with Servers(log_dir) as s:
        hwatch = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.watcher_channels)
        ]
        bwatch = s.channels(s.bare, sizes.watcher_channels)
        ops = await start_ops(s.stub, "idle", 1, "bench-idle")
        template = await typical_event(s.stub, ops[0])
        h = await idle_memory(
            headway_project_fanout(
                s.stub, hwatch, "bench-idle", ops, min_interval=None
            ).open_stream,
            n,
            s.headway,
        )
        b = await idle_memory(bare_fanout(s.publish, bwatch, template).open_stream, n, s.bare)
    async with Servers(log_dir) as s:
        retained = await retained_memory(s.stub, sizes.retained_ops, s.headway)
    return {
        "idle_watchers": {
            "headway": h,
            "bare": b,
            "ratio": ratio(h["bytes_per_watcher"], b["bytes_per_watcher"]),
        },
        "retained_operations": retained,
    }


async def admit(open_stream: OpenStream, count: int, limit: float) -> Json:
    started = time.perf_counter()
    streams = await asyncio.wait_for(open_synced(open_stream, range(count)), limit)
    elapsed = time.perf_counter() - started
    failures = Counter(rpc_code(s) for s in streams if isinstance(s, BaseException))
    await close_streams(streams)
    return {
        "streams": count,
        "admitted": count - sum(failures.values()),
        "cancelled": failures.get("CANCELLED", 0),
        "failures": dict(failures),
        "seconds_to_all_synced": round(elapsed, 3),
    }


async def section_admission(sizes: Sizes, log_dir: Path) -> Json:
    n = sizes.admission_streams
    timeout = sizes.section_timeout / 3
    async with Servers(log_dir) as s:
        hwatch = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.admission_channels)
        ]
        bwatch = s.channels(s.bare, sizes.admission_channels)
        ops = await start_ops(s.stub, "admit", 1, "bench-admit")
        template = await typical_event(s.stub, ops[0])
        h = await admit(
            headway_project_fanout(
                s.stub, hwatch, "bench-admit", ops, min_interval=None
            ).open_stream,
            n,
            timeout,
        )
        b = await admit(bare_fanout(s.publish, bwatch, template).open_stream, n, timeout)
    return {
        "channels": sizes.admission_channels,
        "headway": h,
        "bare": b,
        "ratio_time": ratio(h["seconds_to_all_synced"], b["seconds_to_all_synced"]),
    }


# --------------------------------------------------------------------------
# 9. Watchers of other projects


async def run_paced_reports(
    call: Callable[[pb.UpdateOperationRequest], Awaitable[Any]],
    op_id: str,
    *,
    rate: float,
    duration: float,
    warmup: float,
    server: ServerProcess,
) -> Json:
    """One producer of one operation, one report at a time, on a wall-clock
    schedule: report i is due at start + i/rate. A report that falls due while
    the one before is unanswered goes out as soon as that is answered, none is
    dropped, so the achieved rate falls short of `rate` only when the server
    answers slower than 1/rate on average."""
    reports = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    measuring = False
    stop = False
    behind = 0.0

    async def producer() -> None:
        nonlocal reports, behind
        start = time.perf_counter()
        for sequence in itertools.count(1):
            if stop:
                return
            delay = start + (sequence - 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if measuring:
                behind = max(behind, -delay)
            started = time.perf_counter()
            try:
                await call(report(op_id, sequence, sequence))
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            if measuring:
                reports += 1
                latencies.append(time.perf_counter() - started)

    task = asyncio.create_task(producer())
    try:
        await asyncio.sleep(warmup)
        meter = CpuMeter(server)
        measuring = True
        await asyncio.sleep(duration)
        measuring = False
        cpu = meter.result(reports)
    finally:
        stop = True
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
    return {
        "target_rate": rate,
        "reports": reports,
        "reports_per_s": round(reports / duration, 1),
        # The latest a report went out after it was due, within the window.
        "max_behind_ms": ms(behind),
        "p50_ms": ms(percentile(latencies, 50)),
        "p99_ms": ms(percentile(latencies, 99)),
        "errors": dict(errors),
        **cpu,
    }


def other_project_watch(stubs: Sequence[Any], prefix: str, events: Counter[str]) -> OpenStream:
    """Watcher i watches project `prefix`-i (default pacing), which nothing
    reports into; every event it gets is counted by type into `events`."""

    async def open_stream(i: int) -> AsyncGenerator[list[int], None]:
        request = pb.WatchOperationsRequest(filter=pb.OperationFilter(project=f"{prefix}-{i}"))
        call = stubs[i % len(stubs)].WatchOperations(request)
        try:
            async for response in call:
                for event in response.events:
                    events[pb.OperationEvent.Type.Name(event.type)] += 1
                yield []
        finally:
            call.cancel()

    return open_stream


async def drain(stream: AsyncGenerator[list[int], None]) -> None:
    async for _ in stream:
        pass


async def section_unrelated(sizes: Sizes, log_dir: Path) -> Json:
    window, warmup = sizes.unrelated_duration, sizes.warmup
    reference, *others = sizes.unrelated_watchers

    async def measure(s: Servers, stubs: Sequence[Any], n: int, key: str, *, idle: bool) -> Json:
        """N watchers of other projects open: the server's CPU over a window with no
        reports (when `idle`), then the paced producer's run."""
        (op_id,) = await start_ops(s.stub, f"unrelated-{key}", 1, "bench-unrelated-producer")
        events: Counter[str] = Counter()
        open_stream = other_project_watch(stubs, f"bench-other-{key}", events)
        started = time.perf_counter()
        streams = await open_synced(open_stream, range(n))
        synced_s = time.perf_counter() - started
        failed = [rpc_code(x) for x in streams if isinstance(x, BaseException)]
        drains = [
            asyncio.create_task(drain(x)) for x in streams if not isinstance(x, BaseException)
        ]
        out: Json = {"watchers": n, "seconds_to_all_synced": round(synced_s, 3)}
        try:
            if failed:
                raise RuntimeError(f"{len(failed)} of {n} watchers failed: {Counter(failed)}")
            await asyncio.sleep(min(0.5, window / 2))  # what opening them left to do
            if idle:
                meter = CpuMeter(s.headway)
                await asyncio.sleep(window)
                out["idle"] = meter.result()
            out["headway"] = await run_paced_reports(
                s.stub.UpdateOperation,
                op_id,
                rate=UNRELATED_RATE,
                duration=window,
                warmup=warmup,
                server=s.headway,
            )
        finally:
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            await close_streams(streams)
        # Only SYNCED and BOOKMARK are expected: nothing they watch changes.
        out["events"] = dict(events)
        return out

    def above_idle(run: Json, idle: Json) -> float | None:
        """CPU µs per report beyond what the watchers cost with no reports
        (their bookmarks and timers)."""
        h = run["headway"]
        if not h["reports"]:
            return None
        used = float(h["server_cpu_s"]) - float(idle["server_cpu_s"])
        return round(1e6 * used / int(h["reports"]), 1)

    runs: Json = {}
    async with Servers(log_dir) as s:
        stubs = [
            pb_grpc.ProgressTrackerStub(c) for c in s.channels(s.headway, sizes.unrelated_channels)
        ]
        bare = await run_paced_reports(
            s.echo, "bare", rate=UNRELATED_RATE, duration=window, warmup=warmup, server=s.bare
        )
        for n in sizes.unrelated_watchers:
            runs[str(n)] = await measure(s, stubs, n, str(n), idle=True)
        # The reference once more at the end: a shared machine drifts by more
        # than the goal's 20 % between runs a minute apart, so the others are
        # compared with the mean of the reference runs around them.
        again = await measure(s, stubs, reference, f"{reference}-again", idle=False)
    first = runs[str(reference)]
    first["headway_again"] = again["headway"]
    first["events_again"] = again["events"]
    for run in runs.values():
        run["server_cpu_us_per_report_above_idle"] = above_idle(run, run["idle"])
    again_above = above_idle(again, first["idle"])

    def mean(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((a + b) / 2, 1)

    base = {
        "server_cpu_us_per_report": mean(
            first["headway"].get("server_cpu_us_per_item"),
            again["headway"].get("server_cpu_us_per_item"),
        ),
        "server_cpu_us_per_report_above_idle": mean(
            first["server_cpu_us_per_report_above_idle"], again_above
        ),
        "reports_per_s": mean(first["headway"]["reports_per_s"], again["headway"]["reports_per_s"]),
    }
    for run in runs.values():
        h = run["headway"]
        run["cpu_ratio"] = ratio(h.get("server_cpu_us_per_item"), base["server_cpu_us_per_report"])
        run["cpu_ratio_above_idle"] = ratio(
            run["server_cpu_us_per_report_above_idle"], base["server_cpu_us_per_report_above_idle"]
        )
        run["rate_ratio"] = ratio(h["reports_per_s"], base["reports_per_s"])
        run["cpu_vs_bare"] = ratio(
            h.get("server_cpu_us_per_item"), bare.get("server_cpu_us_per_item")
        )
    return {
        "rate": UNRELATED_RATE,
        "channels": sizes.unrelated_channels,
        "window_s": window,
        "reference_watchers": reference,
        # The mean of the reference's first and last runs; the ratios are against it.
        "reference": base,
        "compared": others,
        "bare_echo": bare,
        "runs": runs,
    }


# --------------------------------------------------------------------------
# 10. The Redis store

# Reports per BatchUpdateOperations call in the Redis-against-memory row.
REDIS_BATCH = 100
# Connections the unary load is spread over for --workers 2: SO_REUSEPORT
# balances connections, not calls, so each connection lands on one worker, and
# with 16 of them both workers get some (all on one: 2 in 2**16).
WORKER_CHANNELS = 16
# The watched operation's producer: modest, so the delivery path is measured,
# not a queue behind a saturated server.
WATCH_RATE = 200.0
# How long a watcher may take to receive the window's last reports.
WATCH_GRACE = 0.5
# Every top-level command between these two ECHOes is counted (see redis_round_trips).
MONITOR_START = "headway-bench-count-start"
MONITOR_END = "headway-bench-count-end"
REDIS_ABSENT = "skipped: redis-server not on PATH"


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN on `port` (SO_REUSEPORT: one per worker)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


class WorkersProcess(ServerProcess):
    """`serve --workers N`: CPU summed over the supervisor and its workers."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_dir: Path, workers: int):
        super().__init__(name, argv, port, log_dir)
        self.workers = workers

    def worker_pids(self) -> list[int]:
        """The supervisor's children that are workers (not multiprocessing's
        resource tracker, another child)."""
        pids = []
        for pid in child_pids(self.pid):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"spawn_main" in cmdline.read():
                    pids.append(pid)
        return pids

    async def ready(self, limit: float = 30.0) -> None:
        # One worker listening accepts connections; until all do, the kernel
        # hands every connection to the ones that do.
        deadline = time.monotonic() + limit
        await super().ready(limit)
        while listening_sockets(self.port) < self.workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not all {self.workers} workers listen")
            await asyncio.sleep(0.05)

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p) for p in (self.pid, *self.worker_pids()))


class RedisProcess(ServerProcess):
    """The bench's own redis-server, never the machine's shared one: a free port,
    its files in a temporary directory, and no persistence (--save "" and
    --appendonly no), so no figure pays for snapshots or an append-only file."""

    def __init__(self, executable: str, log_dir: Path, data_dir: Path) -> None:
        port = free_port()
        super().__init__(
            "redis",
            [
                executable,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            port,
            log_dir,
        )
        self.url = f"redis://127.0.0.1:{port}/0"

    def client(self) -> Any:
        # Typed loosely, as the store does: redis-py's replies are unions of every shape.
        return aioredis.Redis.from_url(self.url)

    async def ready(self, limit: float = 30.0) -> None:
        deadline = time.monotonic() + limit
        client = self.client()
        try:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
                try:
                    await client.ping()
                    return
                except (redis_errors.ConnectionError, OSError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.name} not ready after {limit:.0f}s") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()


def headway_process(
    name: str, log_dir: Path, *, store: str | None = None, workers: int = 1, http: bool = False
) -> ServerProcess:
    """A Headway server; with `http`, its gateway on a port of its own too."""
    port = free_port()
    argv = [sys.executable, "-m", "headway_server", "serve", "--listen", f"127.0.0.1:{port}"]
    argv += ["--log-level", "WARNING"]
    if store is not None:
        argv += ["--store", store]
    if workers > 1:
        argv += ["--workers", str(workers)]
        return WorkersProcess(name, argv, port, log_dir, workers)
    if http:
        return HttpServerProcess(name, argv, port, log_dir)
    return ServerProcess(name, argv, port, log_dir)


class Fleet:
    """Processes started for a section and the channels to them, all closed and
    stopped on exit (or earlier, one by one, to free the cores)."""

    def __init__(self) -> None:
        self._processes: list[ServerProcess] = []
        self._channels: dict[ServerProcess, list[grpc.aio.Channel]] = {}
        self._clients: list[Any] = []

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 5)
        for process in reversed(list(self._processes)):
            await self.stop(process)

    async def start(self, *processes: ServerProcess) -> None:
        for process in processes:
            self._processes.append(process)
            process.start()
        await asyncio.gather(*(p.ready() for p in processes))

    async def stop(self, process: ServerProcess) -> None:
        for ch in self._channels.pop(process, []):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ch.close(None), 5)
        process.stop()
        self._processes.remove(process)

    def stubs(self, process: ServerProcess, count: int = 1) -> list[Any]:
        """Stubs on `count` channels of their own (connections of their own)."""
        channels = [channel(process.address) for _ in range(count)]
        self._channels.setdefault(process, []).extend(channels)
        return [pb_grpc.ProgressTrackerStub(ch) for ch in channels]

    def redis(self, process: RedisProcess) -> Any:
        client = process.client()
        self._clients.append(client)
        return client


def by_operation(stubs: Sequence[Any], op_ids: Sequence[str]) -> SendReports:
    """Unary UpdateOperation, each operation's reports always on the same channel
    (so on one worker, whose copy of the operation stays current): operation i on
    channel i mod len(stubs)."""
    where = {op_id: stubs[i % len(stubs)] for i, op_id in enumerate(op_ids)}

    async def send(reports: list[pb.UpdateOperationRequest]) -> tuple[int, int]:
        (request,) = reports
        ack = await where[request.operation_id].UpdateOperation(request)
        return 0, 0 if ack.applied else 1

    return send


def with_cpu_of(
    run: Callable[[], Awaitable[Json]], redis: ServerProcess, server: ServerProcess
) -> Callable[[], Awaitable[Json]]:
    """`run`, with redis-server's CPU over it (warm-up included: it runs at the
    same rate), and each worker's CPU when `server` has workers."""

    async def measured() -> Json:
        meter = CpuMeter(redis)
        workers = server.worker_pids() if isinstance(server, WorkersProcess) else []
        before = [process_cpu_seconds(p) for p in workers]
        out = await run()
        redis_cpu = meter.result()
        out["redis_cpu_pct"] = redis_cpu["server_cpu_pct"]
        rate = out.get("reports_per_s")
        out["redis_cpu_us_per_item"] = (
            round(redis_cpu["server_cpu_pct"] * 1e4 / rate, 1) if rate else None
        )
        if workers:
            out["worker_cpu_s"] = [
                round(process_cpu_seconds(p) - b, 3) for p, b in zip(workers, before, strict=True)
            ]
        return out

    return measured


async def run_watch_latency(
    producer: Any,
    watchers: dict[str, Any],
    op_id: str,
    *,
    rate: float,
    duration: float,
    warmup: float,
) -> Json:
    """One producer reports into `op_id` at `rate` (one report at a time on a
    wall-clock schedule, as run_paced_reports) while each of `watchers` (name:
    stub) watches it with WatchOperation, min_interval 0. Report i says
    completed=i, so a state received names the report it came from.

    Latency is from a report's send (before the call, not its ack) until the
    watcher holds that state or a later one: a state the server skipped
    (conflated) counts until the next one arrives. Reports sent during the
    window count; the watchers get WATCH_GRACE more to receive them."""
    sent: dict[int, float] = {}
    received: dict[str, list[tuple[int, float]]] = {name: [] for name in watchers}
    synced = {name: asyncio.Event() for name in watchers}
    errors: Counter[str] = Counter()
    stop = False
    request = pb.WatchOperationRequest(operation_id=op_id, min_interval=UNPACED)

    async def watch(name: str, stub: Any) -> None:
        call = stub.WatchOperation(request)
        try:
            async for event in call:
                if not synced[name].is_set():
                    synced[name].set()  # the first event: the state at the start
                elif event.type == pb.OperationEvent.CHANGED:
                    received[name].append((event.operation.completed, time.perf_counter()))
        except grpc.aio.AioRpcError as exc:
            errors[f"{name} {exc.code().name}"] += 1
            synced[name].set()
        finally:
            call.cancel()

    async def produce() -> None:
        start = time.perf_counter()
        for sequence in itertools.count(1):
            if stop:
                return
            delay = start + (sequence - 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[sequence] = time.perf_counter()
            try:
                await producer.UpdateOperation(report(op_id, sequence, sequence))
            except grpc.aio.AioRpcError as exc:
                errors[f"producer {exc.code().name}"] += 1

    watching = [asyncio.create_task(watch(n, s)) for n, s in watchers.items()]
    producing: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in synced.values())), 30)
        producing = asyncio.create_task(produce())
        await asyncio.sleep(warmup)
        t0 = time.perf_counter()
        await asyncio.sleep(duration)
        t1 = time.perf_counter()
        stop = True
        await asyncio.wait_for(producing, 30)
        await asyncio.sleep(WATCH_GRACE)
    finally:
        stop = True
        for task in (*watching, *([producing] if producing else [])):
            task.cancel()
        await asyncio.gather(*watching, return_exceptions=True)
    window = sorted((c, t) for c, t in sent.items() if t0 <= t <= t1)
    out: Json = {"target_rate": rate, "reports": len(window), "errors": dict(errors)}
    for name, states in received.items():
        completed = [c for c, _ in states]  # rising: a watch never goes back
        latencies = []
        unseen = 0
        for c, t in window:
            i = bisect.bisect_left(completed, c)
            if i == len(completed):
                unseen += 1
            else:
                latencies.append(max(0.0, states[i][1] - t))
        seen = set(completed)
        out[name] = {
            "p50_ms": ms(percentile(latencies, 50)),
            "p99_ms": ms(percentile(latencies, 99)),
            "max_ms": ms(max(latencies, default=None)),
            # Reports of the window whose own state this watcher got (the others
            # were conflated into a later one, or never seen).
            "states_received": sum(1 for c, _ in window if c in seen),
            "unseen": unseen,
        }
    return out


def command_name(seen: MonitorCommandInfo) -> str:
    return seen["command"].split(" ", 1)[0].lower()


@dataclass
class Listed:
    """Commands Redis ran under MONITOR, by name: top-level ones whose arguments
    name one of the operations asked about, the other top-level ones, and those
    Lua scripts ran."""

    naming: Counter[str] = dataclasses.field(default_factory=Counter)
    other: Counter[str] = dataclasses.field(default_factory=Counter)
    scripted: Counter[str] = dataclasses.field(default_factory=Counter)


async def monitored(
    client: Any, action: Callable[[], Awaitable[Any]], op_ids: Collection[str] = ()
) -> tuple[Any, Listed]:
    """Runs `action` under MONITOR: its result, and the commands Redis ran
    meanwhile (see redis_round_trips)."""
    listed = Listed()
    names = set(op_ids)

    async def listen(monitor: Any) -> None:
        counting = False
        async for seen in monitor.listen():
            words = seen["command"].split(" ")
            name = words[0].lower()
            if name == "echo" and MONITOR_START in words:
                counting = True
            elif name == "echo" and MONITOR_END in words:
                return
            elif not counting:
                continue
            elif seen["client_type"] == "lua":
                listed.scripted[name] += 1
            elif names.intersection(words[1:]):
                listed.naming[name] += 1
            else:
                listed.other[name] += 1

    # MONITOR is on once the context is entered: what follows is all listed.
    async with client.monitor() as monitor:
        listener = asyncio.create_task(listen(monitor))
        await client.echo(MONITOR_START)
        result = await action()
        await client.echo(MONITOR_END)
        await asyncio.wait_for(listener, 30)
    return result, listed


async def redis_round_trips(
    stub: Any, client: Any, op_ids: Sequence[str], sequences: dict[str, int], count: int
) -> Json:
    """Redis commands per unary UpdateOperation, the server's cache warm (each
    operation already reported through this server), one report at a time.

    Counted with MONITOR on the bench's own redis-server, which lists every
    command it runs with the client that sent it and its arguments; commands a
    Lua script runs are listed too, from client "lua", and left out. INFO
    commandstats and INFO stats' total_commands_processed count those
    script-internal calls as well (an EVAL of 10 SETs adds 11), and Redis 7.0's
    CLIENT LIST has no per-connection command count, so neither tells
    top-level commands apart. A top-level command is one request from a server
    process to Redis; a pipeline of n would show as n, so the count can only
    overstate round trips.

    The window is delimited by two ECHOes from this process. A report's
    commands name its operation (the write script takes the id as an
    argument); the server's own periodic commands (health pings, the sweeper's
    lease scans, the tailer's polls) name none and land in a window by chance,
    so they are counted apart, beside those of a window as long with no
    reports. Were a report to send a command naming no operation, the window's
    other commands would outnumber the idle window's by about one per report."""

    async def send() -> tuple[int, float]:
        not_applied = 0
        started = time.perf_counter()
        for i in range(count):
            op_id = op_ids[i % len(op_ids)]
            sequences[op_id] += 1
            n = sequences[op_id]
            ack = await stub.UpdateOperation(report(op_id, n, n))
            not_applied += 0 if ack.applied else 1
        return not_applied, time.perf_counter() - started

    (not_applied, elapsed), listed = await monitored(client, send, op_ids)
    _, idle = await monitored(client, functools.partial(asyncio.sleep, elapsed), op_ids)
    return {
        "reports": count,
        "not_applied": not_applied,
        "window_s": round(elapsed, 3),
        "per_report": round(sum(listed.naming.values()) / count, 3),
        "commands": dict(listed.naming),
        "other_commands": dict(listed.other),
        "other_commands_idle": dict(idle.other + idle.naming),
        "script_commands": dict(listed.scripted),
        "script_commands_per_report": round(sum(listed.scripted.values()) / count, 2),
    }


async def redis_retained_memory(stub: Any, client: Any, count: int) -> Json:
    """Redis's used_memory per finished operation kept, the same operations as
    the memory section's retained_memory (typical payload, a few reports, completed)."""
    warm = max(50, count // 10)
    await bounded_gather([finished_operation(stub, f"warm-{i}") for i in range(warm)], 32)
    before = int((await client.info("memory"))["used_memory"])
    await bounded_gather([finished_operation(stub, f"retained-{i}") for i in range(count)], 32)
    after = int((await client.info("memory"))["used_memory"])
    keys = int(await client.dbsize())
    return {
        "operations": count,
        "used_memory_before": before,
        "used_memory_after": after,
        "keys": keys,
        "bytes_per_operation": round((after - before) / count),
    }


async def section_redis(sizes: Sizes, log_dir: Path) -> Json:
    executable = shutil.which("redis-server")
    if executable is None:
        return {"status": REDIS_ABSENT}
    with tempfile.TemporaryDirectory(prefix="headway-bench-redis-") as data:
        async with Fleet() as fleet:
            return await measure_redis(fleet, executable, Path(data), sizes, log_dir)


async def measure_redis(
    fleet: Fleet, executable: str, data: Path, sizes: Sizes, log_dir: Path
) -> Json:
    redis = RedisProcess(executable, log_dir, data)
    await fleet.start(redis)
    client = fleet.redis(redis)
    one_store = f"{redis.url}?namespace=bench-one"
    memory = headway_process("headway-memory", log_dir)
    one = headway_process("headway-redis", log_dir, store=one_store)
    await fleet.start(memory, one)
    info = await client.info("server")
    out: Json = {"cores": os.cpu_count(), "redis_version": info["redis_version"]}

    # 1, 2. Redis against memory, one process each: unary and batched reports
    # into the same operations (sequences carry on across runs, as in batched).
    (mstub,), (rstub,) = fleet.stubs(memory), fleet.stubs(one)
    n = sizes.redis_operations
    mops = await start_ops(mstub, "redis-vs-memory", n, "bench-redis")
    rops = await start_ops(rstub, "redis-vs-memory", n, "bench-redis")
    mseq, rseq = dict.fromkeys(mops, 0), dict.fromkeys(rops, 0)
    acks: Counter[str] = Counter()

    def measure(
        send: SendReports,
        ops: Sequence[str],
        seq: dict[str, int],
        batch: int,
        server: ServerProcess,
    ) -> Callable[[], Awaitable[Json]]:
        run = functools.partial(
            run_reports,
            send,
            ops,
            seq,
            batch=batch,
            in_flight=batch_in_flight(batch),
            duration=sizes.redis_duration,
            warmup=sizes.warmup,
            server=server,
            acks=acks,
        )
        return with_cpu_of(run, redis, server)

    unary_m, unary_r, batch_m, batch_r = await alternate(
        [
            measure(unary_sender(mstub), mops, mseq, 1, memory),
            measure(unary_sender(rstub), rops, rseq, 1, one),
            measure(batch_sender(mstub.BatchUpdateOperations), mops, mseq, REDIS_BATCH, memory),
            measure(batch_sender(rstub.BatchUpdateOperations), rops, rseq, REDIS_BATCH, one),
        ],
        sizes.repeats,
        "reports_per_s",
    )
    out["unary"] = {
        "memory": unary_m,
        "redis": unary_r,
        "ratio": ratio(unary_r["reports_per_s"], unary_m["reports_per_s"]),
    }
    out["batched"] = {
        "batch": REDIS_BATCH,
        "memory": batch_m,
        "redis": batch_r,
        "ratio": ratio(batch_r["reports_per_s"], batch_m["reports_per_s"]),
    }
    await fleet.stop(memory)

    # 5. Round trips per report, with nothing else writing.
    out["round_trips"] = await redis_round_trips(
        rstub, client, rops, rseq, sizes.redis_round_trip_reports
    )

    # 3. One process against --workers 2, the same unary load spread over
    # WORKER_CHANNELS connections to each.
    two = headway_process(
        "headway-redis-2", log_dir, store=f"{redis.url}?namespace=bench-two", workers=2
    )
    await fleet.start(two)
    wide = {p: fleet.stubs(p, WORKER_CHANNELS) for p in (one, two)}
    wops = {
        p: await start_ops(wide[p][0], "workers", 4 * UNARY_IN_FLIGHT, "bench-workers")
        for p in (one, two)
    }

    async def read(stub: Any, op_id: str) -> None:
        await stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))

    for p in (one, two):  # each operation read through its channel: its worker holds it
        await bounded_gather(
            [read(wide[p][i % WORKER_CHANNELS], o) for i, o in enumerate(wops[p])], 64
        )
    wseq = {p: dict.fromkeys(wops[p], 0) for p in (one, two)}
    w1, w2 = await alternate(
        [measure(by_operation(wide[p], wops[p]), wops[p], wseq[p], 1, p) for p in (one, two)],
        sizes.repeats,
        "reports_per_s",
    )
    out["workers"] = {
        "channels": WORKER_CHANNELS,
        "one": w1,
        "two": w2,
        "ratio": ratio(w2["reports_per_s"], w1["reports_per_s"]),
    }
    await fleet.stop(two)

    # 4. Watch delivery: reports through `one` (replica A), a watcher on A and
    # one on another process sharing its Redis namespace (replica B), at once.
    other = headway_process("headway-redis-b", log_dir, store=one_store)
    await fleet.start(other)
    (producer,) = fleet.stubs(one)
    (op_id,) = await start_ops(producer, "watched", 1, "bench-watch")
    out["watch"] = await run_watch_latency(
        producer,
        {"same_replica": fleet.stubs(one)[0], "other_replica": fleet.stubs(other)[0]},
        op_id,
        rate=WATCH_RATE,
        duration=sizes.redis_watch_duration,
        warmup=sizes.warmup,
    )
    same, cross = out["watch"]["same_replica"], out["watch"]["other_replica"]
    out["watch"]["p99_difference_ms"] = (
        None
        if same["p99_ms"] is None or cross["p99_ms"] is None
        else round(cross["p99_ms"] - same["p99_ms"], 3)
    )
    await fleet.stop(other)

    # 6. Memory per retained finished operation (the delta is the whole Redis's).
    out["retained_operations"] = await redis_retained_memory(
        rstub, client, sizes.redis_retained_ops
    )
    # Over every run_reports call, warm-up and all repeats included: all but
    # reports_checked must be 0.
    out["reports_checked"] = acks["reports"]
    out["rejected"] = acks["rejected"]
    out["not_applied"] = acks["not_applied"]
    out["failed_calls"] = acks["failed_calls"]
    return out


# --------------------------------------------------------------------------
# 11. Server-Sent Events against gRPC watchers

# Bytes an SSE client takes from its socket at once.
SSE_READ_SIZE = 1 << 16
# A server below this share of a core over QUIET_WINDOW is done with the run before.
QUIET_CPU = 0.2
QUIET_WINDOW = 0.2


class HttpServerProcess(ServerProcess):
    """A Headway server with its HTTP gateway (`--http-listen`) on a port of its own."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_dir: Path) -> None:
        self.http_port = free_port()
        argv = [*argv, "--http-listen", f"127.0.0.1:{self.http_port}"]
        super().__init__(name, argv, port, log_dir)

    async def ready(self, limit: float = 30.0) -> None:
        # The gateway starts after the gRPC server: wait until it accepts too.
        deadline = time.monotonic() + limit
        await super().ready(limit)
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: HTTP not ready after {limit:.0f}s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return


class EventStream:
    """A text/event-stream body as the gateway sends it, in HTTP/1.1 chunked
    transfer coding: feed() takes what the socket gave and returns each event
    completed by it as (type, revision), the revision from its `id:
    epoch.revision`. The `data:` JSON is not parsed, so that the client's cost
    per event stays small beside the server's (a gRPC watcher's is protobuf
    parsing in C)."""

    def __init__(self) -> None:
        self._coded = b""  # not yet decoded: an incomplete chunk
        self._text = b""  # decoded: the start of an event not yet complete
        self.ended = False  # the last (empty) chunk came

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        coded, at, text = self._coded + data, 0, [self._text]
        while not self.ended:
            eol = coded.find(b"\r\n", at)
            if eol < 0:
                break
            size = int(coded[at:eol].split(b";", 1)[0], 16)
            end = eol + 2 + size
            if len(coded) < end + 2:  # the chunk and its CRLF
                break
            text.append(coded[eol + 2 : end])
            at = end + 2
            self.ended = size == 0
        self._coded = coded[at:]
        *blocks, self._text = b"".join(text).split(b"\n\n")
        events = []
        for block in blocks:
            kind, revision = b"", 0
            for line in block.split(b"\n"):
                field, _, value = line.partition(b": ")
                if field == b"event":
                    kind = value
                elif field == b"id":
                    revision = int(value.rpartition(b".")[2])
            if kind:  # not the retry field's block, nor a keep-alive comment
                events.append((kind, revision))
        return events


def sse_watch(host: str, port: int, path: str) -> OpenStream:
    """SSE clients of GET `path`, each on a connection of its own (HTTP/1.1, as
    a browser's EventSource): the first item once `synced` came, then per read
    from the socket the revisions of the `changed` events it completed."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()

    async def open_stream(i: int) -> AsyncGenerator[list[int], None]:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise StreamFailed(type(exc).__name__, str(exc)) from exc
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            if status.split(" ")[1:2] != ["200"]:
                body = await reader.read(500)
                raise StreamFailed(status, body.decode(errors="replace"))
            stream = EventStream()
            synced = False
            while not stream.ended:
                data = await reader.read(SSE_READ_SIZE)
                if not data:
                    break
                events = stream.feed(data)
                if not synced:
                    kinds = [kind for kind, _ in events]
                    if b"synced" not in kinds:
                        continue
                    synced = True
                    yield []
                    events = events[kinds.index(b"synced") + 1 :]
                revisions = [revision for kind, revision in events if kind == b"changed"]
                if revisions:
                    yield revisions
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise StreamFailed(type(exc).__name__, str(exc)) from exc
        finally:
            writer.close()

    return open_stream


async def quiet(server: ServerProcess, limit: float = 10.0) -> float:
    """Waits until the server uses under QUIET_CPU of a core over QUIET_WINDOW
    (done with the streams of the run before: closing a thousand of them takes
    a while), at most `limit` seconds; returns the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        meter = CpuMeter(server)
        await asyncio.sleep(QUIET_WINDOW)
        if meter.result()["server_cpu_pct"] < 100 * QUIET_CPU:
            break
    return round(time.perf_counter() - started, 3)


async def section_sse(sizes: Sizes, log_dir: Path) -> Json:
    n, project = sizes.sse_clients, "bench-sse"
    async with Fleet() as fleet:
        server = headway_process("headway-sse", log_dir, http=True)
        assert isinstance(server, HttpServerProcess)
        await fleet.start(server)
        (stub,) = fleet.stubs(server)
        ops = await start_ops(stub, "sse", PROJECT_OPS, project)
        watch_stubs = fleet.stubs(server, sizes.watcher_channels)
        grpc_fan = headway_project_fanout(stub, watch_stubs, project, ops, min_interval=UNPACED)
        # The same project, operations and producers (whose sequences carry on
        # from run to run); only the watchers differ.
        path = f"/v1/operations:watch?project={project}&minInterval=0"
        sse_fan = dataclasses.replace(
            grpc_fan, open_stream=sse_watch("127.0.0.1", server.http_port, path), open_idle=None
        )

        # Memory first, on the fresh process: a tenth of each kind opened to warm
        # up, then N gRPC watchers, then N SSE clients beside them (none closed
        # in between, so neither kind reuses what the other freed).
        warm = max(1, n // 10)
        warmed = [
            *await open_synced(grpc_fan.open_stream, range(warm)),
            *await open_synced(sse_fan.open_stream, range(warm)),
        ]
        await asyncio.sleep(0.5)
        grpc_streams, grpc_memory = await rss_per_stream(
            grpc_fan.open_stream, range(warm, warm + n), server
        )
        sse_streams, sse_memory = await rss_per_stream(
            sse_fan.open_stream, range(warm, warm + n), server
        )
        await close_streams([*warmed, *grpc_streams, *sse_streams])

        waits: list[float] = []

        def measure(fan: Fanout, rate: float | None) -> Callable[[], Awaitable[Json]]:
            async def run() -> Json:
                waits.append(await quiet(server))
                return await run_fanout(
                    fan,
                    n,
                    rate=rate,
                    duration=sizes.sse_duration,
                    warmup=sizes.warmup,
                    server=server,
                )

            return run

        # Over-driven, SSE and gRPC alternated: the delivery ceilings.
        sse, grpc_ = await alternate(
            [measure(sse_fan, None), measure(grpc_fan, None)],
            sizes.sse_repeats,
            "states_delivered_per_s",
        )
        # Latency with both at the same rate, half the lower ceiling.
        rate = max(
            1.0, 0.5 * min(sse["states_per_watcher_per_s"], grpc_["states_per_watcher_per_s"])
        )
        sse_paced = await measure(sse_fan, rate)()
        grpc_paced = await measure(grpc_fan, rate)()
    return {
        "clients": n,
        "project_operations": PROJECT_OPS,
        "watcher_channels": sizes.watcher_channels,
        "memory": {
            "sse": sse_memory,
            "grpc": grpc_memory,
            "ratio": ratio(sse_memory["bytes_per_watcher"], grpc_memory["bytes_per_watcher"]),
        },
        "saturated": {
            "sse": sse,
            "grpc": grpc_,
            "ratio": ratio(sse["states_delivered_per_s"], grpc_["states_delivered_per_s"]),
            "cpu_ratio": ratio(
                sse.get("server_cpu_us_per_item"), grpc_.get("server_cpu_us_per_item")
            ),
            "admitted_ratio": ratio(sse["admitted_s"], grpc_["admitted_s"]),
        },
        "same_rate": {
            "rate": rate,
            "sse": sse_paced,
            "grpc": grpc_paced,
            "p50_ratio": ratio(sse_paced["p50_ms"], grpc_paced["p50_ms"]),
            "p99_ratio": ratio(sse_paced["p99_ms"], grpc_paced["p99_ms"]),
        },
        # Seconds each run waited for the server to finish with the run before.
        "quiet_waits_s": waits,
    }


# --------------------------------------------------------------------------
# 12. The dashboard in a browser

# Debian's Chromium, as the browser tests use (no other browser download works here).
CHROMIUM = Path(os.environ.get("HEADWAY_CHROMIUM", "/usr/bin/chromium"))
# The browser tests' window size: about 16 rows of the table in view.
DASHBOARD_WIDTH, DASHBOARD_HEIGHT = 1400, 860
# Reports per operation per second while loaded: every operation changes
# every second, in batches of a fifth of the project (five calls a second),
# at most four in flight, so that no operation is in two calls at once. (With
# two, the page's one stream slowed the calls enough that the producers fell
# to ~3,700 reports/s of 5,000.)
DASHBOARD_REPORTS_PER_OP = 1.0
DASHBOARD_BATCHES_PER_S = 5
DASHBOARD_IN_FLIGHT = 4
# Seconds the page gets after the snapshot is shown, the producers before a
# loaded window, and the page after catching up before an idle one.
DASHBOARD_SETTLE = 1.0
DASHBOARD_QUIET = 0.5

# Counts animation frames for `windowMs` of the page's own clock: every
# interval between frames, and the long tasks (over 50 ms on the main thread)
# a PerformanceObserver saw meanwhile.
FRAME_WINDOW_JS = """async (windowMs) => {
  const longTasks = [];
  const observer = new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) longTasks.push(entry.duration);
  });
  observer.observe({ type: "longtask" });
  const intervals = [];
  let first = null;
  let last = null;
  await new Promise((resolve) => {
    const tick = (now) => {
      if (first === null) first = now;
      else intervals.push(now - last);
      last = now;
      if (now - first >= windowMs) resolve();
      else requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  });
  for (const entry of observer.takeRecords()) longTasks.push(entry.duration);
  observer.disconnect();
  return { elapsedMs: last - first, intervals, longTasks };
}"""

# The table's rows in the page (spare ones are hidden).
DOM_ROWS_JS = "() => document.querySelectorAll('.viewport a.row').length"

# True once every row in view shows its operation's last report: the Done
# cell reads "<completed> / <total> items" with `expected[id]` completed.
ROWS_CURRENT_JS = """(expected) => {
  const rows = [...document.querySelectorAll(".viewport a.row")].filter((r) => !r.hidden);
  return rows.length > 0 && rows.every((row) => {
    const done = row.querySelector(":scope > span.num");
    const text = done ? done.textContent.trim() : "";
    return Number(text.split(" / ")[0].replace(/,/g, "")) === expected[row.dataset.id];
  });
}"""

# CDP Performance.getMetrics figures (cumulative seconds) shown as % of a
# window: the renderer's main thread in tasks (wall time, which counts a
# thread waiting for a core too), in script, style and layout among them, and
# on a core (ThreadTime); the whole renderer process on a core (ProcessTime).
RENDERER_METRICS = {
    "TaskDuration": "main_thread_busy_pct",
    "ScriptDuration": "script_pct",
    "RecalcStyleDuration": "style_pct",
    "LayoutDuration": "layout_pct",
    "ThreadTime": "main_thread_cpu_pct",
    "ProcessTime": "renderer_cpu_pct",
}


def machine_cpu_ticks() -> tuple[int, int]:
    """All cores' busy and total jiffies so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def browser_pids() -> list[int]:
    """This process's descendants that are Chromium's (under Playwright's driver)."""
    found, todo = [], [os.getpid()]
    while todo:
        for pid in child_pids(todo.pop()):
            todo.append(pid)
            with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as comm:
                if "chrom" in comm.read():
                    found.append(pid)
    return found


def cpu_seconds_of(pids: Sequence[int]) -> dict[int, float]:
    cpu = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            cpu[pid] = process_cpu_seconds(pid)
    return cpu


@dataclass
class PageWindow:
    """What one measured window of the page gave, raw (summed over rounds by
    page_figures)."""

    elapsed: float  # seconds of the page's clock
    intervals: list[float]  # ms between animation frames
    long_tasks: list[float]  # ms each
    metrics: dict[str, float]  # CDP metric deltas (Timestamp: the seconds they span)
    wall: float  # seconds of this process's clock
    server_cpu: float
    loadgen_cpu: float
    browser_cpu: float
    machine_busy: int
    machine_total: int
    heap_used: int  # at the window's end
    heap_after_gc: int
    rows: int
    reports: int  # the producers', acknowledged within the window


def page_figures(windows: Sequence[PageWindow]) -> Json:
    """FPS, frame intervals, long tasks, the renderer's and the processes' CPU
    over `windows` together."""
    intervals = [i for w in windows for i in w.intervals]
    long_tasks = [t for w in windows for t in w.long_tasks]
    elapsed = sum(w.elapsed for w in windows)
    wall = sum(w.wall for w in windows)
    span = sum(w.metrics["Timestamp"] for w in windows)
    out: Json = {
        "windows": len(windows),
        "seconds": round(elapsed, 2),
        "frames": len(intervals),
        "fps": round(len(intervals) / elapsed, 1),
        "fps_by_window": [round(len(w.intervals) / w.elapsed, 1) for w in windows],
        "frame_p50_ms": round_ms(percentile(intervals, 50)),
        "frame_p99_ms": round_ms(percentile(intervals, 99)),
        "frame_max_ms": round_ms(max(intervals, default=None)),
        # Frames later than two vsyncs at 60 Hz: at least one skipped.
        "frames_over_33ms": sum(i > 33.4 for i in intervals),
        "long_tasks": len(long_tasks),
        "long_task_ms": round(sum(long_tasks), 1),
        "long_task_max_ms": round_ms(max(long_tasks, default=None)),
    }
    for metric, key in RENDERER_METRICS.items():
        out[key] = round(100 * sum(w.metrics[metric] for w in windows) / span, 1)
    out.update(
        {
            # % of one core: every Chromium process (renderer, GPU, browser),
            # the server, the load generator.
            "browser_cpu_pct": round(100 * sum(w.browser_cpu for w in windows) / wall, 1),
            "server_cpu_pct": round(100 * sum(w.server_cpu for w in windows) / wall, 1),
            "loadgen_cpu_pct": round(100 * sum(w.loadgen_cpu for w in windows) / wall, 1),
            # All cores busy, % of them: the above and any other tenant's.
            "machine_cpu_pct": round(
                100 * sum(w.machine_busy for w in windows) / sum(w.machine_total for w in windows),
                1,
            ),
            # At the last window's end, before and after a GC, and the rows then.
            "heap_used_bytes": windows[-1].heap_used,
            "heap_after_gc_bytes": windows[-1].heap_after_gc,
            "rows": windows[-1].rows,
            "reports": sum(w.reports for w in windows),
            "reports_per_s": round(sum(w.reports for w in windows) / wall, 1),
        }
    )
    return out


def round_ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class PacedBatches:
    """Producers reporting into every operation of `op_ids` in turn, in batches
    on a wall-clock schedule from start() (batch k due at k * batch / rate), at
    most DASHBOARD_IN_FLIGHT calls at once: a batch that falls due while they
    are unanswered goes out as soon as one is, so the achieved rate falls short
    of `rate` only when the server answers slower. Each report is the
    operation's next sequence and completed count (`sequences`)."""

    def __init__(
        self, send: SendReports, op_ids: Sequence[str], sequences: dict[str, int], rate: float
    ) -> None:
        self.send = send
        self.sequences = sequences
        self.rate = rate
        self.batch = max(1, round(rate / DASHBOARD_BATCHES_PER_S))
        self.measuring = False
        self.reports = 0  # acknowledged while measuring
        self.acks: Counter[str] = Counter()
        self.behind = 0.0  # the latest a batch went out after it was due, while measuring
        self._ops = itertools.cycle(op_ids)  # carries on from run to run
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._stop = False
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stops sending; returns once every report sent is acknowledged."""
        self._stop = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    def next_batch(self) -> list[pb.UpdateOperationRequest]:
        requests = []
        for _ in range(self.batch):
            op_id = next(self._ops)
            self.sequences[op_id] += 1
            requests.append(report(op_id, self.sequences[op_id], self.sequences[op_id]))
        return requests

    async def _run(self) -> None:
        gate = asyncio.Semaphore(DASHBOARD_IN_FLIGHT)
        calls: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        for k in itertools.count():
            due = start + k * self.batch / self.rate
            if due > time.perf_counter():
                await asyncio.sleep(due - time.perf_counter())
            await gate.acquire()
            if self._stop:
                gate.release()
                break
            if self.measuring:
                self.behind = max(self.behind, time.perf_counter() - due)
            call = asyncio.create_task(self._call(self.next_batch(), gate))
            calls.add(call)
            call.add_done_callback(calls.discard)
        await asyncio.gather(*calls)

    async def _call(
        self, requests: list[pb.UpdateOperationRequest], gate: asyncio.Semaphore
    ) -> None:
        try:
            rejected, not_applied = await self.send(requests)
        except grpc.aio.AioRpcError as exc:
            self.acks[f"failed {exc.code().name}"] += 1
            return
        finally:
            gate.release()
        self.acks["reports"] += len(requests)
        self.acks["rejected"] += rejected
        self.acks["not_applied"] += not_applied
        if self.measuring:
            self.reports += len(requests)


class DashboardProbe:
    """Measures windows of one dashboard page through CDP and in the page."""

    def __init__(self, page: Any, cdp: Any, server: ServerProcess, producers: PacedBatches):
        self.page = page
        self.cdp = cdp
        self.server = server
        self.producers = producers
        self.browser = browser_pids()

    async def metrics(self) -> dict[str, float]:
        got = await self.cdp.send("Performance.getMetrics")
        return {m["name"]: float(m["value"]) for m in got["metrics"]}

    async def heap_used(self) -> int:
        return int((await self.cdp.send("Runtime.getHeapUsage"))["usedSize"])

    async def window(self, seconds: float) -> PageWindow:
        before, ticks = await self.metrics(), machine_cpu_ticks()
        server, loadgen = self.server.cpu_seconds(), time.process_time()
        browser, wall = cpu_seconds_of(self.browser), time.perf_counter()
        self.producers.reports, self.producers.measuring = 0, True
        frames = await self.page.evaluate(FRAME_WINDOW_JS, 1000 * seconds)
        self.producers.measuring = False
        wall = time.perf_counter() - wall
        browser_after = cpu_seconds_of(self.browser)
        server, loadgen = self.server.cpu_seconds() - server, time.process_time() - loadgen
        after, ticks_after = await self.metrics(), machine_cpu_ticks()
        heap = await self.heap_used()
        await self.cdp.send("HeapProfiler.collectGarbage")
        return PageWindow(
            elapsed=frames["elapsedMs"] / 1000,
            intervals=frames["intervals"],
            long_tasks=frames["longTasks"],
            metrics={name: after[name] - before[name] for name in ("Timestamp", *RENDERER_METRICS)},
            wall=wall,
            server_cpu=server,
            loadgen_cpu=loadgen,
            browser_cpu=sum(t - browser[p] for p, t in browser_after.items() if p in browser),
            machine_busy=ticks_after[0] - ticks[0],
            machine_total=ticks_after[1] - ticks[1],
            heap_used=heap,
            heap_after_gc=await self.heap_used(),
            rows=int(await self.page.evaluate(DOM_ROWS_JS)),
            reports=self.producers.reports,
        )


def chromium_absent() -> str | None:
    """Why the dashboard section cannot run here, or None."""
    if not CHROMIUM.exists():
        return (
            f"skipped: no Chromium at {CHROMIUM} (`make chromium` as root installs Debian's, "
            "or apt-get install -y chromium; HEADWAY_CHROMIUM names another)"
        )
    return None


async def section_dashboard(sizes: Sizes, log_dir: Path) -> Json:
    absent = chromium_absent()
    if absent is not None:
        return {"status": absent}
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return {"status": "skipped: playwright is not installed (pip install -e '.[dev]')"}
    n, project = sizes.dashboard_operations, "bench-dashboard"
    errors: list[str] = []
    async with Fleet() as fleet:
        server = headway_process("headway-dashboard", log_dir, http=True)
        assert isinstance(server, HttpServerProcess)
        await fleet.start(server)
        (stub,) = fleet.stubs(server)
        started = time.perf_counter()
        ops = await start_ops(stub, "dash", n, project)
        sequences = dict.fromkeys(ops, 0)
        producers = PacedBatches(
            batch_sender(stub.BatchUpdateOperations),
            ops,
            sequences,
            n * DASHBOARD_REPORTS_PER_OP,
        )
        # A report each first, so that every operation is RUNNING with a rate
        # and an ETA in every window: the idle page shows what the loaded one does.
        for _ in range(0, n, producers.batch):
            await producers.send(producers.next_batch())
        setup = time.perf_counter() - started

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
            version = browser.version
            try:
                context = await browser.new_context(
                    viewport={"width": DASHBOARD_WIDTH, "height": DASHBOARD_HEIGHT}
                )
                page = await context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                cdp = await context.new_cdp_session(page)
                await cdp.send("Performance.enable")
                loading = time.perf_counter()
                await page.goto(f"http://127.0.0.1:{server.http_port}/#/?project={project}")
                await page.wait_for_function(
                    "(text) => document.getElementById('shown').textContent === text",
                    arg=f"{n:,} of {n:,}",
                    timeout=60_000,
                )
                load = time.perf_counter() - loading
                await asyncio.sleep(DASHBOARD_SETTLE)
                probe = DashboardProbe(page, cdp, server, producers)
                idle: list[PageWindow] = []
                loaded: list[PageWindow] = []
                catch_up: list[float] = []
                # Idle and loaded windows alternate, so that drift (other
                # tenants of the machine) falls on both.
                for _ in range(sizes.dashboard_rounds):
                    idle.append(await probe.window(sizes.dashboard_window))
                    producers.start()
                    try:
                        await asyncio.sleep(DASHBOARD_SETTLE)
                        loaded.append(await probe.window(sizes.dashboard_window))
                    finally:
                        await producers.stop()
                    # The page's lag once the load stops: from the last ack
                    # until every row in view shows its operation's last report.
                    stopped = time.perf_counter()
                    await page.wait_for_function(
                        ROWS_CURRENT_JS, arg=sequences, polling="raf", timeout=30_000
                    )
                    catch_up.append(round(time.perf_counter() - stopped, 3))
                    await asyncio.sleep(DASHBOARD_QUIET)
                await context.close()
            finally:
                await browser.close()
    if errors:
        raise RuntimeError(f"the page threw: {errors[:3]}")
    bad = {k: v for k, v in producers.acks.items() if k != "reports" and v}
    if bad:
        raise RuntimeError(f"reports failed or not applied: {bad}")
    busy, calm = page_figures(loaded), page_figures(idle)
    busy["max_behind_ms"] = ms(producers.behind)
    return {
        "operations": n,
        "project": project,
        "target_rate": n * DASHBOARD_REPORTS_PER_OP,
        "batch": producers.batch,
        "in_flight": DASHBOARD_IN_FLIGHT,
        "window_s": sizes.dashboard_window,
        "rounds": sizes.dashboard_rounds,
        "browser": version,
        "viewport": [DASHBOARD_WIDTH, DASHBOARD_HEIGHT],
        "setup_s": round(setup, 2),
        "load_s": round(load, 2),
        "catch_up_s": catch_up,
        "acks": dict(producers.acks),
        "idle": calm,
        "loaded": busy,
        "fps_ratio": ratio(busy["fps"], calm["fps"]),
        "p99_ratio": ratio(busy["frame_p99_ms"], calm["frame_p99_ms"]),
        "main_thread_cpu_ratio": ratio(busy["main_thread_cpu_pct"], calm["main_thread_cpu_pct"]),
        "heap_ratio": ratio(busy["heap_after_gc_bytes"], calm["heap_after_gc_bytes"]),
    }


# --------------------------------------------------------------------------
# Report


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def at_least(value: float | None, goal: float) -> bool | None:
    return None if value is None else value >= goal


def at_most(value: float | None, goal: float) -> bool | None:
    return None if value is None else value <= goal


def lat(run: Json) -> str:
    return f"{fmt(run.get('p50_ms'))} / {fmt(run.get('p99_ms'))} ms"


def lat_view(run: Json) -> str:
    return f"{lat(run)}; view {fmt(run.get('view_p50_ms'))} / {fmt(run.get('view_p99_ms'))} ms"


def paced_rows(sec: Json, row: Callable[..., None]) -> None:
    """The fan-out with the server's default pacing, against the same watchers
    with pacing off (in the bare column). Ack→view: from a report's ack until a
    watcher holds that state or a later one (see run_fanout)."""
    n, ops = sec["watchers"], sec["project_operations"]
    for name, key, what in (
        ("WatchOperation", "operation", "1 op"),
        ("WatchOperations", "project", f"{ops} ops"),
    ):
        paced, unpaced = sec[f"{key}_paced"], sec[key]
        h, b = paced["saturated"], unpaced["saturated"]
        label = f"{name}, {n} watchers of {what}, default pacing"
        row(
            f"{label}, producers flat out: states delivered/s / producers' reports/s "
            "(bare: pacing off)",
            f"{fmt(h['states_delivered_per_s'])} / {fmt(h['producer_reports_per_s'])}",
            f"{fmt(b['states_delivered_per_s'])} / {fmt(b['producer_reports_per_s'])}",
            f"{fmt_ratio(ratio(h['states_delivered_per_s'], b['states_delivered_per_s']))} / "
            f"{fmt_ratio(ratio(h['producer_reports_per_s'], b['producer_reports_per_s']))}",
            "—",
            "—",
        )
        row(
            f"{label}, producers flat out: ack→receipt p50 / p99; ack→view p50 / p99 "
            "(bare: pacing off)",
            lat_view(h),
            lat_view(b),
            fmt_ratio(ratio(h.get("view_p99_ms"), b.get("view_p99_ms"))) + " (view p99)",
            "—",
            "—",
        )
        hh, bh = paced["half_rate"], unpaced["half_rate"]
        worst = max(hh.get("p99_ms") or 0.0, hh.get("view_p99_ms") or 0.0)
        row(
            f"{label}: ack→receipt p50 / p99; ack→view p50 / p99 at "
            f"{fmt(hh['target_rate'])} reports/s (bare: pacing off at that rate)",
            lat_view(hh),
            lat_view(bh),
            fmt_ratio(ratio(hh.get("view_p99_ms"), bh.get("view_p99_ms"))) + " (view p99)",
            "both p99 < 250 ms" if key == "project" else "—",
            met(at_most(worst, 250)) if key == "project" else "—",
        )
        cpu = sec["paced_cpu_ratio"][key]
        row(
            f"{label}: server CPU at {fmt(hh['target_rate'])} reports/s (% of a core) / "
            "per report taken in, flat out (bare: pacing off); ratio = paced / off",
            f"{fmt(hh['server_cpu_pct'])} % / {fmt(h.get('server_cpu_us_per_report'))} µs",
            f"{fmt(bh['server_cpu_pct'])} % / {fmt(b.get('server_cpu_us_per_report'))} µs",
            f"{fmt_ratio(cpu['half_rate'])} / {fmt_ratio(cpu['flat_out_per_report'])}",
            "—",
            "—",
        )


def unrelated_rows(sec: Json, row: Callable[..., None]) -> None:
    """One producer at a fixed rate beside watchers of other projects; ratios
    against the fewest watchers (the mean of that run first and last), the bare
    echo at the same rate beside."""
    runs, bare, ref = sec["runs"], sec["bare_echo"], sec["reference"]
    base, rate = sec["reference_watchers"], fmt(sec["rate"])
    for n, run in runs.items():
        h = run["headway"]
        reference = int(n) == base
        figure = fmt(h.get("server_cpu_us_per_item"))
        if reference:
            again = run["headway_again"].get("server_cpu_us_per_item")
            figure = f"{fmt(ref['server_cpu_us_per_report'])} (first {figure}, last {fmt(again)})"
        row(
            f"Scaling: server CPU µs per report, 1 producer at {rate}/s (unary UpdateOperation) "
            f"beside {int(n):,} WatchOperations watchers of other projects "
            f"(bare: unary echo at {rate} calls/s); ratio vs {base:,} watchers",
            figure,
            fmt(bare.get("server_cpu_us_per_item")),
            "1.00x" if reference else fmt_ratio(run["cpu_ratio"]),
            "—" if reference else "≤ 1.2x",
            "—" if reference else met(at_most(run["cpu_ratio"], 1.2)),
        )
    sizes = " / ".join(f"{int(n):,}" for n in runs)
    others = [run for n, run in runs.items() if int(n) != base]
    rates_met = [at_least(run["rate_ratio"], 0.95) for run in others]
    row(
        f"Scaling: reports/s 1 producer paced at {rate}/s got in, beside {sizes} watchers "
        f"of other projects (bare: unary echo calls/s); ratio vs {base:,} watchers",
        " / ".join(fmt(run["headway"]["reports_per_s"]) for run in runs.values()),
        fmt(bare["reports_per_s"]),
        " / ".join(fmt_ratio(run["rate_ratio"]) for run in others),
        "≥ 0.95x",
        met(None if None in rates_met else all(rates_met)),
    )
    row(
        f"Scaling: server CPU with {sizes} watchers of other projects and no reports "
        "(% of a core) / CPU µs per report above that; ratio vs "
        f"{base:,} watchers (above idle)",
        " / ".join(f"{fmt(run['idle']['server_cpu_pct'])} %" for run in runs.values())
        + "; "
        + " / ".join(
            fmt(ref["server_cpu_us_per_report_above_idle"])
            if int(n) == base
            else fmt(run["server_cpu_us_per_report_above_idle"])
            for n, run in runs.items()
        ),
        "—",
        " / ".join(fmt_ratio(run["cpu_ratio_above_idle"]) for run in others),
        "—",
        "—",
    )
    changed = sum(run["events"].get("CHANGED", 0) for run in runs.values())
    changed += runs[str(base)]["events_again"].get("CHANGED", 0)
    bookmarks = " / ".join(fmt(run["events"].get("BOOKMARK", 0)) for run in runs.values())
    row(
        f"Scaling: changes the watchers of other projects received, and bookmarks ({sizes} "
        "watchers; nothing they watch changes)",
        f"{fmt(changed)} changes; {bookmarks} bookmarks",
        "—",
        "—",
        "0 changes",
        met(changed == 0),
    )


def redis_rows(sec: Json, memory_store: Json | None, row: Callable[..., None]) -> None:
    """The Redis store against the memory store (the bare column), each one
    server process on the bench's own redis-server; `memory_store` is the memory
    section's retained operations, when it ran."""
    unary, batched = sec["unary"], sec["batched"]
    um, ur = unary["memory"], unary["redis"]
    row(
        f"Redis store: UpdateOperation calls/s, {ur['in_flight']} in flight over "
        f"{ur['operations']} ops, 1 server process (bare: memory store)",
        fmt(ur["reports_per_s"]),
        fmt(um["reports_per_s"]),
        fmt_ratio(unary["ratio"]),
        "≥ 0.7x",
        met(at_least(unary["ratio"], 0.7)),
    )
    bm, br = batched["memory"], batched["redis"]
    row(
        f"Redis store: BatchUpdateOperations reports/s, batches of {batched['batch']}, "
        f"{br['in_flight']} calls in flight (bare: memory store)",
        fmt(br["reports_per_s"]),
        fmt(bm["reports_per_s"]),
        fmt_ratio(batched["ratio"]),
        "≥ 0.7x",
        met(at_least(batched["ratio"], 0.7)),
    )
    for what, r, m in (
        ("UpdateOperation", ur, um),
        (f"batched report ({batched['batch']})", br, bm),
    ):
        server, redis = r.get("server_cpu_us_per_item"), r.get("redis_cpu_us_per_item")
        total = None if server is None or redis is None else server + redis
        row(
            f"Redis store: CPU µs per {what}, server + redis-server (bare: memory store); "
            "ratio = bare / Redis total",
            f"{fmt(server)} + {fmt(redis)}",
            fmt(m.get("server_cpu_us_per_item")),
            fmt_ratio(ratio(m.get("server_cpu_us_per_item"), total)),
            "—",
            "—",
        )
    workers = sec["workers"]
    w1, w2 = workers["one"], workers["two"]
    split = " / ".join(fmt(c) for c in w2.get("worker_cpu_s", []))
    row(
        f"Redis store: UpdateOperation calls/s with --workers 2, {w2['in_flight']} in flight "
        f"over {workers['channels']} connections (bare: 1 process, the same load); no goal: "
        f"{sec['cores']} cores shared by the workers, redis-server and the load generator "
        f"(workers' CPU s: {split})",
        fmt(w2["reports_per_s"]),
        fmt(w1["reports_per_s"]),
        fmt_ratio(workers["ratio"]),
        "—",
        "—",
    )
    watch = sec["watch"]
    same, cross = watch["same_replica"], watch["other_replica"]
    diff = watch["p99_difference_ms"]
    row(
        f"Redis store: WatchOperation delivery p50 / p99 from a report's send, min_interval 0, "
        f"producer at {fmt(watch['target_rate'])}/s through process A; watcher on process B "
        "(bare: watcher on A)",
        lat(cross),
        lat(same),
        "n/a" if diff is None else f"{diff:+.1f} ms (p99)",
        "p99 ≤ bare + 10 ms",
        met(at_most(diff, 10.0)),
    )
    trips = sec["round_trips"]

    def listing(commands: Json) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(commands.items())) or "none"

    row(
        f"Redis store: Redis round trips per UpdateOperation, cache warm, one at a time "
        f"(top-level commands naming the operation under MONITOR over {trips['reports']} "
        f"reports: {listing(trips['commands'])}; {trips['script_commands_per_report']} more "
        f"per report run inside the script; naming none: {listing(trips['other_commands'])}, "
        f"in as long with no reports: {listing(trips['other_commands_idle'])})",
        fmt(trips["per_report"]),
        "—",
        "—",
        "1",
        met(at_most(trips["per_report"], 1.0)),
    )
    bad = (sec["rejected"], sec["not_applied"], sec["failed_calls"])
    row(
        f"Redis store: reports rejected / not applied / failed calls in the rows above, "
        f"of {fmt(sec['reports_checked'])} acks checked",
        " / ".join(fmt(x) for x in bad),
        "—",
        "—",
        "0 / 0 / 0",
        met(not any(bad)),
    )
    kept = sec["retained_operations"]
    memory_bytes = memory_store.get("bytes_per_operation") if memory_store else None
    row(
        f"Redis store: Redis used_memory per retained finished operation, {kept['operations']} "
        "with a typical payload (bare: memory store RSS per operation, memory section)",
        fmt(kept["bytes_per_operation"], " B"),
        fmt(memory_bytes, " B"),
        fmt_ratio(ratio(kept["bytes_per_operation"], memory_bytes)),
        "—",
        "—",
    )


def sse_rows(sec: Json, row: Callable[..., None]) -> None:
    """SSE clients against WatchOperations watchers (the bare column) of the
    same project on the same server process; ratios are SSE / gRPC. No goals."""
    n, ops = fmt(sec["clients"]), sec["project_operations"]
    sat, paced, memory = sec["saturated"], sec["same_rate"], sec["memory"]
    s, g = sat["sse"], sat["grpc"]
    ps, pg = paced["sse"], paced["grpc"]
    ms_, mg = memory["sse"], memory["grpc"]
    failed = ms_["failed"] + mg["failed"]
    rows = [
        (
            f"SSE: {n} clients of 1 project ({ops} ops), pacing off (minInterval=0), producers "
            f"flat out: states delivered/s (bare: {n} WatchOperations watchers, same server)",
            fmt(s["states_delivered_per_s"]),
            fmt(g["states_delivered_per_s"]),
            fmt_ratio(sat["ratio"]),
        ),
        (
            "SSE: server CPU µs per state delivered, producers flat out "
            "(bare: WatchOperations); ratio = SSE / gRPC",
            fmt(s.get("server_cpu_us_per_item")),
            fmt(g.get("server_cpu_us_per_item")),
            fmt_ratio(sat["cpu_ratio"]),
        ),
        (
            f"SSE: ack→receipt p50 / p99, {n} clients, both at {fmt(paced['rate'])} reports/s "
            "(half the lower ceiling; bare: WatchOperations); server CPU, % of a core",
            f"{lat(ps)}; {fmt(ps['server_cpu_pct'])} %",
            f"{lat(pg)}; {fmt(pg['server_cpu_pct'])} %",
            fmt_ratio(paced["p99_ratio"]) + " (p99)",
        ),
        (
            f"SSE: seconds until all {n} clients synced, a snapshot of {ops} ops each "
            "(bare: WatchOperations)",
            fmt(s["admitted_s"], " s"),
            fmt(g["admitted_s"], " s"),
            fmt_ratio(sat["admitted_ratio"]),
        ),
        (
            f"SSE: server RSS per idle stream, {fmt(ms_['watchers'])} SSE clients (bare: "
            f"{fmt(mg['watchers'])} idle WatchOperations watchers, opened just before them)"
            + (f"; {failed} failed to open" if failed else ""),
            fmt(ms_["bytes_per_watcher"], " B"),
            fmt(mg["bytes_per_watcher"], " B"),
            fmt_ratio(memory["ratio"]),
        ),
    ]
    for figure, sse, grpc_, r in rows:
        row(figure, sse, grpc_, r, "—", "—")


def dashboard_rows(sec: Json, row: Callable[..., None]) -> None:
    """The dashboard under load (the Headway column) against the same page idle
    (the bare column), one browser, one server; ratios are loaded / idle."""
    busy, idle = sec["loaded"], sec["idle"]
    n = fmt(sec["operations"])
    w = f"{sec['window_s']:g} s"
    if sec["rounds"] > 1:
        w = f"{sec['rounds']} windows of {w}"

    def frames(run: Json) -> str:
        return (
            f"{fmt(run['frame_p99_ms'])} / {fmt(run['frame_max_ms'])} ms; "
            f"{run['frames_over_33ms']} over 33 ms"
        )

    def tasks(run: Json) -> str:
        if not run["long_tasks"]:
            return "0"
        return (
            f"{run['long_tasks']}, {fmt(run['long_task_ms'])} ms "
            f"(longest {fmt(run['long_task_max_ms'])} ms)"
        )

    def thread(run: Json) -> str:
        return (
            f"{fmt(run['main_thread_busy_pct'])} / {fmt(run['main_thread_cpu_pct'])} / "
            f"{fmt(run['script_pct'])} %"
        )

    def cpu(run: Json) -> str:
        return (
            f"{fmt(run['browser_cpu_pct'])} / {fmt(run['server_cpu_pct'])} / "
            f"{fmt(run['machine_cpu_pct'])} %"
        )

    def memory(run: Json) -> str:
        return f"{fmt(run['heap_after_gc_bytes'] / 2**20)} MiB; {run['rows']} rows"

    row(
        f"Dashboard: {n} operations of one project, all updated by producers "
        f"({fmt(busy['reports_per_s'])} reports/s achieved of {fmt(sec['target_rate'])}, "
        f"batches of {fmt(sec['batch'])}; the page's stream at the default pacing): "
        f"frames/s over {w} (bare: the same page idle)",
        fmt(busy["fps"]),
        fmt(idle["fps"]),
        fmt_ratio(sec["fps_ratio"]),
        "≥ 0.8x",
        met(at_least(sec["fps_ratio"], 0.8)),
    )
    rows = [
        ("Dashboard: frame interval p99 / max; frames later than 33 ms", frames, sec["p99_ratio"]),
        (f"Dashboard: long tasks (> 50 ms) in {w}: count, total", tasks, None),
        (
            "Dashboard: renderer main thread, % of the window: in tasks (wall) / on a core / "
            "in script",
            thread,
            sec["main_thread_cpu_ratio"],
        ),
        (
            "Dashboard: CPU, % of a core: Chromium (all processes) / the server / the machine "
            f"(all {os.cpu_count()} cores, % of them)",
            cpu,
            None,
        ),
        (
            "Dashboard: JS heap after a GC; table rows in the page",
            memory,
            sec["heap_ratio"],
        ),
    ]
    for figure, show, r in rows:
        row(figure, show(busy), show(idle), fmt_ratio(r), "—", "—")
    row(
        f"Dashboard: seconds until the page shows all {n} operations (a snapshot over SSE); "
        "until every row in view shows its operation's last report once the producers stop",
        f"{fmt(sec['load_s'])} s; {fmt(max(sec['catch_up_s']))} s",
        "—",
        "—",
        "—",
        "—",
    )


def table_rows(sections: Json) -> list[Json]:
    rows: list[Json] = []

    def row(figure: str, headway: str, bare: str, r: str, goal: str, ok: str) -> None:
        rows.append(
            {
                "figure": figure,
                "headway": headway,
                "bare": bare,
                "ratio": r,
                "goal": goal,
                "met": ok,
            }
        )

    def failed(name: str, sec: Json) -> bool:
        if sec.get("status", "ok") != "ok":
            row(f"{name}: {sec['status']}", "n/a", "n/a", "n/a", "—", "n/a")
            return True
        return False

    sec = sections.get("ingest", {"status": "not run"})
    if not failed("Update ingest", sec):
        for n, run in sec["runs"].items():
            h, b = run["headway"], run["bare"]
            row(
                f"UpdateOperation calls/s, {n} in flight (bare: unary echo)",
                fmt(h["calls_per_s"]),
                fmt(b["calls_per_s"]),
                fmt_ratio(run["ratio"]),
                "≥ 0.8x",
                met(at_least(run["ratio"], 0.8)),
            )
            row(
                f"Server CPU µs per UpdateOperation, {n} in flight (bare: per echo); "
                "ratio = bare / Headway",
                fmt(h.get("server_cpu_us_per_item")),
                fmt(b.get("server_cpu_us_per_item")),
                fmt_ratio(ratio(b.get("server_cpu_us_per_item"), h.get("server_cpu_us_per_item"))),
                "—",
                "—",
            )
            row(
                f"UpdateOperation p50 / p99 latency, {n} in flight",
                lat(h),
                lat(b),
                fmt_ratio(ratio(h["p99_ms"], b["p99_ms"])) + " (p99)",
                "—",
                "—",
            )
    sec = sections.get("streamed_reports", {"status": "not run"})
    if sec.get("status") == NOT_IMPLEMENTED:
        row(
            "ReportProgress reports/s (bare: unary UpdateOperation, 64 in flight)",
            NOT_IMPLEMENTED,
            fmt(sec.get("unary_update_calls_per_s")),
            "n/a",
            "—",
            "—",
        )
    elif not failed("Streamed reports", sec):
        h = sec["headway"]
        row(
            f"ReportProgress reports/s, {sec['streams']} streams x {sec['window']} "
            "unacked (bare: unary UpdateOperation, 64 in flight)",
            fmt(h["reports_per_s"]),
            fmt(sec["unary_update_calls_per_s"]),
            fmt_ratio(sec["ratio_vs_unary"]),
            "—",
            "—",
        )
        row(
            "ReportProgress reports/s vs bare bidirectional echo",
            fmt(h["reports_per_s"]),
            fmt(sec["bare_bidi_echo"].get("reports_per_s")),
            fmt_ratio(sec["ratio_vs_bare_bidi"]),
            "—",
            "—",
        )
    sec = sections.get("batched", {"status": "not run"})
    if sec.get("status") == NOT_IMPLEMENTED:
        row("BatchUpdateOperations reports/s", NOT_IMPLEMENTED, "n/a", "n/a", "≥ 10x", "n/a")
    elif not failed("Batched reports", sec):
        unary = sec["unary"]
        for b, run in sec["batches"].items():
            h = run["headway"]
            goal = int(b) >= 100
            row(
                f"BatchUpdateOperations reports/s, batches of {b} over {sec['operations']} ops, "
                f"{h['in_flight']} calls in flight (bare: unary UpdateOperation, "
                f"{unary['in_flight']} in flight, same ops)",
                fmt(h["reports_per_s"]),
                fmt(unary["reports_per_s"]),
                fmt_ratio(run["ratio_vs_unary"]),
                "≥ 10x" if goal else "—",
                met(at_least(run["ratio_vs_unary"], 10)) if goal else "—",
            )
        sizes = " / ".join(sec["batches"])
        row(
            f"Server CPU µs per report, batches of {sizes} (bare: unary UpdateOperation); "
            "ratio = unary / batched",
            " / ".join(
                fmt(r["headway"].get("server_cpu_us_per_item")) for r in sec["batches"].values()
            ),
            fmt(unary.get("server_cpu_us_per_item")),
            " / ".join(fmt_ratio(r["cpu_ratio_unary_vs_batch"]) for r in sec["batches"].values()),
            "—",
            "—",
        )
        echo = sec["bare_batch_echo"]
        row(
            f"BatchUpdateOperations reports/s, batches of {' / '.join(echo)} "
            "(bare: batch echo, no work per report)",
            " / ".join(fmt(sec["batches"][b]["headway"]["reports_per_s"]) for b in echo),
            " / ".join(fmt(r["bare"]["reports_per_s"]) for r in echo.values()),
            " / ".join(fmt_ratio(r["ratio"]) for r in echo.values()),
            "—",
            "—",
        )
        bad = (sec["rejected"], sec["not_applied"], sec["failed_calls"])
        row(
            f"Batched and unary reports rejected / not applied / failed calls, "
            f"of {fmt(sec['reports_checked'])} acks checked",
            " / ".join(fmt(x) for x in bad),
            "—",
            "—",
            "0 / 0 / 0",
            met(not any(bad)),
        )
    sec = sections.get("fanout", {"status": "not run"})
    if not failed("Fan-out", sec):
        n = sec["watchers"]
        bare_sat = sec["bare"]["saturated"]
        row(
            f"WatchOperation, {n} watchers of 1 op, pacing off: states delivered/s "
            "(bare: messages/s)",
            fmt(sec["operation"]["saturated"]["states_delivered_per_s"]),
            fmt(bare_sat["states_delivered_per_s"]),
            fmt_ratio(sec["operation_ratio"]),
            "≥ 0.8x",
            met(at_least(sec["operation_ratio"], 0.8)),
        )
        row(
            f"WatchOperations, {n} watchers of {sec['project_operations']} ops, pacing off: "
            "states delivered/s (bare: messages/s)",
            fmt(sec["project"]["saturated"]["states_delivered_per_s"]),
            fmt(bare_sat["states_delivered_per_s"]),
            fmt_ratio(sec["project_ratio"]),
            "≥ 3x",
            met(at_least(sec["project_ratio"], 3)),
        )
        for name, key in (("WatchOperation", "operation"), ("WatchOperations", "project")):
            h, b = sec[key]["saturated"], bare_sat
            row(
                f"{name}, pacing off: server CPU µs per state delivered (bare: per message); "
                "ratio = bare / Headway",
                fmt(h.get("server_cpu_us_per_item")),
                fmt(b.get("server_cpu_us_per_item")),
                fmt_ratio(ratio(b.get("server_cpu_us_per_item"), h.get("server_cpu_us_per_item"))),
                "—",
                "—",
            )
        for name, key in (("WatchOperation", "operation"), ("WatchOperations", "project")):
            h, b = sec[key]["half_rate"], sec["bare"]["half_rate"]
            p99 = h.get("p99_ms")
            row(
                f"{name}, pacing off: ack→receipt p50 / p99 at half the saturating rate "
                f"({fmt(h['target_rate'])} reports/s; bare {fmt(b['target_rate'])}/s)",
                lat(h),
                lat(b),
                fmt_ratio(ratio(p99, b.get("p99_ms"))) + " (p99)",
                "p99 < 250 ms" if key == "project" else "—",
                met(at_most(p99, 250)) if key == "project" else "—",
            )
        if "operation_paced" in sec:
            paced_rows(sec, row)
    sec = sections.get("slow_consumers", {"status": "not run"})
    if not failed("Slow consumers", sec):
        a, m = sec["with_slow"], sec["without_slow"]
        row(
            f"Slow consumers, default pacing: readers' p99 with {sec['never_read']} of "
            f"{sec['watchers']} never reading (bare: same readers alone)",
            f"{fmt(a['p99_ms'])} ms",
            f"{fmt(m['p99_ms'])} ms",
            fmt_ratio(sec["p99_ratio"]),
            "≤ 1.1x",
            met(at_most(sec["p99_ratio"], 1.1)),
        )
        row(
            f"Slow consumers, default pacing: producer reports/s (target {fmt(sec['rate'])}/s)",
            fmt(a["producer_reports_per_s"]),
            fmt(m["producer_reports_per_s"]),
            fmt_ratio(sec["producer_ratio"]),
            "≥ 0.95x",
            met(at_least(sec["producer_ratio"], 0.95)),
        )
        growth = sec["rss_growth"]
        row(
            "Slow consumers, default pacing: server RSS first → last quarter of the run",
            f"{fmt(sec['rss_first_quarter_bytes'] / 2**20)} → "
            f"{fmt(sec['rss_last_quarter_bytes'] / 2**20)} MiB",
            "n/a"
            if sec.get("rss_growth_without_slow") is None
            else f"{100 * sec['rss_growth_without_slow']:+.1f} % without them",
            "n/a" if growth is None else f"{100 * growth:+.1f} %",
            "< 5 % growth",
            met(at_most(growth, 0.05)),
        )
    sec = sections.get("memory", {"status": "not run"})
    if not failed("Memory", sec):
        idle = sec["idle_watchers"]
        row(
            f"RSS per idle watcher, {idle['headway']['watchers']} WatchOperations "
            "(bare: Subscribe)",
            fmt(idle["headway"]["bytes_per_watcher"], " B"),
            fmt(idle["bare"]["bytes_per_watcher"], " B"),
            fmt_ratio(idle["ratio"]),
            "≤ 1.25x",
            met(at_most(idle["ratio"], 1.25)),
        )
        kept = sec["retained_operations"]
        row(
            f"RSS per retained operation, {kept['operations']} with a typical payload "
            f"({kept['serialized_operation_bytes']} B serialized)",
            fmt(kept["bytes_per_operation"], " B"),
            "—",
            "—",
            "< 2048 B",
            met(at_most(kept["bytes_per_operation"], 2047)),
        )
    sec = sections.get("admission", {"status": "not run"})
    if not failed("Admission", sec):
        h, b = sec["headway"], sec["bare"]
        row(
            f"Admission: {h['streams']} WatchOperations opened at once, admitted / CANCELLED",
            f"{h['admitted']} / {h['cancelled']}",
            f"{b['admitted']} / {b['cancelled']}",
            "—",
            "all / 0",
            met(h["admitted"] == h["streams"] and h["cancelled"] == 0),
        )
        row(
            "Admission: seconds until all SYNCED (bare: first message)",
            fmt(h["seconds_to_all_synced"], " s"),
            fmt(b["seconds_to_all_synced"], " s"),
            fmt_ratio(sec["ratio_time"]),
            "—",
            "—",
        )
    sec = sections.get("scaling", {"status": "not run"})
    if not failed("Scaling", sec):
        for n, run in sec["ingest"].items():
            row(
                f"Scaling: UpdateOperation calls/s over {n} ops, 32 in flight (bare: echo)",
                fmt(run["headway"]["calls_per_s"]),
                fmt(run["bare_calls_per_s"]),
                fmt_ratio(run["ratio"]),
                "—",
                "—",
            )
        for n, run in sec["fanout"].items():
            row(
                f"Scaling: WatchOperation states delivered/s, {n} watchers, pacing off "
                "(bare: messages/s)",
                fmt(run["headway"]["states_delivered_per_s"]),
                fmt(run["bare"]["states_delivered_per_s"]),
                fmt_ratio(run["ratio"]),
                "—",
                "—",
            )
    sec = sections.get("unrelated_watchers", {"status": "not run"})
    if not failed("Watchers of other projects", sec):
        unrelated_rows(sec, row)
    sec = sections.get("redis", {"status": "not run"})
    if not failed("Redis store", sec):
        memory_section = sections.get("memory", {})
        redis_rows(sec, memory_section.get("retained_operations"), row)
    sec = sections.get("sse", {"status": "not run"})
    if not failed("SSE against gRPC watchers", sec):
        sse_rows(sec, row)
    sec = sections.get("dashboard", {"status": "not run"})
    if not failed("Dashboard in a browser", sec):
        dashboard_rows(sec, row)
    return rows


def markdown(results: Json) -> str:
    m = results["machine"]
    lines = [
        f"# Headway benchmark ({results['mode']})",
        "",
        f"{m['cores']} cores, Python {m['python']}, grpcio {m['grpcio']}, "
        f"protobuf {m['protobuf']}, {m['platform']}; {results['seconds']:.0f} s.",
        "",
        "Server and load generator are separate processes on 127.0.0.1 sharing these "
        "cores: the load generator (one asyncio process) competes with the server for "
        "CPU, so each run records both processes' CPU use in results.json. "
        "Ratios compare Headway with the bare grpc.aio server measured in the same run; "
        "the ingest, batched, fan-out, slow-consumer and Redis runs alternate with their "
        f"baselines {results['repeats']} times and show each side's median run (every run's figure "
        "is in results.json). Watchers ask for pacing off (min_interval 0) where a row says "
        "so, and get the server's default pacing where it says default pacing.",
        "",
    ]
    if results["sections"].get("redis", {}).get("status") == "ok":
        lines += [
            "The Redis rows run against the bench's own redis-server (a free port, a "
            'temporary directory, `--save ""` and `--appendonly no`: no persistence cost), '
            "never a shared one; their bare column is the memory store, or one process "
            "where a row compares --workers 2.",
            "",
        ]
    if not results.get("server", {}).get("watch_min_interval_flag", True):
        lines += [
            "This server has no `--watch-min-interval`: it ignores `min_interval`, so the "
            "default-pacing rows ran unpaced.",
            "",
        ]
    lines += [
        "| figure | Headway | bare | ratio | goal | met? |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["table"]:
        cells = [r["figure"], r["headway"], r["bare"], r["ratio"], r["goal"], r["met"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def server_info() -> Json:
    """What the Headway server under test offers that changes what rows mean."""
    help_text = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    where = subprocess.run(
        [sys.executable, "-c", "import headway_server; print(headway_server.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.strip()
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "server"], capture_output=True, text=True, check=False
    ).stdout
    return {
        # Without it the server ignores min_interval: "default pacing" rows run unpaced.
        "watch_min_interval_flag": "--watch-min-interval" in help_text,
        "package": where or None,
        "commit": commit or None,
        # Server files changed since that commit when the run started.
        "server_changes": changed.split("\n")[:-1] if changed else [],
    }


def machine() -> Json:
    import google.protobuf

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "platform": platform.platform(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# --------------------------------------------------------------------------
# Main


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_all(sizes: Sizes, only: set[str], log_dir: Path) -> Json:
    sections: Json = {}

    async def run(name: str, make: Callable[[], Awaitable[Json]]) -> None:
        if name not in only:
            if name in sizes.sections:
                sections[name] = {"status": "skipped"}
            else:
                print(
                    f"[bench] {name}: not in a {sizes.mode} run unless named with --only",
                    file=sys.stderr,
                )
            return
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            result = await asyncio.wait_for(make(), sizes.section_timeout)
            result.setdefault("status", "ok")
        except TimeoutError:
            result = {"status": f"timeout after {sizes.section_timeout:.0f}s"}
        except Exception as exc:
            result = {"status": f"error: {type(exc).__name__}: {exc}"[:500]}
        finally:
            _kill_children()
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[bench] {name}: {result['status']} in {result['seconds']}s", file=sys.stderr)
        sections[name] = result

    await run("ingest", lambda: section_ingest(sizes, log_dir))
    unary = sections["ingest"].get("runs", {}).get("64", {}).get("headway", {}).get("calls_per_s")
    await run("streamed_reports", lambda: section_streamed(sizes, log_dir, unary))
    await run("batched", lambda: section_batched(sizes, log_dir))
    await run("fanout", lambda: section_fanout(sizes, log_dir))
    half = sections["fanout"].get("project_half_rate_reports_per_s")
    await run("slow_consumers", lambda: section_slow(sizes, log_dir, half))
    await run("memory", lambda: section_memory(sizes, log_dir))
    await run("admission", lambda: section_admission(sizes, log_dir))
    await run("scaling", lambda: section_scaling(sizes, log_dir))
    await run("unrelated_watchers", lambda: section_unrelated(sizes, log_dir))
    await run("redis", lambda: section_redis(sizes, log_dir))
    await run("sse", lambda: section_sse(sizes, log_dir))
    await run("dashboard", lambda: section_dashboard(sizes, log_dir))
    return sections


@contextlib.contextmanager
def watchdog(limit: float) -> Iterator[None]:
    """Kills the servers and exits if the whole run overruns its bound."""

    def fire() -> None:
        print(f"[bench] overran {limit:.0f}s; stopping", file=sys.stderr, flush=True)
        _kill_children()
        os._exit(2)

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Headway benchmarks against bare grpc.aio")
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    only = set(args.only or sizes.sections)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs.tmp"  # the servers' output, kept for a failed run
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir()
    raise_fd_limit(4 * sizes.admission_streams + 1024)

    server = server_info()  # the code the run starts with (others may edit it meanwhile)
    started = time.perf_counter()
    try:
        with watchdog(sizes.total_limit):
            sections = asyncio.run(run_all(sizes, only, log_dir))
    finally:
        _kill_children()
    results: Json = {
        "mode": sizes.mode,
        "repeats": sizes.repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
        "server": server,
        "sizes": dataclasses.asdict(sizes),
        "sections": sections,
    }
    results["table"] = table_rows(sections)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    print(text)
    bad = [
        n
        for n, s in sections.items()
        if s["status"] not in ("ok", NOT_IMPLEMENTED) and not s["status"].startswith("skipped")
    ]
    if bad:
        print(f"[bench] failed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
