"""Headway on Redis as deployed: real server processes, a real redis-server,
SIGKILLed servers, a killed, stopped and flushed Redis.

Each test starts its own redis-server (AOF, appendfsync always) in a temporary
directory on a free port, never the machine's shared one.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_client import HeadwayClient

if TYPE_CHECKING:  # mypy knows the helpers as tests.*, pytest by their module names
    from tests import watch_checks as wc
    from tests.conftest import StreamRecorder
    from tests.redis_e2e import ROOT, ServerProcess, wait_for_health
    from tests.redis_support import RedisServer, free_port
else:
    import watch_checks as wc
    from conftest import StreamRecorder
    from redis_e2e import ROOT, ServerProcess, wait_for_health
    from redis_support import RedisServer, free_port

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, appendonly=True).start()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()


def serve(servers: list[ServerProcess], redis_server: RedisServer) -> ServerProcess:
    server = ServerProcess(redis_server.url, free_port()).start()
    servers.append(server)
    return server


def stub_for(server: ServerProcess) -> tuple[grpc.Channel, pb_grpc.ProgressTrackerStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.ProgressTrackerStub(channel)


def start(stub: pb_grpc.ProgressTrackerStub, project: str, request_id: str) -> pb.Operation:
    return stub.StartOperation(
        pb.StartOperationRequest(
            kind="ingest", project=project, total=100, unit="files", request_id=request_id
        ),
        timeout=5,
    )


def report(stub: pb_grpc.ProgressTrackerStub, operation_id: str, completed: int) -> int:
    """Reports progress; the revision it was stored at."""
    reply = stub.UpdateOperation(
        pb.UpdateOperationRequest(
            operation_id=operation_id, completed=completed, message=f"at {completed}"
        ),
        timeout=5,
    )
    assert reply.applied
    return reply.revision


def everything(stub: pb_grpc.ProgressTrackerStub, ids: list[str]) -> dict[str, object]:
    """What a user can read about these operations, as comparable values."""
    seen: dict[str, object] = {}
    for operation_id in ids:
        seen[f"op {operation_id}"] = wc.serialized(
            stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=5)
        )
        logs = stub.ListLogs(pb.ListLogsRequest(operation_id=operation_id), timeout=5)
        seen[f"logs {operation_id}"] = logs.SerializeToString(deterministic=True)
        timeline = stub.GetTimeline(pb.GetTimelineRequest(operation_id=operation_id), timeout=5)
        seen[f"timeline {operation_id}"] = timeline.SerializeToString(deterministic=True)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    seen["stats"] = json_format.MessageToDict(stats)
    return seen


def watch(stub: pb_grpc.ProgressTrackerStub, project: str, **request: object) -> StreamRecorder:
    return StreamRecorder(
        stub.WatchOperations(
            pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project), **request),  # type: ignore[arg-type]
            timeout=60,
        )
    )


def test_a_killed_server_loses_nothing_and_its_watchers_resume_on_another(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    a = serve(servers, redis_server)
    channel, stub = stub_for(a)
    project = wc.unique("restart")
    ops = [start(stub, project, f"job-{i}") for i in range(3)]
    ids = [op.id for op in ops]
    for i, op in enumerate(ops):
        report(stub, op.id, 10 * (i + 1))
        stub.ReportLogs(
            pb.ReportLogsRequest(
                operation_id=op.id,
                entries=[pb.LogEntry(level=pb.LogEntry.ERROR, message=f"bad file {i}")],
            ),
            timeout=5,
        )
    stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=ids[0]), timeout=5)

    watcher = watch(stub, project, min_interval={"nanos": 0})
    initial = wc.read_until(watcher, wc.is_type(wc.SYNCED))
    synced = initial[-1]
    assert synced.epoch, "SYNCED carries the store's epoch"
    last = report(stub, ids[1], 55)
    seen = wc.read_until(watcher, wc.at_revision(last))
    resume_at = max(e.revision for e in initial + seen)
    watcher.cancel()
    before = everything(stub, ids)
    channel.close()

    a.kill()
    b = serve(servers, redis_server)
    channel, stub = stub_for(b)
    assert everything(stub, ids) == before
    # A retried start lands on the other server and finds the same operation.
    assert start(stub, project, "job-2").id == ids[2]
    # Changes made after the watcher's position, then it resumes on B.
    later = [(ids[1], report(stub, ids[1], 70)), (ids[2], report(stub, ids[2], 80))]
    resumed = watch(stub, project, from_revision=resume_at, from_epoch=synced.epoch)
    events = wc.read_until(resumed, wc.is_type(wc.SYNCED))
    resumed.cancel()
    assert [e.type for e in events if e.type == wc.RESET] == []
    changed = [e for e in events if e.type == wc.CHANGED]
    assert [(e.operation.id, e.revision) for e in changed] == later
    wc.check_revisions(events, from_revision=resume_at)
    channel.close()


def test_redis_killed_and_restarted_keeps_every_acknowledged_write(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    a = serve(servers, redis_server)
    channel, stub = stub_for(a)
    project = wc.unique("aof")
    acknowledged: dict[str, tuple[int, int]] = {}
    for i in range(20):
        op = start(stub, project, f"r{i}")
        acknowledged[op.id] = (report(stub, op.id, i + 1), i + 1)
    redis_server.restart(kill=True)
    wait_for_health(a.address, SERVING)
    for operation_id, (revision, completed) in acknowledged.items():
        stored = stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=5)
        assert (stored.revision, stored.completed) == (revision, completed)
    # And the server goes on writing without a restart of its own.
    report(stub, next(iter(acknowledged)), 50)
    channel.close()


def test_redis_stopped_turns_calls_unavailable_and_health_not_serving_until_it_is_back(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    a = serve(servers, redis_server)
    channel, stub = stub_for(a)
    project = wc.unique("outage")
    op = start(stub, project, "one")
    watcher = watch(stub, project)
    wc.read_until(watcher, wc.is_type(wc.SYNCED))

    redis_server.stop()
    wait_for_health(a.address, NOT_SERVING)
    for call in (
        lambda: stub.GetOperation(pb.GetOperationRequest(operation_id=op.id), timeout=10),
        lambda: report(stub, op.id, 5),
        lambda: start(stub, project, "two"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "store redis://127.0.0.1" in (caught.value.details() or "")
    # The watch stream ends UNAVAILABLE, telling the watcher where to resume.
    error = watcher.wait_end(timeout=15)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    trailer: Any = error.trailing_metadata() or ()
    resume = [value for key, value in trailer if key == "headway-resume-revision"]
    assert resume and int(resume[0]) >= op.revision
    assert a.alive

    redis_server.start()
    wait_for_health(a.address, SERVING)
    assert report(stub, op.id, 5) > op.revision
    channel.close()


def test_a_flushed_redis_gets_watchers_a_reset_never_a_wrong_resume(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    a = serve(servers, redis_server)
    channel, stub = stub_for(a)
    project = wc.unique("flush")
    ops = [start(stub, project, f"f{i}") for i in range(3)]
    for op in ops:
        report(stub, op.id, 10)
    watcher = watch(stub, project, min_interval={"nanos": 0})
    synced = wc.read_until(watcher, wc.is_type(wc.SYNCED))[-1]

    redis_server.flush()
    fresh = start(stub, project, "after-flush")
    events = wc.read_until(watcher, wc.is_type(wc.SYNCED), timeout=10)
    types = [e.type for e in events]
    assert wc.RESET in types, wc.describe(events)
    after_reset = events[types.index(wc.RESET) :]
    assert [e.operation.id for e in after_reset if e.type == wc.SNAPSHOT] == [fresh.id]
    assert after_reset[-1].epoch and after_reset[-1].epoch != synced.epoch
    watcher.cancel()

    # A watcher resuming from a position of the old keyspace starts over too,
    # even where the new keyspace has reached that revision number.
    for i in range(synced.revision + 1):
        report(stub, fresh.id, i + 1)
    resumed = watch(stub, project, from_revision=synced.revision, from_epoch=synced.epoch)
    events = wc.read_until(resumed, wc.is_type(wc.SYNCED))
    assert events[0].type == wc.RESET, wc.describe(events)
    resumed.cancel()
    channel.close()


def test_health_waits_for_a_redis_that_is_not_there_yet(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    redis_server = RedisServer(tmp_path, appendonly=True)
    a = ServerProcess(redis_server.url, free_port()).start(wait=False)
    servers.append(a)
    wait_for_health(a.address, NOT_SERVING)
    time.sleep(0.3)
    redis_server.start()
    try:
        wait_for_health(a.address, SERVING)
    finally:
        redis_server.stop(kill=True)


def test_two_replicas_one_redis_and_one_of_them_killed_mid_run(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    a = serve(servers, redis_server)
    b = serve(servers, redis_server)
    project = wc.unique("replicas")
    channel_a, stub_a = stub_for(a)
    channel_b, stub_b = stub_for(b)
    # Watchers through both replicas; producers through A, failing over to B.
    on_a = watch(stub_a, project, min_interval={"nanos": 0})
    on_b = watch(stub_b, project, min_interval={"nanos": 0})
    events_a = wc.read_until(on_a, wc.is_type(wc.SYNCED))
    events_b = wc.read_until(on_b, wc.is_type(wc.SYNCED))

    reports = 150
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def produce(name: str) -> None:
        try:
            with (
                HeadwayClient(f"{a.address},{b.address}", strict=True) as client,
                client.start(kind="ingest", project=project, total=reports) as op,
            ):
                results[name] = op.id
                for _ in range(reports):
                    op.advance(1)
                    op.update(counters={"items": 1})
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(f"p{i}",)) for i in range(3)]
    for thread in producers:
        thread.start()
    time.sleep(0.6)
    a.kill()  # mid-run: producers and A's watcher move to B
    error = on_a.wait_end(timeout=10)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    events_a += wc.flatten(_drain(on_a))
    resume_at = max(e.revision for e in events_a)
    epoch = next(e.epoch for e in reversed(events_a) if e.epoch)
    resumed = watch(
        stub_b, project, min_interval={"nanos": 0}, from_revision=resume_at, from_epoch=epoch
    )
    for thread in producers:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == 3

    final = {
        op_id: stub_b.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=5)
        for op_id in results.values()
    }
    for op in final.values():
        # Counters exact: no acknowledged report lost, none counted twice.
        assert (op.state, op.completed, op.counters["items"]) == (
            pb.Operation.SUCCEEDED,
            reports,
            reports,
        ), op
    last_revision = max(op.revision for op in final.values())
    for recorder, events, from_revision in (
        (on_b, events_b, 0),
        (resumed, list(events_a), 0),
    ):
        events += wc.read_until(recorder, wc.at_revision(last_revision), timeout=15)
        recorder.cancel()
        wc.check_revisions(events, from_revision=from_revision)
        assert wc.RESET not in [e.type for e in events], wc.describe(events)
        latest = wc.latest_states(events)
        for op_id in results.values():
            assert latest[op_id] is not None
            assert pb.Operation.SUCCEEDED in wc.delivered_states(events)[op_id]
        wc.assert_matches_store(stub_b, {i: latest[i] for i in results.values()})
    channel_a.close()
    channel_b.close()


def _drain(recorder: StreamRecorder) -> list[object]:
    messages = []
    while True:
        try:
            messages.append(recorder.next(timeout=0.1))
        except (EOFError, queue.Empty):
            return messages


def test_workers_share_one_port_and_a_dead_worker_is_replaced(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    port = free_port()
    supervisor = ServerProcess(redis_server.url, port, "--workers", "2").start()
    servers.append(supervisor)
    assert supervisor.process is not None
    workers = _children(supervisor.process.pid)
    assert len(workers) == 2, workers
    # Connections spread over the workers; every one sees the same store.
    project = wc.unique("workers")
    ids = []
    for i in range(6):
        with grpc.insecure_channel(
            supervisor.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            ids.append(start(pb_grpc.ProgressTrackerStub(channel), project, f"w{i}").id)
    channel, stub = stub_for(supervisor)
    listed = stub.ListOperations(
        pb.ListOperationsRequest(filter=pb.OperationFilter(project=project)), timeout=5
    )
    assert sorted(op.id for op in listed.operations) == sorted(ids)
    channel.close()

    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = _children(supervisor.process.pid)
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the killed worker was not replaced: {now}")
    wait_for_health(supervisor.address, SERVING)
    err = supervisor.stop()
    assert _children_gone(workers[1]), err


def test_workers_serve_http_on_one_port_too(
    redis_server: RedisServer, servers: list[ServerProcess]
) -> None:
    """With --workers every worker serves the HTTP gateway on the same port;
    whichever worker a connection lands on, it sees the same store, and an SSE
    stream on one worker carries changes made through the others."""
    http_port = free_port()
    supervisor = ServerProcess(
        redis_server.url, free_port(), "--workers", "2", "--http-listen", f"127.0.0.1:{http_port}"
    ).start()
    servers.append(supervisor)
    assert supervisor.process is not None
    workers = _children(supervisor.process.pid)
    base = f"http://127.0.0.1:{http_port}"
    project = wc.unique("http-workers")
    with httpx.Client(base_url=base, timeout=10) as watcher:
        with watcher.stream(
            "GET", "/v1/operations:watch", params={"project": project, "minInterval": "0"}
        ) as stream:
            ids = []
            for i in range(6):  # a new connection each: the kernel spreads them
                with httpx.Client(base_url=base, timeout=10) as client:
                    reply = client.post(
                        "/v1/operations", json={"kind": f"w{i}", "project": project}
                    )
                    assert reply.status_code == 200, reply.text
                    ids.append(reply.json()["id"])
            seen: set[str] = set()
            for line in stream.iter_lines():
                if line.startswith("data: ") and '"operation"' in line:
                    seen.add(json.loads(line[6:])["operation"]["id"])
                if seen >= set(ids):
                    break
    with httpx.Client(base_url=base, timeout=10) as client:
        listed = client.get("/v1/operations", params={"project": project}).json()
    assert sorted(op["id"] for op in listed["operations"]) == sorted(ids)
    # Both workers bound the HTTP port: neither died and was replaced.
    assert _children(supervisor.process.pid) == workers


def test_workers_are_refused_for_the_memory_store() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=f"{ROOT / 'server'}:{ROOT / 'client'}"),
    )
    assert result.returncode == 2
    assert "--workers above 1 needs a shared store" in result.stderr


def _children(pid: int) -> list[int]:
    """The worker processes a supervisor started (not multiprocessing's helpers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _children_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.05)
    return False
