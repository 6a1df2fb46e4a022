"""Tracking never breaks the job: producers keep working when Headway is down, slow or
restarted, and the operation ends up correct once the server answers.

Real server processes (`python -m headway_server serve`, or a deliberately slow one) on
free ports of 127.0.0.1, killed and restarted by the tests; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import (
    AsyncHeadwayClient,
    HeadwayClient,
    InvalidArgument,
    OperationNotFound,
    RetryPolicy,
    Unavailable,
)

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).resolve().parent
# Short backoffs, so a server that comes back is found within a fraction of a second.
FAST = RetryPolicy(attempts=2, initial_backoff=0.05, max_backoff=0.3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A Headway server in its own process on a fixed port: started, killed, started again."""

    def __init__(self, port: int, command: list[str] | None = None) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.command = command or [
            sys.executable,
            "-m",
            "headway_server",
            "serve",
            "--listen",
            self.address,
            "--log-level",
            "WARNING",
            "--shutdown-grace",
            "0.5",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        assert self.process is None
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, "the server process exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen in time"
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=20)


@pytest.fixture
def servers() -> Iterator[Callable[..., ServerProcess]]:
    made: list[ServerProcess] = []

    def make(command: list[str] | None = None, port: int | None = None) -> ServerProcess:
        server = ServerProcess(port or free_port(), command)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> Callable[[str], int]:
    """How many warnings of the client contain a text."""
    caplog.set_level(logging.WARNING, logger="headway_client")

    def count(text: str) -> int:
        return sum(
            1
            for record in caplog.records
            if record.name == "headway_client" and text in record.getMessage()
        )

    return count


def stored(address: str, project: str) -> list[pb.Operation]:
    with HeadwayClient(address, timeout=5, strict=True) as reader:
        return reader.list(project=project)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_down_at_start_the_operation_appears_late_but_correct(servers, warnings):
    server = servers()
    with HeadwayClient(server.address, timeout=1, retry=FAST, finish_timeout=15) as client:
        started = time.monotonic()
        op = client.start(kind="late", project="down-at-start", total=100, unit="rows")
        assert time.monotonic() - started < 1.0, "start() waited for the server"
        assert not op.connected and op.id.startswith("op-")
        for i in range(100):
            if i == 40:
                server.start()
            op.advance(1, counters={"rows": 1}, checkpoint=f"row-{i}")
            time.sleep(0.005)
        done = op.complete()
        assert op.connected and not op.dropped
    assert done.state == pb.Operation.SUCCEEDED
    [final] = stored(server.address, "down-at-start")
    assert final.id == op.id
    assert (final.state, final.completed, final.total) == (pb.Operation.SUCCEEDED, 100, 100)
    assert dict(final.counters) == {"rows": 100}
    assert final.checkpoint == "row-99"
    assert warnings("cannot reach") == 1  # one line per outage, not one per report
    assert warnings("answers again") == 1


def test_killed_mid_run_and_restarted_empty_registers_again_exactly(servers, warnings):
    server = servers()
    server.start()
    with HeadwayClient(server.address, timeout=1, retry=FAST, finish_timeout=15) as client:
        with client.start(
            kind="restart", project="restarted", total=100, stages=["fetch", ("index", 3)]
        ) as op:
            op.stage("fetch", total=60)
            for i in range(100):
                if i == 30:
                    server.stop(signal.SIGKILL)
                if i == 50:
                    server.start()  # a memory store: it comes back empty
                if i == 60:
                    op.stage("index", total=40)
                op.advance(1, counters={"rows": 1, "bytes": 10}, measures={"cost": i / 2})
                time.sleep(0.01)
    [final] = stored(server.address, "restarted")
    # Measures are absolute: the server that lost them gets the latest again.
    assert dict(final.measures) == {"cost": 49.5}
    assert final.id == op.id
    assert (final.state, final.completed, final.total) == (pb.Operation.SUCCEEDED, 100, 100)
    # Counters are exact: every report counted once, across the lost server and the new one.
    assert dict(final.counters) == {"rows": 100, "bytes": 1000}
    assert [(s.name, s.completed, s.total) for s in final.stages] == [
        ("fetch", 60, 60),
        ("index", 40, 40),
    ]
    assert warnings("unknown to") == 1
    assert warnings("cannot reach") == 1


def test_server_restarted_on_the_same_port_while_track_runs(servers):
    server = servers()
    server.start()
    items = list(range(150))
    seen = []
    restart = threading.Thread(
        target=lambda: (server.stop(signal.SIGTERM), server.start()), daemon=True
    )
    with HeadwayClient(server.address, timeout=1, retry=FAST, finish_timeout=15) as client:
        for item in client.track(items, kind="track", project="track-restart"):
            seen.append(item)
            if item == 40:
                restart.start()
            time.sleep(0.01)
        restart.join(20)
    assert seen == items
    [final] = stored(server.address, "track-restart")  # registered again under the same id
    assert (final.state, final.completed, final.total) == (pb.Operation.SUCCEEDED, 150, 150)


def test_a_server_answering_past_the_deadline_never_holds_the_job(servers, tmp_path):
    flag = tmp_path / "slow"
    flag.touch()
    port = free_port()
    server = servers(
        [sys.executable, str(HERE / "slow_server.py"), str(port), str(flag), "2.0"], port
    )
    server.start()
    with HeadwayClient(server.address, timeout=0.5, retry=FAST, finish_timeout=1) as client:
        started = time.monotonic()
        with client.start(kind="slow", project="slow", total=50) as op:
            for _ in range(50):
                op.advance(1, counters={"rows": 1})
                time.sleep(0.01)
        # start: 0.5 s at most, the loop 0.5 s, the ending: finish_timeout (1 s).
        assert time.monotonic() - started < 4.0
        assert not op.connected
        flag.unlink()  # the server is fast again: the ending goes on in the background
        eventually(lambda: [o.state for o in stored(server.address, "slow")] == [4], 15)
    [final] = stored(server.address, "slow")
    assert (final.id, final.completed, dict(final.counters)) == (op.id, 50, {"rows": 50})


def headway_cli(target: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "headway_client.cli", "--target", target, *args]


DATA = b"".join(b"line %d \xff\xfe caf\xc3\xa9\r\n" % i for i in range(300)) + b"no newline"


def test_pipe_without_a_server_passes_everything_through():
    started = time.monotonic()
    piped = subprocess.run(
        headway_cli(f"127.0.0.1:{free_port()}", "pipe", "--total", "301", "--finish-timeout", "1"),
        input=DATA,
        capture_output=True,
        timeout=30,
    )
    assert piped.stdout == DATA  # byte for byte
    assert piped.returncode == 0
    stderr = piped.stderr.decode()
    assert "cannot reach" in stderr and "Traceback" not in stderr
    assert time.monotonic() - started < 15


def test_pipe_with_a_server_dying_mid_stream(servers):
    server = servers()
    server.start()
    pipe = subprocess.Popen(
        headway_cli(server.address, "pipe", "--project", "pipe-dies", "--finish-timeout", "1"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert pipe.stdin is not None and pipe.stdout is not None
    received: list[bytes] = []
    stdout = pipe.stdout
    reader = threading.Thread(target=lambda: received.append(stdout.read()), daemon=True)
    reader.start()
    try:
        lines = DATA.splitlines(keepends=True)
        for i, line in enumerate(lines):
            pipe.stdin.write(line)
            pipe.stdin.flush()
            if i == 100:
                eventually(lambda: len(stored(server.address, "pipe-dies")) == 1)
                server.stop(signal.SIGKILL)
            time.sleep(0.002)
        pipe.stdin.close()
        assert pipe.wait(timeout=30) == 0
        reader.join(10)
    finally:
        pipe.kill()
        pipe.wait()
        assert pipe.stderr is not None
        stderr = pipe.stderr.read().decode()
        stdout.close()
        pipe.stderr.close()
    assert received == [DATA]
    assert "cannot reach" in stderr and "Traceback" not in stderr


async def test_async_down_at_start_then_restarted_empty(servers, warnings):
    server = servers()
    async with AsyncHeadwayClient(
        server.address, timeout=1, retry=FAST, finish_timeout=15
    ) as client:
        started = time.monotonic()
        op = await client.start(kind="aio", project="aio-best-effort", total=90)
        assert time.monotonic() - started < 1.0
        async with op:
            for i in range(90):
                if i == 20:
                    await asyncio.to_thread(server.start)
                if i == 45:
                    while not op.connected:  # registered late, then lost with the server
                        assert time.monotonic() - started < 20
                        await asyncio.sleep(0.02)
                    await asyncio.to_thread(server.stop, signal.SIGKILL)
                if i == 60:
                    await asyncio.to_thread(server.start)
                op.advance(1, counters={"rows": 2})
                await asyncio.sleep(0.01)
    [final] = stored(server.address, "aio-best-effort")
    assert (final.id, final.state, final.completed) == (op.id, pb.Operation.SUCCEEDED, 90)
    assert dict(final.counters) == {"rows": 180}
    assert warnings("unknown to") == 1


def test_a_deleted_operation_stays_deleted(grpc_server, warnings):
    with HeadwayClient(grpc_server.address, timeout=2, retry=FAST, finish_timeout=2) as client:
        with client.start(kind="del", project="deleted", total=10, min_interval=0) as op:
            op.advance(1)
            assert op.flush()
            client.delete(op.id)
            for _ in range(9):
                op.advance(1)  # never raises, and never brings it back
            assert not op.flush()
        assert op.dropped
        with pytest.raises(OperationNotFound):
            client.get(op.id)
    assert warnings("deleted on the server") == 1
    assert warnings("registering it again") == 0


async def test_async_deleted_operation_stays_deleted(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=2, finish_timeout=2) as client:
        async with await client.start(kind="del", project="aio-deleted", min_interval=0) as op:
            op.advance(1)
            assert await op.flush()
            await client.delete(op.id)
            op.advance(1)
            assert not await op.flush()
        assert op.dropped
        with pytest.raises(OperationNotFound):
            await client.get(op.id)


def test_cancellation_is_still_heard(grpc_server):
    with HeadwayClient(grpc_server.address, timeout=2, finish_timeout=2) as client:
        op = client.start(kind="c", project="cancel-best-effort", min_interval=0)
        op.advance(1)
        op.flush()
        client.cancel(op.id, "stop")
        op.advance(1)
        op.flush()
        assert op.cancel_requested
        op.fail(pb.OperationError(code="CANCELLED"))
        assert client.get(op.id).state == pb.Operation.CANCELLED


def test_strict_restores_raising(grpc_server):
    down = f"127.0.0.1:{free_port()}"
    with HeadwayClient(down, timeout=0.5, retry=FAST, strict=True) as client:
        with pytest.raises(Unavailable):
            client.start(kind="strict")
    with HeadwayClient(down, timeout=0.5, retry=FAST) as client:
        with pytest.raises(Unavailable):
            client.start(kind="strict", strict=True)  # per handle
    with HeadwayClient(grpc_server.address, timeout=2, strict=True) as client:
        op = client.start(kind="strict", project="strict", min_interval=0)
        op.advance(1)
        op.flush(timeout=5)
        client.delete(op.id)
        op.advance(1)
        with pytest.raises(OperationNotFound):
            op.flush(timeout=5)


def test_the_callers_own_bugs_still_raise_at_once_even_offline():
    with HeadwayClient(f"127.0.0.1:{free_port()}", timeout=0.5, finish_timeout=0.2) as client:
        op = client.start(kind="bugs", stages=["fetch", "index"])
        assert not op.connected
        with pytest.raises(InvalidArgument, match="n: must not be negative"):
            op.advance(-1)
        with pytest.raises(InvalidArgument, match="counters"):
            op.update(counters={"rows": -2})
        with pytest.raises(InvalidArgument, match="stage"):
            op.stage("no-such-stage")
        op.stage("index")
        with pytest.raises(InvalidArgument, match="before the current stage"):
            op.stage("fetch")
        # The job's own exception propagates unchanged, the tracker out of reach or not.
        with pytest.raises(KeyError, match="mine"), op:
            raise KeyError("mine")


def test_what_is_kept_offline_is_bounded_and_exact():
    from headway_client._reports import MAX_SEGMENTS, PendingReports

    pending = PendingReports("op-1")
    for i in range(10_000):
        pending.add(stage=f"s{i % 500}-{i}", stage_completed=1, counters={"rows": 1})
    requests = pending.take()
    assert len(requests) <= MAX_SEGMENTS  # not one per report, nor one per stage entered
    assert sum(r.counters["rows"] for r in requests) == 10_000  # merged, not lost
    assert requests[-1].stage == "s499-9999"


def test_pipe_exit_status_and_stderr_warning_are_quiet_when_all_is_well(grpc_server):
    piped = subprocess.run(
        headway_cli(grpc_server.address, "pipe", "--project", "pipe-ok"),
        input=DATA,
        capture_output=True,
        timeout=30,
        env={**os.environ},
    )
    assert (piped.returncode, piped.stdout) == (0, DATA)
    assert "cannot reach" not in piped.stderr.decode()
    [final] = stored(grpc_server.address, "pipe-ok")
    assert (final.state, final.completed) == (pb.Operation.SUCCEEDED, 301)
