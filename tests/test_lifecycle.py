"""Lifecycle, idempotency, percent, cancellation and revisions (README guarantees 1, 2, 3, 5, 9).

Black-box: every test talks to the real server through the generated stubs.
"""

from __future__ import annotations

import itertools
import re
import uuid
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

State = pb.Operation.State
Stub = pb_grpc.ProgressTrackerStub
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def uid(prefix: str = "op") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def start(stub: Stub, **fields: Any) -> pb.Operation:
    fields.setdefault("operation_id", uid())
    fields.setdefault("kind", "test-job")
    fields.setdefault("project", "lifecycle")
    return stub.StartOperation(pb.StartOperationRequest(**fields))


def update(stub: Stub, op_id: str, **fields: Any) -> pb.UpdateOperationResponse:
    return stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op_id, **fields))


def get(stub: Stub, op_id: str) -> pb.Operation:
    return stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))


def fail_request(op_id: str, code: str = "E_IO", **fields: Any) -> pb.FailOperationRequest:
    return pb.FailOperationRequest(
        operation_id=op_id, error=pb.OperationError(code=code, message="boom"), **fields
    )


def rpc_error(method: Any, request: Any, code: grpc.StatusCode) -> grpc.Call:
    """Calls `method`, asserts it fails with `code`, and returns the error."""
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=5)
    error = cast(grpc.Call, info.value)
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    return error


def running(stub: Stub, **fields: Any) -> pb.Operation:
    op = start(stub, **fields)
    update(stub, op.id, message="working")
    return get(stub, op.id)


def ended(stub: Stub, how: str) -> pb.Operation:
    """An operation ended as SUCCEEDED, FAILED or CANCELLED (after a cancel request)."""
    op = running(stub)
    if how == "SUCCEEDED":
        return stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    if how == "FAILED":
        return stub.FailOperation(fail_request(op.id))
    stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id, reason="stop"))
    return stub.FailOperation(fail_request(op.id, code="CANCELLED"))


# --- 1. Lifecycle -------------------------------------------------------------------------


def test_start_returns_a_queued_operation(grpc_stub: Stub) -> None:
    op_id = uid()
    op = start(
        grpc_stub,
        operation_id=op_id,
        kind="github-ingest",
        project="acme",
        dataset="repos",
        labels={"team": "search"},
        total=120,
        unit="files",
    )
    assert op.id == op_id
    assert op.state == State.QUEUED
    assert (op.kind, op.project, op.dataset, op.unit) == ("github-ingest", "acme", "repos", "files")
    assert dict(op.labels) == {"team": "search"}
    assert op.total == 120
    assert op.completed == 0
    assert op.percent == 0.0
    assert op.revision > 0
    assert op.created_revision == op.revision
    assert op.HasField("created_at")
    assert not op.HasField("finished_at")
    assert get(grpc_stub, op_id) == op


def test_first_report_moves_queued_to_running(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    response = update(grpc_stub, op.id, message="cloning")
    assert response.applied
    assert response.state == State.RUNNING
    stored = get(grpc_stub, op.id)
    assert stored.state == State.RUNNING
    assert stored.message == "cloning"
    assert stored.HasField("started_at")


def test_pause_and_resume(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    paused = update(grpc_stub, op.id, paused=True, pause_reason="rate limited")
    assert paused.state == State.PAUSED
    stored = get(grpc_stub, op.id)
    assert stored.state == State.PAUSED
    assert stored.pause_reason == "rate limited"

    resumed = update(grpc_stub, op.id, paused=False)
    assert resumed.state == State.RUNNING
    assert get(grpc_stub, op.id).state == State.RUNNING


def test_progress_while_paused_keeps_it_paused(grpc_stub: Stub) -> None:
    op = running(grpc_stub, total=10)
    update(grpc_stub, op.id, paused=True)
    response = update(grpc_stub, op.id, completed=3)
    assert response.state == State.PAUSED
    stored = get(grpc_stub, op.id)
    assert stored.state == State.PAUSED
    assert stored.completed == 3


def test_complete_ends_succeeded_with_result(grpc_stub: Stub) -> None:
    op = running(grpc_stub, total=10)
    update(grpc_stub, op.id, completed=4)
    result = struct_pb2.Struct()
    result.update({"files": 10, "url": "s3://bucket/out"})
    done = grpc_stub.CompleteOperation(
        pb.CompleteOperationRequest(operation_id=op.id, result=result, message="all done")
    )
    assert done.state == State.SUCCEEDED
    assert done.percent == 100.0
    assert done.result == result
    assert done.message == "all done"
    assert done.HasField("finished_at")
    assert get(grpc_stub, op.id) == done


def test_fail_ends_failed_with_error(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    error = pb.OperationError(code="E_CLONE", message="repository gone", item="repo-7")
    failed = grpc_stub.FailOperation(pb.FailOperationRequest(operation_id=op.id, error=error))
    assert failed.state == State.FAILED
    assert failed.error.code == "E_CLONE"
    assert failed.error.message == "repository gone"
    assert failed.error.item == "repo-7"
    assert failed.HasField("finished_at")
    assert get(grpc_stub, op.id) == failed


@pytest.mark.parametrize("how", ["SUCCEEDED", "FAILED", "CANCELLED"])
@pytest.mark.parametrize("call", ["update", "complete", "fail"])
def test_terminal_states_are_final(grpc_stub: Stub, how: str, call: str) -> None:
    op = ended(grpc_stub, how)
    assert State.Name(op.state) == how
    before = get(grpc_stub, op.id)
    if call == "update":
        rpc_error(
            grpc_stub.UpdateOperation,
            pb.UpdateOperationRequest(operation_id=op.id, sequence=99, completed=1, message="x"),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    elif call == "complete":
        rpc_error(
            grpc_stub.CompleteOperation,
            pb.CompleteOperationRequest(operation_id=op.id, request_id=uid("req")),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    else:
        rpc_error(
            grpc_stub.FailOperation,
            fail_request(op.id, request_id=uid("req")),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
    assert get(grpc_stub, op.id) == before


def test_repeating_complete_with_same_request_id_returns_stored_operation(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    request = pb.CompleteOperationRequest(operation_id=op.id, message="ok", request_id="done-1")
    first = grpc_stub.CompleteOperation(request)
    again = grpc_stub.CompleteOperation(request)
    assert again == first
    assert get(grpc_stub, op.id) == first


def test_repeating_fail_with_same_request_id_returns_stored_operation(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    request = fail_request(op.id, request_id="fail-1")
    first = grpc_stub.FailOperation(request)
    again = grpc_stub.FailOperation(request)
    assert first.state == State.FAILED
    assert again == first
    assert get(grpc_stub, op.id) == first


def test_finishing_again_without_the_same_request_id_is_rejected(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    done = grpc_stub.CompleteOperation(
        pb.CompleteOperationRequest(operation_id=op.id, request_id="done-1")
    )
    # No request_id, another request_id, or the same request_id on another call.
    rpc_error(
        grpc_stub.CompleteOperation,
        pb.CompleteOperationRequest(operation_id=op.id),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    rpc_error(
        grpc_stub.CompleteOperation,
        pb.CompleteOperationRequest(operation_id=op.id, request_id="done-2"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    rpc_error(
        grpc_stub.FailOperation,
        fail_request(op.id, request_id="done-1"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert get(grpc_stub, op.id) == done


def test_stages_record_their_progress(grpc_stub: Stub) -> None:
    op = start(grpc_stub, stages=[pb.StageSpec(name="clone"), pb.StageSpec(name="index", weight=3)])
    assert [s.name for s in op.stages] == ["clone", "index"]
    assert all(s.state == pb.Stage.PENDING for s in op.stages)

    update(grpc_stub, op.id, stage="clone", stage_completed=1, stage_total=1)
    update(grpc_stub, op.id, stage="index", stage_completed=2, stage_total=8)
    stored = get(grpc_stub, op.id)
    assert stored.stage == "index"
    clone, index = stored.stages
    assert clone.state == pb.Stage.DONE
    assert index.state == pb.Stage.RUNNING
    assert (index.completed, index.total) == (2, 8)


def test_stages_are_free_form_without_a_plan(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    update(grpc_stub, op.id, stage="download", message="fetching")
    update(grpc_stub, op.id, stage="unpack")
    assert get(grpc_stub, op.id).stage == "unpack"


# --- 2. Idempotency -----------------------------------------------------------------------


def test_start_with_existing_id_and_same_parameters_returns_existing(grpc_stub: Stub) -> None:
    fields: dict[str, Any] = {
        "operation_id": uid(),
        "kind": "crawl",
        "project": "web",
        "labels": {"site": "example.org"},
        "total": 50,
        "stages": [pb.StageSpec(name="fetch", weight=2), pb.StageSpec(name="parse")],
        "heartbeat_timeout": duration_pb2.Duration(seconds=30),
    }
    first = start(grpc_stub, **fields)
    again = start(grpc_stub, **fields)
    assert again == first
    assert again.revision == first.revision


def test_start_retry_after_progress_returns_current_operation(grpc_stub: Stub) -> None:
    op = start(grpc_stub, operation_id=uid(), total=10)
    update(grpc_stub, op.id, completed=5)
    current = get(grpc_stub, op.id)
    again = start(grpc_stub, operation_id=op.id, total=10)
    assert again == current
    assert again.state == State.RUNNING
    assert again.completed == 5


@pytest.mark.parametrize(
    "changed",
    [
        {"kind": "other-kind"},
        {"project": "other-project"},
        {"dataset": "other-dataset"},
        {"total": 11},
        {"unit": "bytes"},
        {"labels": {"team": "b"}},
        {"stages": [pb.StageSpec(name="only")]},
        {"heartbeat_timeout": duration_pb2.Duration(seconds=5)},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_start_with_existing_id_and_different_parameters_is_already_exists(
    grpc_stub: Stub, changed: dict[str, Any]
) -> None:
    fields: dict[str, Any] = {
        "operation_id": uid(),
        "kind": "crawl",
        "project": "web",
        "dataset": "pages",
        "total": 10,
        "unit": "pages",
        "labels": {"team": "a"},
        "stages": [pb.StageSpec(name="fetch"), pb.StageSpec(name="parse")],
    }
    first = start(grpc_stub, **fields)
    rpc_error(
        grpc_stub.StartOperation,
        pb.StartOperationRequest(**{**fields, **changed}),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert get(grpc_stub, first.id) == first


def test_server_generated_ids_are_valid_and_unguessable(grpc_stub: Stub) -> None:
    ops = [start(grpc_stub, operation_id="") for _ in range(3)]
    ids = [op.id for op in ops]
    assert len(set(ids)) == 3
    for op_id in ids:
        assert ID_RE.fullmatch(op_id), op_id
        assert len(op_id) >= 16, f"{op_id!r} is too short to be unguessable"
        assert get(grpc_stub, op_id).id == op_id
    # Not a counter: successive ids differ in many positions.
    for a, b in itertools.pairwise(ids):
        assert sum(x != y for x, y in zip(a, b, strict=False)) >= 8, (a, b)


def test_start_retry_with_same_request_id_returns_same_operation(grpc_stub: Stub) -> None:
    request_id = uid("req")
    first = start(grpc_stub, operation_id="", request_id=request_id, total=5)
    again = start(grpc_stub, operation_id="", request_id=request_id, total=5)
    assert again == first
    other = start(grpc_stub, operation_id="", request_id=uid("req"), total=5)
    assert other.id != first.id


def test_start_with_same_request_id_and_different_parameters_is_already_exists(
    grpc_stub: Stub,
) -> None:
    request_id = uid("req")
    first = start(grpc_stub, operation_id="", request_id=request_id, total=5)
    rpc_error(
        grpc_stub.StartOperation,
        pb.StartOperationRequest(kind="test-job", project="lifecycle", request_id=request_id),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert get(grpc_stub, first.id) == first


def test_duplicate_sequence_is_acknowledged_and_not_counted_twice(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=100)
    first = update(grpc_stub, op.id, sequence=1, completed=10, counters={"files": 5})
    assert first.applied
    after_first = get(grpc_stub, op.id)

    retry = update(grpc_stub, op.id, sequence=1, completed=10, counters={"files": 5})
    assert not retry.applied
    assert retry.state == State.RUNNING
    assert retry.percent == after_first.percent
    assert get(grpc_stub, op.id) == after_first

    second = update(grpc_stub, op.id, sequence=2, completed=20, counters={"files": 3, "dirs": 1})
    assert second.applied
    stale = update(
        grpc_stub, op.id, sequence=1, completed=99, counters={"files": 100}, message="stale"
    )
    assert not stale.applied

    stored = get(grpc_stub, op.id)
    assert dict(stored.counters) == {"files": 8, "dirs": 1}
    assert stored.completed == 20
    assert stored.message != "stale"
    assert stored.last_sequence == 2
    assert stored.revision == second.revision


def test_sequences_may_skip_numbers(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    assert update(grpc_stub, op.id, sequence=5, counters={"n": 1}).applied
    assert update(grpc_stub, op.id, sequence=9, counters={"n": 1}).applied
    assert not update(grpc_stub, op.id, sequence=7, counters={"n": 1}).applied
    stored = get(grpc_stub, op.id)
    assert stored.counters["n"] == 2
    assert stored.last_sequence == 9


def test_completed_never_moves_backwards_without_sequences(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=100)
    update(grpc_stub, op.id, completed=50)
    update(grpc_stub, op.id, completed=30)
    stored = get(grpc_stub, op.id)
    assert stored.completed == 50
    assert stored.percent == 50.0
    update(grpc_stub, op.id, completed=60)
    assert get(grpc_stub, op.id).completed == 60


def test_only_fields_that_are_set_change(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=10)
    update(grpc_stub, op.id, completed=3, message="m1", checkpoint="c1", counters={"a": 1})
    update(grpc_stub, op.id, counters={"b": 2})
    stored = get(grpc_stub, op.id)
    assert (stored.completed, stored.message, stored.checkpoint) == (3, "m1", "c1")
    assert dict(stored.counters) == {"a": 1, "b": 2}


# --- 3. Percent ---------------------------------------------------------------------------


def test_percent_from_stage_plan_weights(grpc_stub: Stub) -> None:
    # The README walk-through: clone (1) then index (4).
    op = start(
        grpc_stub,
        total=120,
        stages=[pb.StageSpec(name="clone", weight=1), pb.StageSpec(name="index", weight=4)],
    )
    r1 = update(grpc_stub, op.id, sequence=1, stage="clone", stage_completed=1, stage_total=1)
    assert r1.percent == pytest.approx(20.0)
    r2 = update(
        grpc_stub,
        op.id,
        sequence=2,
        stage="index",
        stage_completed=30,
        stage_total=120,
        completed=90,
    )
    assert r2.percent == pytest.approx(40.0)  # the stage plan wins over completed/total
    assert r2.cancel_requested is False
    assert r2.revision == op.revision + 2
    assert get(grpc_stub, op.id).percent == pytest.approx(40.0)


def test_percent_with_default_weights(grpc_stub: Stub) -> None:
    op = start(grpc_stub, stages=[pb.StageSpec(name=n) for n in ("a", "b", "c", "d")])
    assert update(grpc_stub, op.id, stage="a", stage_completed=0, stage_total=4).percent == 0.0
    r = update(grpc_stub, op.id, stage="b", stage_completed=2, stage_total=4)
    assert r.percent == pytest.approx(37.5)


def test_percent_from_completed_and_total(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=200)
    assert update(grpc_stub, op.id, completed=50).percent == pytest.approx(25.0)
    assert get(grpc_stub, op.id).percent == pytest.approx(25.0)


def test_percent_with_total_learned_later(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    assert update(grpc_stub, op.id, total=8, completed=2).percent == pytest.approx(25.0)
    assert update(grpc_stub, op.id, completed=6).percent == pytest.approx(75.0)


def test_percent_explicit(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    assert update(grpc_stub, op.id, percent=37.5).percent == pytest.approx(37.5)
    # A report without a percent keeps the last explicit one.
    assert update(grpc_stub, op.id, message="still going").percent == pytest.approx(37.5)
    assert get(grpc_stub, op.id).percent == pytest.approx(37.5)


def test_percent_is_100_on_success(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=1000, stages=[pb.StageSpec(name="a"), pb.StageSpec(name="b")])
    update(grpc_stub, op.id, stage="a", stage_completed=1, stage_total=10)
    done = grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    assert done.percent == 100.0
    assert get(grpc_stub, op.id).percent == 100.0


def test_percent_stays_within_bounds(grpc_stub: Stub) -> None:
    op = start(grpc_stub, total=3)
    assert update(grpc_stub, op.id, completed=3).percent == pytest.approx(100.0)
    op = start(grpc_stub, stages=[pb.StageSpec(name="only", weight=0.5)])
    r = update(grpc_stub, op.id, stage="only", stage_completed=7, stage_total=7)
    assert 0.0 <= r.percent <= 100.0
    assert r.percent == pytest.approx(100.0)


# --- 9. Cancellation ----------------------------------------------------------------------


def test_cancel_is_seen_by_the_producer_and_acknowledged(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    cancelled = grpc_stub.CancelOperation(
        pb.CancelOperationRequest(operation_id=op.id, reason="user pressed stop")
    )
    assert cancelled.cancel_requested
    assert cancelled.cancel_reason == "user pressed stop"
    assert cancelled.state == State.RUNNING

    for sequence in (1, 2):
        response = update(grpc_stub, op.id, sequence=sequence, message="still working")
        assert response.cancel_requested
        assert response.state == State.RUNNING
    # Even a duplicate report tells the producer.
    assert update(grpc_stub, op.id, sequence=1).cancel_requested

    ack = grpc_stub.FailOperation(fail_request(op.id, code="CANCELLED"))
    assert ack.state == State.CANCELLED
    assert ack.HasField("finished_at")
    stored = get(grpc_stub, op.id)
    assert stored.state == State.CANCELLED
    assert stored.cancel_requested
    assert stored.cancel_reason == "user pressed stop"


def test_a_queued_operation_is_cancelled_at_once(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    cancelled = grpc_stub.CancelOperation(
        pb.CancelOperationRequest(operation_id=op.id, reason="not needed")
    )
    assert cancelled.state == State.CANCELLED
    assert cancelled.HasField("finished_at")
    assert get(grpc_stub, op.id).state == State.CANCELLED
    rpc_error(
        grpc_stub.UpdateOperation,
        pb.UpdateOperationRequest(operation_id=op.id, message="late start"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_a_paused_operation_can_be_cancelled(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    update(grpc_stub, op.id, paused=True)
    cancelled = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id))
    assert cancelled.cancel_requested
    assert update(grpc_stub, op.id, paused=False).cancel_requested
    ack = grpc_stub.FailOperation(fail_request(op.id, code="CANCELLED"))
    assert ack.state == State.CANCELLED


def test_cancelling_again_is_a_no_op(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    first = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id, reason="r1"))
    again = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id, reason="r2"))
    assert again.cancel_requested
    assert again.revision == first.revision
    assert again.cancel_reason == "r1"
    assert get(grpc_stub, op.id) == first


def test_cancelling_a_cancelled_operation_is_a_no_op(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    cancelled = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id))
    again = grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id))
    assert again == cancelled
    assert get(grpc_stub, op.id) == cancelled


@pytest.mark.parametrize("how", ["SUCCEEDED", "FAILED"])
def test_cancelling_a_finished_operation_is_failed_precondition(grpc_stub: Stub, how: str) -> None:
    op = ended(grpc_stub, how)
    rpc_error(
        grpc_stub.CancelOperation,
        pb.CancelOperationRequest(operation_id=op.id, reason="too late"),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    stored = get(grpc_stub, op.id)
    assert stored == op
    assert not stored.cancel_requested


# --- Delete -------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", [False, True])
def test_deleted_operation_is_gone(grpc_stub: Stub, finished: bool) -> None:
    op = running(grpc_stub)
    if finished:
        grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    grpc_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=op.id))
    rpc_error(
        grpc_stub.GetOperation,
        pb.GetOperationRequest(operation_id=op.id),
        grpc.StatusCode.NOT_FOUND,
    )
    rpc_error(
        grpc_stub.UpdateOperation,
        pb.UpdateOperationRequest(operation_id=op.id, message="late"),
        grpc.StatusCode.NOT_FOUND,
    )
    rpc_error(
        grpc_stub.DeleteOperation,
        pb.DeleteOperationRequest(operation_id=op.id),
        grpc.StatusCode.NOT_FOUND,
    )


# --- 5. Revisions -------------------------------------------------------------------------


def test_revisions_strictly_increase_across_changes(grpc_stub: Stub) -> None:
    a = start(grpc_stub, total=10)
    b = start(grpc_stub, total=10)
    revisions = [a.revision, b.revision]
    revisions.append(update(grpc_stub, a.id, completed=1).revision)
    revisions.append(update(grpc_stub, b.id, completed=1).revision)
    revisions.append(update(grpc_stub, a.id, paused=True).revision)
    revisions.append(update(grpc_stub, a.id, paused=False).revision)
    revisions.append(
        grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=b.id)).revision
    )
    revisions.append(grpc_stub.FailOperation(fail_request(b.id, code="CANCELLED")).revision)
    revisions.append(
        grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=a.id)).revision
    )
    assert all(x < y for x, y in itertools.pairwise(revisions)), revisions

    stored_a, stored_b = get(grpc_stub, a.id), get(grpc_stub, b.id)
    assert stored_a.revision == revisions[-1]
    assert stored_b.revision == revisions[-2]
    assert stored_a.created_revision == a.revision
    assert stored_b.created_revision == b.revision


def test_update_response_revision_is_the_stored_revision(grpc_stub: Stub) -> None:
    op = start(grpc_stub)
    response = update(grpc_stub, op.id, message="hello")
    assert response.revision > op.revision
    assert get(grpc_stub, op.id).revision == response.revision


def test_reads_and_rejected_calls_do_not_change_revisions(grpc_stub: Stub) -> None:
    op = running(grpc_stub)
    before = get(grpc_stub, op.id)
    get(grpc_stub, op.id)
    grpc_stub.ListOperations(pb.ListOperationsRequest(filter=pb.OperationFilter(project="x")))
    rpc_error(
        grpc_stub.UpdateOperation,
        pb.UpdateOperationRequest(operation_id=op.id, percent=101.0),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    nxt = start(grpc_stub)
    assert nxt.revision == before.revision + 1
