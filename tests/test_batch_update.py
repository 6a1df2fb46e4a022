"""BatchUpdateOperations: many operations' reports per call, each exactly as UpdateOperation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway_server import servicer
from headway_server.domain import errors

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc

Stub = Any


def start(stub: Stub, project: str, total: int = 100) -> pb.Operation:
    op: pb.Operation = stub.StartOperation(
        pb.StartOperationRequest(kind="upload", project=project, total=total), timeout=5
    )
    return op


def batch(stub: Stub, *updates: pb.UpdateOperationRequest) -> list[pb.ReportProgressResponse]:
    response = stub.BatchUpdateOperations(
        pb.BatchUpdateOperationsRequest(updates=updates), timeout=10
    )
    return list(response.results)


def get(stub: Stub, operation_id: str) -> pb.Operation:
    op: pb.Operation = stub.GetOperation(
        pb.GetOperationRequest(operation_id=operation_id), timeout=5
    )
    return op


def test_each_report_is_applied_and_acknowledged_in_order(grpc_stub: Stub) -> None:
    project = wc.unique("b")
    ops = [start(grpc_stub, project) for _ in range(3)]
    results = batch(
        grpc_stub,
        *(pb.UpdateOperationRequest(operation_id=o.id, sequence=1, completed=10) for o in ops),
        pb.UpdateOperationRequest(operation_id=ops[0].id, sequence=2, completed=30),
    )
    assert [(r.operation_id, r.sequence) for r in results] == [
        (ops[0].id, 1),
        (ops[1].id, 1),
        (ops[2].id, 1),
        (ops[0].id, 2),
    ]
    assert all(r.result.applied and r.error_code == 0 for r in results)
    revisions = [r.result.revision for r in results]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4  # one each, in order
    assert [r.result.percent for r in results] == [10.0, 10.0, 10.0, 30.0]
    assert results[0].result.state == pb.Operation.RUNNING
    stored = get(grpc_stub, ops[0].id)
    assert (stored.completed, stored.last_sequence, stored.revision) == (30, 2, revisions[-1])


def test_a_rejected_report_never_affects_the_others(grpc_stub: Stub) -> None:
    project = wc.unique("b")
    good, ended = start(grpc_stub, project), start(grpc_stub, project)
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=ended.id), timeout=5)
    before = get(grpc_stub, good.id)
    results = batch(
        grpc_stub,
        pb.UpdateOperationRequest(operation_id=good.id, sequence=1, completed=5),
        pb.UpdateOperationRequest(operation_id=good.id, sequence=2, completed=-1),
        pb.UpdateOperationRequest(operation_id="no-such-op", sequence=1, completed=1),
        pb.UpdateOperationRequest(operation_id="bad id!", sequence=1),
        pb.UpdateOperationRequest(operation_id=ended.id, sequence=1, completed=1),
        pb.UpdateOperationRequest(operation_id=good.id, sequence=3, completed=500),
        pb.UpdateOperationRequest(operation_id=good.id, sequence=4, completed=7),
    )
    codes = [grpc.StatusCode(code) for code in _codes(results)]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,  # completed above total
        grpc.StatusCode.OK,
    ]
    assert "completed" in results[1].error_message
    assert "operation_id" in results[3].error_message
    assert "total" in results[5].error_message or "completed" in results[5].error_message
    # A rejected report changed nothing; the ones after it were applied as usual.
    stored = get(grpc_stub, good.id)
    assert (stored.completed, stored.last_sequence) == (7, 4)
    # The rejected ones took no revision: the two applied are consecutive.
    assert stored.revision == results[6].result.revision == results[0].result.revision + 1
    assert results[0].result.revision > before.revision
    assert get(grpc_stub, ended.id).state == pb.Operation.SUCCEEDED


def _codes(results: list[pb.ReportProgressResponse]) -> list[tuple[int, str]]:
    by_number = {code.value[0]: code.value for code in grpc.StatusCode}
    return [by_number[r.error_code] for r in results]


def test_retrying_a_whole_batch_never_double_counts(grpc_stub: Stub) -> None:
    project = wc.unique("b")
    ops = [start(grpc_stub, project) for _ in range(5)]
    updates = [
        pb.UpdateOperationRequest(operation_id=o.id, sequence=1, completed=3, counters={"rows": 3})
        for o in ops
    ]
    first = batch(grpc_stub, *updates)
    again = batch(grpc_stub, *updates)  # as a client does after a lost reply
    assert all(r.result.applied for r in first)
    assert not any(r.result.applied for r in again)
    assert [r.error_code for r in again] == [0] * 5
    assert [r.result.revision for r in again] == [r.result.revision for r in first]
    for o in ops:
        assert dict(get(grpc_stub, o.id).counters) == {"rows": 3}


def test_too_many_reports_fail_the_call_naming_the_field_and_apply_nothing(
    grpc_stub: Stub,
) -> None:
    op = start(grpc_stub, wc.unique("b"), total=10_000)
    updates = [
        pb.UpdateOperationRequest(operation_id=op.id, sequence=i, completed=i)
        for i in range(1, servicer.MAX_BATCH_UPDATES + 2)
    ]
    with pytest.raises(grpc.RpcError) as info:
        batch(grpc_stub, *updates)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "updates" in (info.value.details() or "")
    assert get(grpc_stub, op.id).revision == op.revision
    # At the limit it works, and an empty batch is an empty answer.
    assert len(batch(grpc_stub, *updates[:-1])) == servicer.MAX_BATCH_UPDATES
    assert batch(grpc_stub) == []


def test_watchers_see_batched_reports_as_unary_ones(grpc_stub: Stub, record: Any) -> None:
    project = wc.unique("b")
    ops = [start(grpc_stub, project) for _ in range(4)]
    request = pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project))
    request.min_interval.SetInParent()  # every state
    recorder = record(grpc_stub.WatchOperations(request, timeout=30))
    events = wc.read_until(recorder, wc.is_type(wc.SYNCED))
    results = batch(
        grpc_stub,
        *(pb.UpdateOperationRequest(operation_id=o.id, sequence=1, completed=50) for o in ops),
    )
    last = max(r.result.revision for r in results)
    events += wc.read_until(recorder, wc.at_revision(last))
    wc.check_revisions(events)
    latest = wc.latest_states(events)
    assert {op_id: o.completed for op_id, o in latest.items() if o} == {o.id: 50 for o in ops}
    wc.assert_matches_store(grpc_stub, latest)


def test_cancel_requests_reach_each_report_of_the_batch(grpc_stub: Stub) -> None:
    project = wc.unique("b")
    asked, other = start(grpc_stub, project), start(grpc_stub, project)
    batch(grpc_stub, pb.UpdateOperationRequest(operation_id=asked.id, sequence=1, completed=1))
    grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=asked.id), timeout=5)
    results = batch(
        grpc_stub,
        pb.UpdateOperationRequest(operation_id=asked.id, sequence=2, completed=2),
        pb.UpdateOperationRequest(operation_id=other.id, sequence=1, completed=2),
    )
    assert [r.result.cancel_requested for r in results] == [True, False]


class _Unlisted(errors.NotFound):
    """A subclass the table does not name: maps as its nearest listed base."""


class _NewKind(errors.HeadwayError):
    """A domain error with no entry of its own."""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("f", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (_Unlisted("gone"), grpc.StatusCode.NOT_FOUND),
        (_NewKind("?"), grpc.StatusCode.INTERNAL),
        (errors.HeadwayError("?"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_statuses_along_their_class_hierarchy(
    error: errors.HeadwayError, code: grpc.StatusCode
) -> None:
    assert servicer.status_of(error) is code
