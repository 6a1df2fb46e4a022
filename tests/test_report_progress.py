"""ReportProgress: streamed reports with UpdateOperation's validation, idempotency and order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc


class ReportStream:
    """A ReportProgress call fed one request at a time, each ack read before the next."""

    def __init__(self, stub: Any) -> None:
        self._requests: queue.Queue[pb.UpdateOperationRequest | None] = queue.Queue()
        self.call = stub.ReportProgress(self._feed(), timeout=20)

    def _feed(self) -> Iterator[pb.UpdateOperationRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, **fields: Any) -> pb.ReportProgressResponse:
        self._requests.put(pb.UpdateOperationRequest(**fields))
        ack: pb.ReportProgressResponse = next(self.call)
        return ack

    def close(self) -> None:
        self._requests.put(None)


@pytest.fixture
def stream(grpc_stub: Any) -> Iterator[ReportStream]:
    reports = ReportStream(grpc_stub)
    yield reports
    reports.close()


def start(stub: Any, **fields: Any) -> pb.Operation:
    op: pb.Operation = stub.StartOperation(pb.StartOperationRequest(**fields), timeout=5)
    return op


def test_reports_are_acknowledged_in_order_with_increasing_revisions(grpc_stub, stream):
    op = start(grpc_stub, kind="stream", project="rp", total=100)
    acks = [stream.send(operation_id=op.id, sequence=i, completed=i * 10) for i in range(1, 6)]
    assert [a.sequence for a in acks] == [1, 2, 3, 4, 5]
    assert all(a.operation_id == op.id and a.result.applied for a in acks)
    revisions = [a.result.revision for a in acks]
    assert revisions == sorted(set(revisions))
    assert acks[-1].result.percent == 50.0
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op.id))
    assert (stored.completed, stored.last_sequence) == (50, 5)


def test_duplicates_are_acknowledged_without_double_counting(grpc_stub, stream):
    op = start(grpc_stub, kind="stream", project="rp")
    first = stream.send(operation_id=op.id, sequence=1, counters={"pages": 5})
    retry = stream.send(operation_id=op.id, sequence=1, counters={"pages": 5})
    assert first.result.applied and not retry.result.applied
    assert retry.result.revision == first.result.revision
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op.id))
    assert dict(stored.counters) == {"pages": 5}


def test_rejected_reports_carry_the_unary_status_and_the_stream_goes_on(grpc_stub, stream):
    op = start(grpc_stub, kind="stream", project="rp", total=10)
    invalid = stream.send(operation_id=op.id, sequence=1, completed=11)
    assert invalid.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "completed" in invalid.error_message
    missing = stream.send(operation_id="no-such-op", sequence=1)
    assert missing.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    ok = stream.send(operation_id=op.id, sequence=2, completed=3)
    assert ok.error_code == 0 and ok.result.applied
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    ended = stream.send(operation_id=op.id, sequence=3, completed=4)
    assert ended.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    stored = grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op.id))
    assert (stored.completed, stored.state) == (3, pb.Operation.SUCCEEDED)


def test_watchers_see_streamed_reports_like_unary_ones(grpc_stub, stream, record):
    op = start(grpc_stub, kind="stream", project="rp-watch", total=20)
    watch = record(grpc_stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.id)))
    assert watch.next().type == pb.OperationEvent.SNAPSHOT
    for i in range(1, 21):
        stream.send(operation_id=op.id, sequence=i, completed=i)
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    events = []
    while True:
        try:
            events.append(watch.next())
        except EOFError:
            break
    revisions = [e.revision for e in events]
    assert revisions == sorted(set(revisions))
    assert events[-1].operation.state == pb.Operation.SUCCEEDED
    assert events[-1].operation.completed == 20


def test_closing_the_stream_ends_it_ok(grpc_stub):
    reports = ReportStream(grpc_stub)
    op = start(grpc_stub, kind="stream", project="rp")
    reports.send(operation_id=op.id, sequence=1)
    reports.close()
    assert list(reports.call) == []
    assert reports.call.code() == grpc.StatusCode.OK


def test_shutdown_ends_the_stream_unavailable_with_the_resume_revision(server_factory):
    server = server_factory()
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        reports = ReportStream(stub)
        op = start(stub, kind="stream", project="rp")
        ack = reports.send(operation_id=op.id, sequence=1)
        stopper = threading.Thread(target=server.shutdown, args=(2.0,))
        stopper.start()
        server_stopping = threading.Event()
        # The next report after shutdown began is answered, then the stream ends.
        while not server_stopping.is_set():
            try:
                reports.send(operation_id=op.id, sequence=2)
            except StopIteration:
                server_stopping.set()
            except grpc.RpcError:
                server_stopping.set()
        stopper.join(10)
        with pytest.raises(grpc.RpcError):
            next(reports.call)
        assert reports.call.code() == grpc.StatusCode.UNAVAILABLE
        trailing = dict(reports.call.trailing_metadata() or ())
        assert int(trailing["headway-resume-revision"]) >= ack.result.revision
        reports.close()
