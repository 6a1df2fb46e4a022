"""Watching: README guarantees 5 (revisions), 6 (watch), 10 (watch streams on shutdown)
and the Filters paragraph, through the generated stubs on a real socket.

Every recorded stream is checked with `watch_checks.check_revisions`, so each test
also checks guarantee 5 on what it saw.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server.store.memory import MemoryStore

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc

Stub = pb_grpc.ProgressTrackerStub
Record = Callable[[Any], Any]

RESUME_KEY = "headway-resume-revision"


# --- helpers ---------------------------------------------------------------------------------


def start(stub: Stub, project: str, **fields: Any) -> pb.Operation:
    fields.setdefault("operation_id", wc.unique("op"))
    fields.setdefault("kind", "ingest")
    fields.setdefault("total", 100)
    return stub.StartOperation(pb.StartOperationRequest(project=project, **fields), timeout=5)


def update(stub: Stub, operation_id: str, **fields: Any) -> pb.UpdateOperationResponse:
    return stub.UpdateOperation(
        pb.UpdateOperationRequest(operation_id=operation_id, **fields), timeout=5
    )


def complete(stub: Stub, operation_id: str) -> pb.Operation:
    return stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=operation_id), timeout=5)


def fail(stub: Stub, operation_id: str, code: str = "BOOM") -> pb.Operation:
    request = pb.FailOperationRequest(
        operation_id=operation_id, error=pb.OperationError(code=code, message="it broke")
    )
    return stub.FailOperation(request, timeout=5)


def cancel(stub: Stub, operation_id: str) -> pb.Operation:
    request = pb.CancelOperationRequest(operation_id=operation_id, reason="user asked")
    return stub.CancelOperation(request, timeout=5)


def delete(stub: Stub, operation_id: str) -> None:
    stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=operation_id), timeout=5)


def get(stub: Stub, operation_id: str) -> pb.Operation:
    return stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=5)


def store_revision(stub: Stub) -> int:
    """The store's current revision (a list of nothing is read at it)."""
    request = pb.ListOperationsRequest(
        filter=pb.OperationFilter(project=wc.unique("nothing")), page_size=1
    )
    return int(stub.ListOperations(request, timeout=5).revision)


def watch_one(stub: Stub, operation_id: str, from_revision: int = 0, from_epoch: str = "") -> Any:
    request = pb.WatchOperationRequest(
        operation_id=operation_id, from_revision=from_revision, from_epoch=from_epoch
    )
    return stub.WatchOperation(request, timeout=30)


def watch_all(
    stub: Stub,
    from_revision: int = 0,
    *,
    from_epoch: str = "",
    every_state: bool = False,
    **filter_fields: Any,
) -> Any:
    """WatchOperations with the server's pacing, or (every_state) asking for none."""
    request = pb.WatchOperationsRequest(
        filter=pb.OperationFilter(**filter_fields),
        from_revision=from_revision,
        from_epoch=from_epoch,
    )
    if every_state:
        request.min_interval.SetInParent()  # an explicit 0
    return stub.WatchOperations(request, timeout=30)


def operation_events(events: list[wc.Event]) -> list[wc.Event]:
    return [e for e in events if e.type in (wc.SNAPSHOT, wc.CHANGED, wc.DELETED)]


def ids_of(events: list[wc.Event]) -> list[str]:
    return [e.operation.id for e in operation_events(events)]


def drain(recorder: Any, timeout: float = 5.0) -> list[wc.Event]:
    """Every event until the stream ends."""
    recorder.wait_end(timeout)
    messages = []
    while True:
        try:
            messages.append(recorder.next(timeout=0.1))
        except EOFError:
            return wc.flatten(messages)


def synced(recorder: Any, timeout: float = 5.0) -> list[wc.Event]:
    """Reads a fresh WatchOperations stream up to and including its SYNCED."""
    return wc.read_until(recorder, wc.is_type(wc.SYNCED), timeout=timeout)


# --- WatchOperation --------------------------------------------------------------------------


def test_watch_operation_snapshot_then_each_change_then_ends_ok(
    grpc_stub: Stub, record: Record
) -> None:
    project = wc.unique("p")
    op = start(grpc_stub, project)
    recorder = record(watch_one(grpc_stub, op.id))
    events = wc.read_until(recorder, wc.is_type(wc.SNAPSHOT))
    assert events[0].type == wc.SNAPSHOT, wc.describe(events)
    wc.assert_same_operation(events[0].operation, get(grpc_stub, op.id), "snapshot")

    revisions = []
    for step in range(1, 6):
        response = update(grpc_stub, op.id, sequence=step, completed=step * 10, message=f"s{step}")
        revisions.append(response.revision)
        got = wc.read_until(recorder, wc.at_revision(response.revision), into=events)
        changed = [e for e in got if e.type == wc.CHANGED]
        assert [e.revision for e in changed] == [response.revision], wc.describe(got)
        assert changed[0].operation.completed == step * 10
        wc.assert_same_operation(changed[0].operation, get(grpc_stub, op.id), f"step {step}")

    finished = complete(grpc_stub, op.id)
    assert recorder.wait_end(5) is None, "WatchOperation must end with OK after the terminal state"
    events += drain(recorder)
    wc.check_revisions(events)
    op_events = operation_events(events)
    assert [e.type for e in op_events] == [wc.SNAPSHOT] + [wc.CHANGED] * 6, wc.describe(events)
    assert [e.revision for e in op_events[1:]] == [*revisions, finished.revision]
    wc.assert_same_operation(op_events[-1].operation, finished, "terminal state")
    assert op_events[-1].operation.state == pb.Operation.SUCCEEDED


@pytest.mark.parametrize("ending", ["fail", "cancel-running", "cancel-queued"])
def test_watch_operation_ends_ok_after_any_terminal_state(
    grpc_stub: Stub, record: Record, ending: str
) -> None:
    op = start(grpc_stub, wc.unique("p"))
    recorder = record(watch_one(grpc_stub, op.id))
    events = wc.read_until(recorder, wc.is_type(wc.SNAPSHOT))
    if ending != "cancel-queued":
        update(grpc_stub, op.id, sequence=1, completed=5)
    if ending == "fail":
        final = fail(grpc_stub, op.id)
    elif ending == "cancel-running":
        cancel(grpc_stub, op.id)
        final = fail(grpc_stub, op.id, code="CANCELLED")
    else:
        final = cancel(grpc_stub, op.id)
    assert final.state in wc.TERMINAL_STATES
    assert recorder.wait_end(5) is None
    events += drain(recorder)
    wc.check_revisions(events)
    wc.assert_same_operation(operation_events(events)[-1].operation, final, "terminal state")


def test_watch_operation_of_finished_operation_sends_snapshot_and_ends(
    grpc_stub: Stub, record: Record
) -> None:
    op = start(grpc_stub, wc.unique("p"))
    update(grpc_stub, op.id, sequence=1, completed=50)
    finished = complete(grpc_stub, op.id)
    recorder = record(watch_one(grpc_stub, op.id))
    assert recorder.wait_end(5) is None
    events = drain(recorder)
    wc.check_revisions(events)
    op_events = operation_events(events)
    assert [e.type for e in op_events] == [wc.SNAPSHOT], wc.describe(events)
    wc.assert_same_operation(op_events[0].operation, finished, "snapshot of a finished operation")


def test_watch_operation_unknown_id_is_not_found(grpc_stub: Stub, record: Record) -> None:
    recorder = record(watch_one(grpc_stub, wc.unique("missing")))
    error = recorder.wait_end(5)
    assert error is not None and error.code() == grpc.StatusCode.NOT_FOUND, error


def test_watch_operation_invalid_id_is_invalid_argument(grpc_stub: Stub, record: Record) -> None:
    recorder = record(watch_one(grpc_stub, "not a valid id!"))
    error = recorder.wait_end(5)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "operation_id" in (error.details() or "")


def test_watch_operation_ends_ok_after_deleted(grpc_stub: Stub, record: Record) -> None:
    op = start(grpc_stub, wc.unique("p"))
    update(grpc_stub, op.id, sequence=1, completed=1)
    recorder = record(watch_one(grpc_stub, op.id))
    events = wc.read_until(recorder, wc.is_type(wc.SNAPSHOT))
    delete(grpc_stub, op.id)
    assert recorder.wait_end(5) is None, "WatchOperation must end with OK after DELETED"
    events += drain(recorder)
    wc.check_revisions(events)
    op_events = operation_events(events)
    assert [e.type for e in op_events] == [wc.SNAPSHOT, wc.DELETED], wc.describe(events)
    assert op_events[-1].operation.id == op.id
    assert op_events[-1].revision > op_events[0].revision


def test_watch_operation_resumes_after_revision(grpc_stub: Stub, record: Record) -> None:
    op = start(grpc_stub, wc.unique("p"))
    first = record(watch_one(grpc_stub, op.id))
    snapshot = wc.read_until(first, wc.is_type(wc.SNAPSHOT))
    seen = snapshot[-1].revision
    first.cancel()

    for step in range(1, 4):
        update(grpc_stub, op.id, sequence=step, completed=step)
    latest = get(grpc_stub, op.id)

    resumed = record(watch_one(grpc_stub, op.id, from_revision=seen))
    events = wc.read_until(resumed, wc.at_revision(latest.revision))
    finished = complete(grpc_stub, op.id)
    assert resumed.wait_end(5) is None
    events += drain(resumed)
    wc.check_revisions(events, from_revision=seen)
    op_events = operation_events(events)
    # The latest state once (superseded ones may be skipped), then the terminal one.
    assert [e.type for e in op_events] == [wc.CHANGED, wc.CHANGED], wc.describe(events)
    wc.assert_same_operation(op_events[0].operation, latest, "state after the resume point")
    wc.assert_same_operation(op_events[1].operation, finished, "terminal state")


# --- WatchOperations: snapshot, changes, filters ---------------------------------------------


def test_watch_operations_snapshot_sorted_by_revision_then_synced_then_changes(
    grpc_stub: Stub, record: Record
) -> None:
    project, other = wc.unique("p"), wc.unique("q")
    ops = [start(grpc_stub, project) for _ in range(5)]
    start(grpc_stub, other)
    # Touch them in an order unlike creation so revision order differs from it.
    for i, op in enumerate(random.Random(7).sample(ops, len(ops))):
        update(grpc_stub, op.id, sequence=1, completed=i + 1)
    finished = complete(grpc_stub, ops[2].id)
    before = store_revision(grpc_stub)

    recorder = record(watch_all(grpc_stub, project=project))
    events = synced(recorder)
    snapshot, sync, _ = wc.split_initial_sync(events)
    assert sorted(ids_of(snapshot)) == sorted(op.id for op in ops), wc.describe(snapshot)
    assert sync.revision >= before, "SYNCED must be caught up to what happened before the watch"
    for event in snapshot:
        wc.assert_same_operation(event.operation, get(grpc_stub, event.operation.id), "snapshot")
    assert {e.operation.id: e.operation.state for e in snapshot}[ops[2].id] == finished.state

    response = update(grpc_stub, ops[0].id, sequence=2, completed=99)
    new = start(grpc_stub, project)
    events += wc.read_until(recorder, wc.is_type(wc.CHANGED, new.id))
    wc.check_revisions(events)
    changes = operation_events(events[len(snapshot) + 1 :])
    assert [(e.type, e.operation.id) for e in changes] == [
        (wc.CHANGED, ops[0].id),
        (wc.CHANGED, new.id),
    ], wc.describe(events)
    assert changes[0].revision == response.revision > sync.revision
    wc.assert_same_operation(changes[1].operation, new, "a new operation arrives as CHANGED")


def test_watch_operations_of_empty_project_starts_with_synced(
    grpc_stub: Stub, record: Record
) -> None:
    before = store_revision(grpc_stub)
    recorder = record(watch_all(grpc_stub, project=wc.unique("empty")))
    events = synced(recorder)
    assert events[0].type == wc.SYNCED, wc.describe(events)
    assert events[0].revision >= before


FILTERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (filter fields besides project, start fields of a non-matching operation)
    "project": ({}, {}),
    "kind": ({"kind": "crawl"}, {"kind": "upload"}),
    "dataset": ({"dataset": "docs"}, {"dataset": "images"}),
    "labels": ({"labels": {"team": "a", "env": "prod"}}, {"labels": {"team": "a"}}),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
def test_watch_operations_only_delivers_matching_operations(
    grpc_stub: Stub, record: Record, name: str
) -> None:
    project = wc.unique("p")
    wanted, unwanted = FILTERS[name]
    match_fields: dict[str, Any] = {"kind": "crawl", "dataset": "docs"}
    match_fields["labels"] = {"team": "a", "env": "prod", "extra": "x"}
    miss_fields = {**match_fields, **unwanted}
    miss_project = wc.unique("q") if name == "project" else project

    old_match = start(grpc_stub, project, **match_fields)
    old_miss = start(grpc_stub, miss_project, **miss_fields)
    recorder = record(watch_all(grpc_stub, project=project, **wanted))
    events = synced(recorder)
    assert ids_of(events) == [old_match.id], wc.describe(events)

    # Every kind of change to a non-matching operation, then one to a matching one:
    # changes arrive in revision order, so anything about the others would come first.
    miss = start(grpc_stub, miss_project, **miss_fields)
    update(grpc_stub, miss.id, sequence=1, completed=3)
    update(grpc_stub, old_miss.id, sequence=1, completed=3)
    complete(grpc_stub, miss.id)
    delete(grpc_stub, old_miss.id)
    response = update(grpc_stub, old_match.id, sequence=1, completed=3)
    events += wc.read_until(recorder, wc.at_revision(response.revision))
    wc.check_revisions(events)
    assert ids_of(events) == [old_match.id, old_match.id], wc.describe(events)


def test_watch_operations_active_only_delivers_the_end_once(
    grpc_stub: Stub, record: Record
) -> None:
    project = wc.unique("p")
    done_early = start(grpc_stub, project)
    update(grpc_stub, done_early.id, sequence=1, completed=1)
    complete(grpc_stub, done_early.id)
    a, b, c, d = (start(grpc_stub, project) for _ in range(4))

    recorder = record(watch_all(grpc_stub, project=project, active_only=True))
    events = synced(recorder)
    assert sorted(ids_of(events)) == sorted([a.id, b.id, c.id, d.id]), wc.describe(events)

    update(grpc_stub, a.id, sequence=1, completed=10)
    a_done = complete(grpc_stub, a.id)
    update(grpc_stub, b.id, sequence=1, completed=10)
    b_done = fail(grpc_stub, b.id)
    c_done = cancel(grpc_stub, c.id)  # QUEUED: cancelled at once
    assert c_done.state == pb.Operation.CANCELLED
    barrier = update(grpc_stub, d.id, sequence=1, completed=10)
    events += wc.read_until(recorder, wc.at_revision(barrier.revision))
    # Nothing more about the finished ones, whatever else happens afterwards.
    barrier = update(grpc_stub, d.id, sequence=2, completed=20)
    events += wc.read_until(recorder, wc.at_revision(barrier.revision))
    wc.check_revisions(events)

    for finished in (a_done, b_done, c_done):
        ends = [
            e
            for e in operation_events(events)
            if e.operation.id == finished.id and e.operation.state in wc.TERMINAL_STATES
        ]
        assert len(ends) == 1, (
            f"{finished.id} end delivered {len(ends)} times: {wc.describe(events)}"
        )
        wc.assert_same_operation(ends[0].operation, finished, "end under active_only")
        last = [e for e in operation_events(events) if e.operation.id == finished.id][-1]
        assert last is ends[0], f"{finished.id} delivered after its end: {wc.describe(events)}"
    assert done_early.id not in ids_of(events)

    # A watcher that starts later sees only the active ones.
    later = record(watch_all(grpc_stub, project=project, active_only=True))
    assert ids_of(synced(later)) == [d.id]


def test_watch_operations_states_filter_leaving_and_returning(
    grpc_stub: Stub, record: Record
) -> None:
    project = wc.unique("p")
    op = start(grpc_stub, project)
    # Every state: this is about the filter, not pacing.
    recorder = record(
        watch_all(grpc_stub, project=project, states=[pb.Operation.RUNNING], every_state=True)
    )
    events = synced(recorder)
    assert ids_of(events) == []

    running = update(grpc_stub, op.id, sequence=1, completed=1)  # QUEUED -> RUNNING: enters
    paused = update(grpc_stub, op.id, sequence=2, paused=True, pause_reason="quota")  # leaves
    resumed = update(grpc_stub, op.id, sequence=3, paused=False)  # enters again
    events += wc.read_until(recorder, wc.at_revision(resumed.revision))
    wc.check_revisions(events)
    states = [(e.revision, e.operation.state) for e in operation_events(events)]
    assert states == [
        (running.revision, pb.Operation.RUNNING),
        (paused.revision, pb.Operation.PAUSED),
        (resumed.revision, pb.Operation.RUNNING),
    ], wc.describe(events)


def test_watch_operations_delivers_deleted(grpc_stub: Stub, record: Record) -> None:
    project = wc.unique("p")
    keep, active, finished = (start(grpc_stub, project) for _ in range(3))
    update(grpc_stub, finished.id, sequence=1, completed=1)
    complete(grpc_stub, finished.id)
    recorder = record(watch_all(grpc_stub, project=project))
    events = synced(recorder)
    delete(grpc_stub, active.id)
    delete(grpc_stub, finished.id)
    barrier = update(grpc_stub, keep.id, sequence=1, completed=1)
    events += wc.read_until(recorder, wc.at_revision(barrier.revision))
    wc.check_revisions(events)
    tail = [(e.type, e.operation.id) for e in operation_events(events[4:])]
    assert tail == [(wc.DELETED, active.id), (wc.DELETED, finished.id), (wc.CHANGED, keep.id)], (
        wc.describe(events)
    )
    wc.assert_matches_store(grpc_stub, wc.latest_states(events), "after deletes")


# --- resuming --------------------------------------------------------------------------------


def test_resume_from_last_seen_revision_gets_exactly_the_changes_after_it(
    grpc_stub: Stub, record: Record
) -> None:
    project, other = wc.unique("p"), wc.unique("q")
    a, b, c, untouched = (start(grpc_stub, project) for _ in range(4))
    x = start(grpc_stub, other)
    first = record(watch_all(grpc_stub, project=project))
    events = synced(first)
    update(grpc_stub, a.id, sequence=1, completed=1)
    events += wc.read_until(first, wc.is_type(wc.CHANGED, a.id))
    seen = events[-1].revision
    first.cancel()

    # While away: several changes to a, a delete, a new operation, a finish, and
    # changes in another project.
    for step in range(2, 6):
        update(grpc_stub, a.id, sequence=step, completed=step)
    delete(grpc_stub, b.id)
    update(grpc_stub, c.id, sequence=1, completed=1)
    complete(grpc_stub, c.id)
    new = start(grpc_stub, project)
    update(grpc_stub, x.id, sequence=1, completed=1)
    delete(grpc_stub, x.id)
    start(grpc_stub, other)
    now = store_revision(grpc_stub)

    resumed = record(watch_all(grpc_stub, project=project, from_revision=seen))
    catch_up = synced(resumed)
    wc.check_revisions(catch_up, from_revision=seen)
    assert catch_up[-1].type == wc.SYNCED and catch_up[-1].revision >= now, wc.describe(catch_up)
    got = sorted((e.operation.id, e.type) for e in operation_events(catch_up))
    want = sorted(
        [(a.id, wc.CHANGED), (b.id, wc.DELETED), (c.id, wc.CHANGED), (new.id, wc.CHANGED)]
    )
    assert got == want, wc.describe(catch_up)
    assert untouched.id not in ids_of(catch_up)
    assert all(e.type != wc.RESET for e in catch_up), wc.describe(catch_up)
    wc.assert_matches_store(grpc_stub, wc.latest_states(catch_up), "after resume")
    assert wc.latest_states(catch_up)[c.id].state == pb.Operation.SUCCEEDED  # type: ignore[union-attr]

    # And the resumed stream follows on.
    response = update(grpc_stub, untouched.id, sequence=1, completed=1)
    more = wc.read_until(resumed, wc.at_revision(response.revision))
    wc.check_revisions(events + catch_up + more)
    assert [(e.type, e.operation.id) for e in operation_events(more)] == [
        (wc.CHANGED, untouched.id)
    ]


def test_resume_when_nothing_changed_sends_synced_only(grpc_stub: Stub, record: Record) -> None:
    project = wc.unique("p")
    start(grpc_stub, project)
    first = record(watch_all(grpc_stub, project=project))
    seen = synced(first)[-1].revision
    first.cancel()
    start(grpc_stub, wc.unique("q"))  # the store moves on, the project does not
    resumed = record(watch_all(grpc_stub, project=project, from_revision=seen))
    events = synced(resumed)
    assert [e.type for e in events] == [wc.SYNCED], wc.describe(events)
    assert events[0].revision >= seen


def test_resume_older_than_tombstone_history_resets(server_factory: Any, record: Record) -> None:
    server = server_factory(history_size=2)
    with wc.open_stub(server.address) as stub:
        project = wc.unique("p")
        ops = [start(stub, project) for _ in range(6)]
        first = record(watch_all(stub, project=project))
        seen = synced(first)[-1].revision
        first.cancel()
        for op in ops[:4]:
            delete(stub, op.id)  # four tombstones after `seen`; the server keeps two
        update(stub, ops[4].id, sequence=1, completed=4)

        resumed = record(watch_all(stub, project=project, from_revision=seen))
        events = synced(resumed)
        wc.check_revisions(events, from_revision=seen)
        assert events[0].type == wc.RESET, wc.describe(events)
        snapshot, sync, _ = wc.split_initial_sync(events[1:])
        assert sorted(ids_of(snapshot)) == sorted([ops[4].id, ops[5].id]), wc.describe(events)
        wc.assert_matches_store(stub, wc.latest_states(events), "snapshot after RESET")
        assert sync.revision >= store_revision(stub)

        # The stream goes on normally after the reset.
        response = update(stub, ops[5].id, sequence=1, completed=5)
        more = wc.read_until(resumed, wc.at_revision(response.revision))
        wc.check_revisions(events + more, from_revision=seen)
        assert [(e.type, e.operation.id) for e in operation_events(more)] == [
            (wc.CHANGED, ops[5].id)
        ]


def test_resume_within_tombstone_history_does_not_reset(
    server_factory: Any, record: Record
) -> None:
    server = server_factory(history_size=2)
    with wc.open_stub(server.address) as stub:
        project = wc.unique("p")
        ops = [start(stub, project) for _ in range(6)]
        for op in ops[:3]:
            delete(stub, op.id)  # older tombstones, dropped for the newer ones below
        first = record(watch_all(stub, project=project))
        seen = synced(first)[-1].revision
        first.cancel()
        delete(stub, ops[3].id)
        delete(stub, ops[4].id)

        resumed = record(watch_all(stub, project=project, from_revision=seen))
        events = synced(resumed)
        wc.check_revisions(events, from_revision=seen)
        assert [(e.type, e.operation.id) for e in operation_events(events)] == [
            (wc.DELETED, ops[3].id),
            (wc.DELETED, ops[4].id),
        ], wc.describe(events)
        assert all(e.type != wc.RESET for e in events)


def test_resume_from_a_future_revision_resets(grpc_stub: Stub, record: Record) -> None:
    project = wc.unique("p")
    ops = [start(grpc_stub, project) for _ in range(3)]
    future = store_revision(grpc_stub) + 1_000_000
    recorder = record(watch_all(grpc_stub, project=project, from_revision=future))
    events = synced(recorder)
    wc.check_revisions(events, from_revision=future)
    assert events[0].type == wc.RESET, wc.describe(events)
    snapshot, sync, _ = wc.split_initial_sync(events[1:])
    assert ids_of(snapshot) == [op.id for op in ops], wc.describe(events)
    assert sync.revision < future
    wc.assert_matches_store(grpc_stub, wc.latest_states(events), "snapshot after RESET")


def test_watch_streams_end_unavailable_with_resume_revision_and_resume_after_restart(
    server_factory: Any, record: Record
) -> None:
    project = wc.unique("p")
    first = server_factory()
    port = first.port
    with wc.open_stub(first.address) as stub:
        ops = [start(stub, project) for _ in range(4)]
        for i, op in enumerate(ops):
            update(stub, op.id, sequence=1, completed=i + 1)
        many = record(watch_all(stub, project=project))
        one = record(watch_one(stub, ops[0].id))
        events = synced(many)
        single = wc.read_until(one, wc.is_type(wc.SNAPSHOT))
        last = store_revision(stub)

        first.shutdown(1.0)
        for recorder, seen in ((many, events), (one, single)):
            error = recorder.wait_end(10)
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
            trailers = dict(error.trailing_metadata() or ())
            assert RESUME_KEY in trailers, trailers
            resume_at = int(trailers[RESUME_KEY])
            seen += drain(recorder)
            wc.check_revisions(seen)
            assert max(e.revision for e in seen) <= resume_at <= last, (
                resume_at,
                wc.describe(seen),
            )
        resume_at = int(dict(many.error.trailing_metadata())[RESUME_KEY])

    # A fresh in-memory server on the same port: the old revision is in its future.
    second = server_factory(listen=f"127.0.0.1:{port}")
    with wc.open_stub(second.address) as stub:
        fresh = start(stub, project)
        assert fresh.revision < resume_at
        recorder = record(watch_all(stub, project=project, from_revision=resume_at))
        events = synced(recorder)
        wc.check_revisions(events, from_revision=resume_at)
        assert events[0].type == wc.RESET, wc.describe(events)
        snapshot, _, _ = wc.split_initial_sync(events[1:])
        assert ids_of(snapshot) == [fresh.id]
        wc.assert_matches_store(stub, wc.latest_states(events), "snapshot after restart")


# --- epochs ----------------------------------------------------------------------------------

# Looks like an epoch, is not the server's.
OTHER_EPOCH = "0123456789abcdef"


def test_synced_bookmark_reset_and_a_watch_operations_first_event_carry_the_epoch(
    grpc_stub: Stub, record: Record, headway_config: Any
) -> None:
    project = wc.unique("p")
    op = start(grpc_stub, project)
    recorder = record(watch_all(grpc_stub, project=project))
    events = synced(recorder)
    epoch = events[-1].epoch
    assert epoch and len(epoch) <= 64, wc.describe(events)
    assert [e.epoch for e in events[:-1]] == [""], "SNAPSHOT events carry no epoch"
    events += wc.read_until(
        recorder, wc.is_type(wc.BOOKMARK), timeout=headway_config.bookmark_interval * 4
    )
    assert events[-1].epoch == epoch

    future = store_revision(grpc_stub) + 1_000_000
    reset = synced(record(watch_all(grpc_stub, project=project, from_revision=future)))
    assert [(e.type, e.epoch) for e in reset if e.type != wc.SNAPSHOT] == [
        (wc.RESET, epoch),
        (wc.SYNCED, epoch),
    ], wc.describe(reset)

    # WatchOperation has no SYNCED: its first event tells the epoch.
    single = record(watch_one(grpc_stub, op.id))
    snapshot = wc.read_until(single, wc.is_type(wc.SNAPSHOT))
    assert [(e.type, e.epoch) for e in snapshot] == [(wc.SNAPSHOT, epoch)]
    response = update(grpc_stub, op.id, sequence=1, completed=1)
    changed = wc.read_until(single, wc.at_revision(response.revision))
    assert [(e.type, e.epoch) for e in changed] == [(wc.CHANGED, "")], wc.describe(changed)


def test_resume_in_the_servers_epoch_catches_up_exactly(grpc_stub: Stub, record: Record) -> None:
    project = wc.unique("p")
    ops = [start(grpc_stub, project) for _ in range(3)]
    first = record(watch_all(grpc_stub, project=project))
    sync = synced(first)[-1]
    first.cancel()
    changed = update(grpc_stub, ops[0].id, sequence=1, completed=5)
    delete(grpc_stub, ops[1].id)
    added = start(grpc_stub, project)

    resumed = record(
        watch_all(grpc_stub, project=project, from_revision=sync.revision, from_epoch=sync.epoch)
    )
    events = synced(resumed)
    wc.check_revisions(events, from_revision=sync.revision)
    assert all(e.type != wc.RESET for e in events), wc.describe(events)
    assert [(e.type, e.operation.id) for e in operation_events(events)] == [
        (wc.CHANGED, ops[0].id),
        (wc.DELETED, ops[1].id),
        (wc.CHANGED, added.id),
    ], wc.describe(events)
    assert operation_events(events)[0].revision == changed.revision
    assert events[-1].epoch == sync.epoch

    # WatchOperation too: the latest state, no RESET.
    single = record(watch_one(grpc_stub, ops[0].id, sync.revision, from_epoch=sync.epoch))
    got = wc.read_until(single, wc.at_revision(changed.revision))
    assert [(e.type, e.revision, e.epoch) for e in got] == [
        (wc.CHANGED, changed.revision, sync.epoch)
    ], wc.describe(got)


def test_resume_from_another_epoch_resets_and_sends_a_snapshot(
    grpc_stub: Stub, record: Record
) -> None:
    project = wc.unique("p")
    ops = [start(grpc_stub, project) for _ in range(3)]
    first = record(watch_all(grpc_stub, project=project))
    sync = synced(first)[-1]
    first.cancel()
    update(grpc_stub, ops[0].id, sequence=1, completed=5)

    # The revision is one this server has; the epoch says it is not from here.
    resumed = record(
        watch_all(grpc_stub, project=project, from_revision=sync.revision, from_epoch=OTHER_EPOCH)
    )
    events = synced(resumed)
    wc.check_revisions(events, from_revision=sync.revision)
    assert (events[0].type, events[0].epoch) == (wc.RESET, sync.epoch), wc.describe(events)
    snapshot, again, _ = wc.split_initial_sync(events[1:])
    assert sorted(ids_of(snapshot)) == sorted(op.id for op in ops), wc.describe(events)
    wc.assert_matches_store(grpc_stub, wc.latest_states(events), "snapshot after RESET")
    assert again.epoch == sync.epoch

    single = record(watch_one(grpc_stub, ops[1].id, sync.revision, from_epoch=OTHER_EPOCH))
    got = wc.read_until(single, wc.is_type(wc.SNAPSHOT))
    assert [(e.type, e.epoch) for e in got] == [(wc.RESET, sync.epoch), (wc.SNAPSHOT, "")]
    wc.assert_same_operation(got[1].operation, get(grpc_stub, ops[1].id), "snapshot after RESET")


def test_resume_after_a_memory_server_restart_resets_though_the_revision_exists_again(
    server_factory: Any, record: Record
) -> None:
    """A restarted memory server counts revisions from 0 again: once it has made
    as many changes, a revision from before the restart is not ahead of it, and
    only the epoch tells the client's position from one of this store's."""
    project = wc.unique("p")
    server = server_factory()
    with wc.open_stub(server.address) as stub:
        ops = [start(stub, project) for _ in range(3)]
        for i, op in enumerate(ops):
            update(stub, op.id, sequence=1, completed=i + 1)
        many = record(watch_all(stub, project=project))
        sync = synced(many)[-1]
        one = record(watch_one(stub, ops[0].id))
        [snapshot] = wc.read_until(one, wc.is_type(wc.SNAPSHOT))
        old_epoch = sync.epoch
        assert snapshot.epoch == old_epoch
        many.cancel()
        one.cancel()

    server.restart(store=MemoryStore())  # as a new process: an empty store, a new epoch
    with wc.open_stub(server.address) as stub:
        # The producer registers its operation again; other work moves the new
        # store's revision past the positions the watchers kept.
        again = start(stub, project, operation_id=ops[0].id)
        while store_revision(stub) < max(sync.revision, snapshot.revision):
            start(stub, wc.unique("other"))

        # Without an epoch (a client from before epochs) nothing shows the revision is foreign.
        blind = synced(record(watch_all(stub, project=project, from_revision=sync.revision)))
        assert all(e.type != wc.RESET for e in blind), wc.describe(blind)

        resumed = record(
            watch_all(stub, project=project, from_revision=sync.revision, from_epoch=old_epoch)
        )
        events = synced(resumed)
        wc.check_revisions(events, from_revision=sync.revision)
        assert events[0].type == wc.RESET, wc.describe(events)
        new_epoch = events[0].epoch
        assert new_epoch and new_epoch != old_epoch
        snapshot_after, sync_after, _ = wc.split_initial_sync(events[1:])
        assert ids_of(snapshot_after) == [again.id], wc.describe(events)
        wc.assert_matches_store(stub, wc.latest_states(events), "snapshot after restart")
        assert sync_after.epoch == new_epoch

        single = record(watch_one(stub, ops[0].id, snapshot.revision, from_epoch=old_epoch))
        got = wc.read_until(single, wc.is_type(wc.SNAPSHOT))
        assert [(e.type, e.epoch) for e in got] == [(wc.RESET, new_epoch), (wc.SNAPSHOT, "")]
        wc.assert_same_operation(got[1].operation, get(stub, ops[0].id), "snapshot after restart")


@pytest.mark.parametrize("rpc", ["WatchOperation", "WatchOperations"])
def test_from_epoch_longer_than_64_characters_is_invalid_argument(
    grpc_stub: Stub, record: Record, rpc: str
) -> None:
    op = start(grpc_stub, wc.unique("p"))

    def open_watch(from_epoch: str) -> Any:
        if rpc == "WatchOperation":
            return record(watch_one(grpc_stub, op.id, op.revision, from_epoch=from_epoch))
        return record(watch_all(grpc_stub, op.revision, from_epoch=from_epoch, project=op.project))

    error = open_watch("e" * 65).wait_end(5)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "from_epoch" in (error.details() or ""), error.details()
    # 64 is accepted (and, not being the server's epoch, resets).
    events = wc.read_until(open_watch("e" * 64), wc.is_type(wc.RESET))
    assert events[0].type == wc.RESET, wc.describe(events)


def test_a_resumes_first_event_carries_the_epoch_though_a_live_watcher_got_it_without(
    grpc_stub: Stub, record: Record
) -> None:
    """The server serializes each state once for all its watchers; the epoch on
    a stream's first event must not leak into, or be lost from, that sharing."""
    op = start(grpc_stub, wc.unique("p"))
    live = record(watch_one(grpc_stub, op.id))
    [snapshot] = wc.read_until(live, wc.is_type(wc.SNAPSHOT))
    response = update(grpc_stub, op.id, sequence=1, completed=1)
    changed = wc.read_until(live, wc.at_revision(response.revision))
    assert [(e.type, e.revision, e.epoch) for e in changed] == [(wc.CHANGED, response.revision, "")]
    resumed = record(watch_one(grpc_stub, op.id, snapshot.revision, from_epoch=snapshot.epoch))
    got = wc.read_until(resumed, wc.at_revision(response.revision))
    assert [(e.type, e.revision, e.epoch) for e in got] == [
        (wc.CHANGED, response.revision, snapshot.epoch)
    ]
    fresh = record(watch_one(grpc_stub, op.id))
    got = wc.read_until(fresh, wc.is_type(wc.SNAPSHOT))
    assert [(e.revision, e.epoch) for e in got] == [(response.revision, snapshot.epoch)]


# --- bookmarks -------------------------------------------------------------------------------


def test_quiet_stream_gets_bookmarks(grpc_stub: Stub, record: Record, headway_config: Any) -> None:
    interval = headway_config.bookmark_interval
    recorder = record(watch_all(grpc_stub, project=wc.unique("quiet")))
    events = synced(recorder)
    synced_at = time.monotonic()
    events += wc.read_until(recorder, wc.is_type(wc.BOOKMARK), timeout=interval * 4)
    first_at = time.monotonic()
    assert first_at - synced_at < interval * 3
    events += wc.read_until(recorder, wc.is_type(wc.BOOKMARK), timeout=interval * 4)
    wc.check_revisions(events)
    assert [e.type for e in events] == [wc.SYNCED, wc.BOOKMARK, wc.BOOKMARK], wc.describe(events)

    # Changes elsewhere are not events for this stream, but bookmarks move the
    # resume point past them.
    other = start(grpc_stub, wc.unique("busy"))
    moved = wc.read_until(
        recorder,
        lambda e: e.type == wc.BOOKMARK and e.revision >= other.revision,
        timeout=interval * 4,
    )
    wc.check_revisions(events + moved)
    assert all(e.type == wc.BOOKMARK for e in moved), wc.describe(moved)


def test_resume_from_bookmark_misses_nothing(
    grpc_stub: Stub, record: Record, headway_config: Any
) -> None:
    project = wc.unique("p")
    op = start(grpc_stub, project)
    recorder = record(watch_all(grpc_stub, project=project))
    events = synced(recorder)
    start(grpc_stub, wc.unique("q"))
    events += wc.read_until(
        recorder, wc.is_type(wc.BOOKMARK), timeout=headway_config.bookmark_interval * 4
    )
    resume_at = events[-1].revision
    recorder.cancel()
    response = update(grpc_stub, op.id, sequence=1, completed=7)
    resumed = record(watch_all(grpc_stub, project=project, from_revision=resume_at))
    catch_up = synced(resumed)
    wc.check_revisions(catch_up, from_revision=resume_at)
    assert [(e.type, e.revision) for e in operation_events(catch_up)] == [
        (wc.CHANGED, response.revision)
    ], wc.describe(catch_up)


# --- slow and fast watchers ------------------------------------------------------------------


def test_slow_watcher_gets_latest_and_terminal_state_and_does_not_delay_others(
    grpc_server: Any, grpc_stub: Stub, record: Record
) -> None:

    project = wc.unique("p")
    updates = 500
    # ~7 MB of reports: far more than flow-control windows and socket buffers hold.
    big = "x" * 3500
    details = Struct()
    details.update({"blob": "y" * 11000})
    with (
        wc.open_stub(grpc_server.address) as slow_stub,
        wc.open_stub(grpc_server.address) as fast_stub,
    ):
        slow_call = watch_all(slow_stub, project=project)
        slow_events = wc.flatten([next(slow_call)])
        while slow_events[-1].type != wc.SYNCED:
            slow_events += wc.flatten([next(slow_call)])
        # From here the slow watcher does not read until the operation ended.

        fast = record(watch_all(fast_stub, project=project))
        fast_events = synced(fast)

        op = start(grpc_stub, project)
        began = time.monotonic()
        for step in range(1, updates + 1):
            response = update(
                grpc_stub,
                op.id,
                sequence=step,
                completed=step * 100 // updates,
                counters={"items": 1},
                message=f"{step} {big}",
                details=details,
            )
            assert response.applied
        produced = time.monotonic() - began
        mid = update(grpc_stub, op.id, sequence=updates + 1, message="last report")
        fast_events += wc.read_until(fast, wc.at_revision(mid.revision), timeout=10)
        finished = complete(grpc_stub, op.id)
        completed_at = time.monotonic()
        fast_events += wc.read_until(fast, wc.is_terminal(op.id), timeout=5)
        fast_delay = time.monotonic() - completed_at

        time.sleep(0.5)  # the slow watcher is still not reading
        assert finished.counters["items"] == updates
        slow = record(slow_call)
        slow_events += wc.read_until(slow, wc.is_terminal(op.id), timeout=15)

    assert produced < 30, f"{updates} reports took {produced:.1f}s with a stalled watcher"
    assert fast_delay < 2.0, f"the fast watcher saw the end {fast_delay:.2f}s late"
    for name, events in (("fast", fast_events), ("slow", slow_events)):
        wc.check_revisions(events)
        wc.split_initial_sync(events)
        latest = wc.latest_states(events)
        wc.assert_same_operation(latest[op.id], finished, f"{name} watcher's last state")  # type: ignore[arg-type]
        assert pb.Operation.SUCCEEDED in wc.delivered_states(events)[op.id]
    # The fast one kept up: it saw the last report's state before the end.
    assert any(e.revision == mid.revision for e in fast_events), wc.describe(fast_events)


# --- revision ordering (guarantee 5) ---------------------------------------------------------


def test_revisions_are_store_wide_and_ordered_on_streams(grpc_stub: Stub, record: Record) -> None:
    project = wc.unique("p")
    rng = random.Random(5)
    ops = [start(grpc_stub, project) for _ in range(4)]
    revisions = [op.revision for op in ops]
    many = record(watch_all(grpc_stub, project=project))
    singles = {op.id: record(watch_one(grpc_stub, op.id)) for op in ops}
    many_events = synced(many)

    # Several writers interleaving changes to the same operations.
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        local = random.Random(seed)
        try:
            for _ in range(60):
                op = local.choice(ops)
                # No sequences: concurrent writers of one operation cannot number reports.
                response = update(
                    grpc_stub, op.id, completed=local.randint(0, 100), counters={"n": 1}
                )
                with lock:
                    revisions.append(response.revision)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    ends = []
    for op in ops:
        end = rng.choice([complete, fail])(grpc_stub, op.id)
        ends.append(end)
        revisions.append(end.revision)
    assert len(set(revisions)) == len(revisions), "two changes got the same revision"

    last_end = max(end.revision for end in ends)
    many_events += wc.read_until(many, wc.at_revision(last_end), timeout=10)
    wc.check_revisions(many_events)
    wc.assert_matches_store(grpc_stub, wc.latest_states(many_events), "project watcher")
    for op in ops:
        single = singles[op.id]
        assert single.wait_end(10) is None
        events = drain(single)
        wc.check_revisions(events)
        assert events[0].type == wc.SNAPSHOT, wc.describe(events)
        wc.assert_matches_store(grpc_stub, wc.latest_states(events), f"watcher of {op.id}")
        delivered = {e.revision for e in operation_events(events) if e.type == wc.CHANGED}
        assert delivered <= set(revisions), "an event carries a revision no change had"
