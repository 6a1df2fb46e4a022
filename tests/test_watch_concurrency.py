"""Many producers and many kinds of watchers at once (README guarantees 5 and 6).

Producer threads each run one operation through many reports to an end (completed,
failed, cancelled while running, cancelled while queued), pausing some on the way.
Meanwhile project watchers follow along: prompt ones, slow ones that sleep between
reads, ones that cancel mid-way and resume from the last revision they saw, and
one WatchOperation per operation. Every recorded stream must then show strictly
increasing revisions, no state twice, every operation's end, and as last state
per operation exactly what GetOperation returns.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc


UPDATES = 100
ENDINGS = ("complete", "fail", "cancel", "complete", "cancel-queued", "fail", "cancel", "complete")
TIME_LIMIT = 20.0


@dataclasses.dataclass
class Follower:
    """One WatchOperations watcher: how it reads, and what it recorded."""

    name: str
    pause: float = 0.0  # sleep after each message
    stall: float = 0.0  # stop reading this long once, after a few messages
    reconnect: tuple[int, int] | None = None  # cancel after this many messages (range)
    start_after: float = 0.0
    # Pacing asked for: None = the server's default; 0 = every state.
    min_interval: float | None = None
    events: list[wc.Event] = dataclasses.field(default_factory=list)
    resumes: list[int] = dataclasses.field(default_factory=list)
    messages: int = 0
    states: dict[str, int] = dataclasses.field(default_factory=dict)  # last state seen
    error: BaseException | None = None


def all_ended(follower: Follower, ids: list[str]) -> bool:
    return all(follower.states.get(i) in wc.TERMINAL_STATES for i in ids)


def follow(follower: Follower, address: str, project: str, ids: list[str], deadline: float) -> None:
    """Watches the project until every operation ended, reconnecting as configured."""
    rng = random.Random(follower.name)
    from_revision = 0
    try:
        time.sleep(follower.start_after)
        with wc.open_stub(address) as stub:
            while not all_ended(follower, ids):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{follower.name} did not see every end in time"
                request = pb.WatchOperationsRequest(
                    filter=pb.OperationFilter(project=project), from_revision=from_revision
                )
                if follower.min_interval is not None:
                    request.min_interval.FromNanoseconds(int(follower.min_interval * 1e9))
                call = stub.WatchOperations(request, timeout=remaining)
                follower.resumes.append(from_revision)
                budget = rng.randint(*follower.reconnect) if follower.reconnect else -1
                try:
                    for message in call:
                        follower.events.extend(message.events)
                        follower.messages += 1
                        for event in message.events:
                            if event.type in (wc.SNAPSHOT, wc.CHANGED):
                                follower.states[event.operation.id] = event.operation.state
                        if message.events:
                            from_revision = message.events[-1].revision
                        if all_ended(follower, ids):
                            break
                        if follower.pause:
                            time.sleep(follower.pause)
                        if follower.stall and follower.messages == 10:
                            time.sleep(follower.stall)
                        budget -= 1
                        if budget == 0:
                            break  # drop the stream mid-way and resume from_revision
                    else:
                        raise AssertionError(f"{follower.name}: stream ended early")
                finally:
                    call.cancel()
    except BaseException as exc:  # reported by the test
        follower.error = exc


@pytest.mark.timeout(60)
def test_concurrent_producers_and_watchers(server_factory: Any, record: Callable[..., Any]) -> None:
    server = server_factory()
    project = wc.unique("busy")
    ids = [f"job-{i}-{ending}" for i, ending in enumerate(ENDINGS)]
    began = time.monotonic()
    deadline = began + TIME_LIMIT

    followers = [
        Follower("prompt-early"),
        Follower("prompt-late", start_after=0.3),
        Follower("slow", pause=0.005),
        Follower("stalling", stall=1.5, start_after=0.2),
        Follower("unpaced", min_interval=0),
        # Unpaced, so that they get enough messages to reconnect many times.
        Follower("reconnect-a", reconnect=(1, 6), min_interval=0),
        Follower("reconnect-b", reconnect=(2, 12), pause=0.01, start_after=0.1, min_interval=0),
        Follower("reconnect-paced", reconnect=(1, 3), min_interval=0.05),
    ]
    threads = [
        threading.Thread(target=follow, args=(f, server.address, project, ids, deadline))
        for f in followers
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.05)

    singles: dict[str, list[Any]] = {operation_id: [] for operation_id in ids}
    errors: list[BaseException] = []

    with wc.open_stub(server.address) as producers, wc.open_stub(server.address) as watchers:

        def watch_one(operation_id: str) -> None:
            request = pb.WatchOperationRequest(operation_id=operation_id)
            call = watchers.WatchOperation(request, timeout=TIME_LIMIT + 5)
            singles[operation_id].append(record(call))

        def produce(index: int, operation_id: str, ending: str) -> None:
            try:
                stub: pb_grpc.ProgressTrackerStub = producers
                stub.StartOperation(
                    pb.StartOperationRequest(
                        operation_id=operation_id,
                        kind="ingest",
                        project=project,
                        total=UPDATES,
                        labels={"producer": str(index)},
                    ),
                    timeout=5,
                )
                watch_one(operation_id)
                if ending == "cancel-queued":
                    time.sleep(0.2)
                    stub.CancelOperation(
                        pb.CancelOperationRequest(operation_id=operation_id, reason="not needed"),
                        timeout=5,
                    )
                    return
                for step in range(1, UPDATES + 1):
                    fields: dict[str, Any] = {}
                    if index % 2 == 0 and step == UPDATES // 4:
                        fields["paused"] = True
                    elif index % 2 == 0 and step == UPDATES // 4 + 3:
                        fields["paused"] = False
                    response = stub.UpdateOperation(
                        pb.UpdateOperationRequest(
                            operation_id=operation_id,
                            sequence=step,
                            completed=step,
                            counters={"items": 1, "bytes": step},
                            message=f"step {step}",
                            **fields,
                        ),
                        timeout=5,
                    )
                    assert response.applied
                    if step == UPDATES // 2:
                        watch_one(operation_id)  # a late watcher: snapshot mid-way
                        if ending == "cancel":
                            stub.CancelOperation(
                                pb.CancelOperationRequest(operation_id=operation_id), timeout=5
                            )
                    if response.cancel_requested:
                        error = pb.OperationError(code="CANCELLED", message="stopped")
                        stub.FailOperation(
                            pb.FailOperationRequest(operation_id=operation_id, error=error),
                            timeout=5,
                        )
                        return
                if ending == "complete":
                    stub.CompleteOperation(
                        pb.CompleteOperationRequest(operation_id=operation_id, message="done"),
                        timeout=5,
                    )
                else:
                    error = pb.OperationError(code="BOOM", message="disk full", item="f-7")
                    stub.FailOperation(
                        pb.FailOperationRequest(operation_id=operation_id, error=error), timeout=5
                    )
            except BaseException as exc:  # reported below
                errors.append(exc)

        workers = [
            threading.Thread(target=produce, args=(i, operation_id, ENDINGS[i]))
            for i, operation_id in enumerate(ids)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(max(0.1, deadline - time.monotonic()))
        assert not any(worker.is_alive() for worker in workers), "producers did not finish"
        assert not errors, errors

        stored = {
            operation_id: producers.GetOperation(
                pb.GetOperationRequest(operation_id=operation_id), timeout=5
            )
            for operation_id in ids
        }
        want_states = {
            "complete": pb.Operation.SUCCEEDED,
            "fail": pb.Operation.FAILED,
            "cancel": pb.Operation.CANCELLED,
            "cancel-queued": pb.Operation.CANCELLED,
        }
        for operation_id, ending in zip(ids, ENDINGS, strict=True):
            assert stored[operation_id].state == want_states[ending], stored[operation_id]

        # WatchOperation streams: SNAPSHOT, changes, the end, then OK.
        for operation_id, recorders in singles.items():
            assert recorders, operation_id
            for recorder in recorders:
                error = recorder.wait_end(max(0.1, deadline - time.monotonic()))
                assert error is None, f"WatchOperation({operation_id}) ended with {error!r}"
                messages = []
                while True:
                    try:
                        messages.append(recorder.next(timeout=0.1))
                    except EOFError:
                        break
                events = wc.flatten(messages)
                wc.check_revisions(events)
                assert events[0].type == wc.SNAPSHOT, wc.describe(events)
                op_events = [e for e in events if e.HasField("operation")]
                assert op_events[-1].operation.state in wc.TERMINAL_STATES, wc.describe(events)
                wc.assert_same_operation(
                    op_events[-1].operation, stored[operation_id], f"WatchOperation {operation_id}"
                )

    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    elapsed = time.monotonic() - began
    assert not any(thread.is_alive() for thread in threads), "watchers did not finish"

    for follower in followers:
        assert follower.error is None, f"{follower.name}: {follower.error!r}"
        events = follower.events
        context = f"{follower.name} (resumed from {follower.resumes})"
        assert all(e.type != wc.RESET for e in events), f"{context}: {wc.describe(events)}"
        wc.check_revisions(events)
        if not follower.reconnect:
            wc.split_initial_sync(events)
        delivered = wc.delivered_states(events)
        latest = wc.latest_states(events)
        for operation_id in ids:
            assert delivered.get(operation_id, set()) & wc.TERMINAL_STATES, (
                f"{context}: never saw the end of {operation_id}"
            )
            last = latest[operation_id]
            assert last is not None, f"{context}: {operation_id} delivered as deleted"
            wc.assert_same_operation(last, stored[operation_id], f"{context}: {operation_id}")
    assert any(len(f.resumes) > 2 for f in followers), "the reconnecting watchers never resumed"
    assert elapsed < TIME_LIMIT, f"took {elapsed:.1f}s"
