"""Heartbeat leases and retention (README guarantees 7 and 8), on servers with short timers."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

State = pb.Operation.State
Stub = pb_grpc.ProgressTrackerStub
Event = pb.OperationEvent
LEASE = duration_pb2.Duration(nanos=300_000_000)  # 0.3 s
RETENTION = 0.5


def uid(prefix: str = "op") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def start(stub: Stub, project: str = "lease", **fields: Any) -> pb.Operation:
    fields.setdefault("operation_id", uid())
    fields.setdefault("kind", "job")
    return stub.StartOperation(pb.StartOperationRequest(project=project, **fields))


def report(stub: Stub, op_id: str, **fields: Any) -> pb.UpdateOperationResponse:
    fields.setdefault("message", "tick")
    return stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op_id, **fields))


def get(stub: Stub, op_id: str) -> pb.Operation:
    return stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))


def exists(stub: Stub, op_id: str) -> bool:
    try:
        get(stub, op_id)
    except grpc.RpcError as exc:
        assert cast(grpc.Call, exc).code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls until `condition` holds; returns the seconds it took."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - began


def _stub(server_factory: Callable[..., Any], retention: float) -> Iterator[Stub]:
    server = server_factory(retention=retention, sweep_interval=0.05)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ProgressTrackerStub(channel)


@pytest.fixture
def lease_stub(server_factory: Callable[..., Any]) -> Iterator[Stub]:
    """Sweeps every 50 ms; keeps finished operations (retention 1 h)."""
    yield from _stub(server_factory, 3600.0)


@pytest.fixture
def retention_stub(server_factory: Callable[..., Any]) -> Iterator[Stub]:
    """Sweeps every 50 ms; removes finished operations after RETENTION."""
    yield from _stub(server_factory, RETENTION)


# --- 7. Heartbeat lease -------------------------------------------------------------------


def test_running_operation_without_reports_stalls_and_next_report_clears_it(
    lease_stub: Stub,
) -> None:
    op = start(lease_stub, heartbeat_timeout=LEASE)
    reported = report(lease_stub, op.id, sequence=1)
    assert not get(lease_stub, op.id).stalled

    waited = wait_for(lambda: get(lease_stub, op.id).stalled, 3.0, "the operation to stall")
    assert waited >= 0.2, f"stalled after {waited:.2f}s, before its 0.3 s lease ran out"
    stalled = get(lease_stub, op.id)
    assert stalled.state == State.RUNNING
    assert stalled.revision > reported.revision, "stalling is a change with a new revision"

    cleared = report(lease_stub, op.id, sequence=2)
    assert cleared.applied
    after = get(lease_stub, op.id)
    assert not after.stalled
    assert after.revision == cleared.revision


def test_regular_reports_keep_the_lease(lease_stub: Stub) -> None:
    op = start(lease_stub, heartbeat_timeout=LEASE)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        report(lease_stub, op.id)
        assert not get(lease_stub, op.id).stalled
        time.sleep(0.08)


def test_only_running_operations_with_a_lease_stall(lease_stub: Stub) -> None:
    queued = start(lease_stub, heartbeat_timeout=LEASE)
    paused = start(lease_stub, heartbeat_timeout=LEASE)
    report(lease_stub, paused.id)
    report(lease_stub, paused.id, paused=True)
    no_lease = start(lease_stub)
    report(lease_stub, no_lease.id)
    finished = start(lease_stub, heartbeat_timeout=LEASE)
    report(lease_stub, finished.id)
    lease_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=finished.id))
    running = start(lease_stub, heartbeat_timeout=LEASE)
    report(lease_stub, running.id)

    wait_for(lambda: get(lease_stub, running.id).stalled, 3.0, "the running operation to stall")
    time.sleep(0.4)  # well past every lease
    for op in (queued, paused, no_lease, finished):
        stored = get(lease_stub, op.id)
        assert not stored.stalled, f"{State.Name(stored.state)} operation {op.id} stalled"


def test_resumed_operation_stalls_again_without_reports(lease_stub: Stub) -> None:
    op = start(lease_stub, heartbeat_timeout=LEASE)
    report(lease_stub, op.id)
    report(lease_stub, op.id, paused=True)
    time.sleep(0.5)
    assert not get(lease_stub, op.id).stalled
    report(lease_stub, op.id, paused=False)
    assert not get(lease_stub, op.id).stalled
    wait_for(lambda: get(lease_stub, op.id).stalled, 3.0, "the resumed operation to stall")


def test_stall_is_a_change_watchers_see(lease_stub: Stub, record: Callable[..., Any]) -> None:
    op = start(lease_stub, heartbeat_timeout=LEASE)
    report(lease_stub, op.id)
    stream = record(
        lease_stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.id), timeout=10)
    )
    deadline = time.monotonic() + 5.0
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no event showed the stall"
        event = stream.next(timeout=remaining)
        if event.type in (Event.SNAPSHOT, Event.CHANGED) and event.operation.stalled:
            break
    assert event.operation.state == State.RUNNING

    report(lease_stub, op.id)
    deadline = time.monotonic() + 5.0
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no event showed the stall cleared"
        event = stream.next(timeout=remaining)
        if event.type == Event.CHANGED and not event.operation.stalled:
            break


# --- 8. Retention -------------------------------------------------------------------------


def _finish_three(stub: Stub, project: str) -> list[str]:
    succeeded = start(stub, project)
    report(stub, succeeded.id)
    stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=succeeded.id))
    failed = start(stub, project)
    report(stub, failed.id)
    stub.FailOperation(
        pb.FailOperationRequest(operation_id=failed.id, error=pb.OperationError(code="E"))
    )
    cancelled = start(stub, project)
    stub.CancelOperation(pb.CancelOperationRequest(operation_id=cancelled.id))
    return [succeeded.id, failed.id, cancelled.id]


def test_terminal_operations_are_removed_after_retention(retention_stub: Stub) -> None:
    began = time.monotonic()
    terminal = _finish_three(retention_stub, uid("proj"))
    queued = start(retention_stub)
    running = start(retention_stub)
    report(retention_stub, running.id)
    paused = start(retention_stub)
    report(retention_stub, paused.id)
    report(retention_stub, paused.id, paused=True)

    assert all(exists(retention_stub, op_id) for op_id in terminal)
    wait_for(
        lambda: not any(exists(retention_stub, op_id) for op_id in terminal),
        5.0,
        "terminal operations to be removed",
    )
    assert time.monotonic() - began >= RETENTION * 0.8, "removed before the retention period"

    time.sleep(RETENTION)
    for op in (queued, running, paused):
        assert exists(retention_stub, op.id), f"active operation {op.id} expired"


def test_retention_counts_from_the_end_not_the_start(retention_stub: Stub) -> None:
    op = start(retention_stub)
    report(retention_stub, op.id)
    time.sleep(RETENTION + 0.3)
    assert exists(retention_stub, op.id)
    retention_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    time.sleep(RETENTION * 0.4)
    assert exists(retention_stub, op.id), "removed right after finishing"
    wait_for(lambda: not exists(retention_stub, op.id), 5.0, "the finished operation to be removed")


def test_retention_deletion_is_seen_by_watchers(
    retention_stub: Stub, record: Callable[..., Any]
) -> None:
    project = uid("proj")
    terminal = _finish_three(retention_stub, project)
    stream = record(
        retention_stub.WatchOperations(
            pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project)), timeout=10
        )
    )
    deleted: set[str] = set()
    deadline = time.monotonic() + 5.0
    while deleted != set(terminal):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {sorted(deleted)} of {terminal} were seen DELETED"
        for event in stream.next(timeout=remaining).events:
            if event.type == Event.DELETED:
                deleted.add(event.operation.id)
    assert not any(exists(retention_stub, op_id) for op_id in terminal)
