"""Checkers for recorded watch streams: the properties of README guarantees 5 and 6.

They run on the flat list of events a stream delivered (or on the concatenation
of the segments of a watcher that reconnects with `from_revision`), so the same
checks apply to `WatchOperation` and `WatchOperations`, to fast, slow and
reconnecting watchers.
"""

from __future__ import annotations

import contextlib
import queue
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

Event = pb.OperationEvent

SNAPSHOT = pb.OperationEvent.SNAPSHOT
SYNCED = pb.OperationEvent.SYNCED
CHANGED = pb.OperationEvent.CHANGED
DELETED = pb.OperationEvent.DELETED
BOOKMARK = pb.OperationEvent.BOOKMARK
RESET = pb.OperationEvent.RESET

# Events that carry an operation, and events that only carry a revision.
OPERATION_EVENTS = frozenset({SNAPSHOT, CHANGED, DELETED})
MARKERS = frozenset({SYNCED, BOOKMARK, RESET})
TERMINAL_STATES = frozenset({pb.Operation.SUCCEEDED, pb.Operation.FAILED, pb.Operation.CANCELLED})


def unique(prefix: str) -> str:
    """A fresh name, so tests sharing the module's server never see each other."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def open_stub(address: str) -> Iterator[pb_grpc.ProgressTrackerStub]:
    """A stub on its own connection (no subchannel shared with other channels).

    A watcher that does not read fills its HTTP/2 windows; on a connection of its
    own it can only hold itself up, so what the test measures is the server.
    """
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        yield pb_grpc.ProgressTrackerStub(channel)
    finally:
        channel.close()


def type_name(event: Event) -> str:
    return pb.OperationEvent.Type.Name(event.type)


def describe(events: Iterable[Event], limit: int = 60) -> str:
    """A compact rendering of events for assertion messages."""
    parts = []
    for event in events:
        text = f"{type_name(event)}@{event.revision}"
        if event.HasField("operation"):
            state = pb.Operation.State.Name(event.operation.state)
            text += f"({event.operation.id} {state} r{event.operation.revision})"
        parts.append(text)
    if len(parts) > limit:
        parts = [*parts[: limit // 2], f"... {len(parts) - limit} more ...", *parts[-limit // 2 :]]
    return ", ".join(parts)


def flatten(messages: Iterable[Any]) -> list[Event]:
    """The events of WatchOperationsResponse messages or of single OperationEvents."""
    events: list[Event] = []
    for message in messages:
        if isinstance(message, pb.WatchOperationsResponse):
            events.extend(message.events)
        else:
            events.append(message)
    return events


def check_revisions(events: Sequence[Event], *, from_revision: int = 0) -> None:
    """README guarantee 5 on one stream, or on a chain of resumed streams.

    - events that carry an operation have strictly increasing revisions (so no
      (operation, revision) pair is delivered twice), all above `from_revision`;
    - SYNCED and BOOKMARK never go backwards and are at least the revision of
      everything delivered before them; the operation events after them are
      above them (a watcher resuming from a marker must miss nothing);
    - SNAPSHOT and CHANGED events carry the operation's state at the event's
      revision.

    RESET means "drop your cache, a fresh snapshot follows": the snapshot's
    revisions may be below what came before, so the checks start over there.
    """
    floor = from_revision
    marker: int | None = None
    seen: set[tuple[str, int]] = set()

    def fail(i: int, problem: str) -> AssertionError:
        return AssertionError(
            f"{problem}: event {i} {describe([events[i]])} in [{describe(events)}]"
        )

    for i, event in enumerate(events):
        if event.type in OPERATION_EVENTS:
            if not (event.HasField("operation") and event.operation.id):
                raise fail(i, "no operation")
            if event.revision <= floor:
                raise fail(i, f"revision not above {floor}")
            key = (event.operation.id, event.revision)
            if key in seen:
                raise fail(i, "state delivered twice")
            seen.add(key)
            floor = event.revision
            if event.type != DELETED and event.operation.revision != event.revision:
                raise fail(i, "event revision differs from the operation's")
        elif event.type in (SYNCED, BOOKMARK):
            if marker is not None and event.revision < marker:
                raise fail(i, f"marker went backwards from {marker}")
            if event.revision < floor:
                raise fail(i, f"marker below {floor}, what was delivered")
            marker = event.revision
            floor = event.revision
        elif event.type == RESET:
            if event.HasField("operation"):
                raise fail(i, "RESET carries an operation")
            floor, marker = 0, event.revision
            seen.clear()
        else:
            raise fail(i, "unexpected event type")


def split_initial_sync(events: Sequence[Event]) -> tuple[list[Event], Event, list[Event]]:
    """Splits a fresh WatchOperations stream into (snapshot, SYNCED, rest).

    Asserts the stream starts with SNAPSHOT events sorted by revision, then SYNCED.
    """
    for i, event in enumerate(events):
        if event.type == SYNCED:
            snapshot = list(events[:i])
            assert all(e.type == SNAPSHOT for e in snapshot), (
                f"only SNAPSHOT events may come before SYNCED: {describe(events)}"
            )
            revisions = [e.revision for e in snapshot]
            assert revisions == sorted(set(revisions)), (
                f"snapshot not sorted by revision: {describe(snapshot)}"
            )
            if snapshot:
                assert event.revision >= snapshot[-1].revision, describe(events)
            return snapshot, event, list(events[i + 1 :])
    raise AssertionError(f"no SYNCED event: {describe(events)}")


def latest_states(events: Iterable[Event]) -> dict[str, pb.Operation | None]:
    """What a watcher's cache holds after the events: id -> operation (None once deleted)."""
    latest: dict[str, pb.Operation | None] = {}
    for event in events:
        if event.type == RESET:
            latest.clear()
        elif event.type in (SNAPSHOT, CHANGED):
            latest[event.operation.id] = event.operation
        elif event.type == DELETED:
            latest[event.operation.id] = None
    return latest


def delivered_states(events: Iterable[Event]) -> dict[str, set[int]]:
    """Every state each operation was delivered in."""
    states: dict[str, set[int]] = {}
    for event in events:
        if event.type in (SNAPSHOT, CHANGED):
            states.setdefault(event.operation.id, set()).add(event.operation.state)
    return states


def serialized(operation: pb.Operation) -> bytes:
    return operation.SerializeToString(deterministic=True)


def assert_same_operation(got: pb.Operation, want: pb.Operation, context: str = "") -> None:
    assert serialized(got) == serialized(want), f"{context}\ngot:\n{got}\nwant:\n{want}"


def assert_matches_store(
    stub: pb_grpc.ProgressTrackerStub, latest: dict[str, pb.Operation | None], context: str = ""
) -> None:
    """The last state a watcher holds for each operation is the stored one."""
    for operation_id, operation in latest.items():
        if operation is None:
            try:
                stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=5)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            else:
                raise AssertionError(f"{context}: {operation_id} delivered DELETED but exists")
            continue
        stored = stub.GetOperation(pb.GetOperationRequest(operation_id=operation_id), timeout=5)
        assert_same_operation(operation, stored, f"{context}: last state of {operation_id}")


def read_until(
    recorder: Any,
    done: Callable[[Event], bool],
    *,
    timeout: float = 5.0,
    into: list[Event] | None = None,
) -> list[Event]:
    """Reads messages from a StreamRecorder until an event satisfies `done`.

    Returns every event read (the whole message holding the matching event);
    they are also appended to `into` when given.
    """
    events: list[Event] = [] if into is None else into
    start = len(events)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise queue.Empty
            message = recorder.next(timeout=remaining)
        except queue.Empty:
            raise AssertionError(
                f"no matching event within {timeout}s; got: {describe(events[start:])}"
            ) from None
        except EOFError:
            raise AssertionError(
                f"stream ended ({recorder.error!r}) before a matching event;"
                f" got: {describe(events[start:])}"
            ) from None
        new = flatten([message])
        events.extend(new)
        if any(done(event) for event in new):
            return events[start:]


def is_type(kind: int, operation_id: str | None = None) -> Callable[[Event], bool]:
    """Matches events of a type (and, when given, about one operation)."""

    def match(event: Event) -> bool:
        return event.type == kind and (operation_id is None or event.operation.id == operation_id)

    return match


def at_revision(revision: int) -> Callable[[Event], bool]:
    """Matches the first event that shows the stream reached `revision`."""

    def match(event: Event) -> bool:
        return event.revision >= revision and event.type != RESET

    return match


def is_terminal(operation_id: str) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        return (
            event.type in (SNAPSHOT, CHANGED)
            and event.operation.id == operation_id
            and event.operation.state in TERMINAL_STATES
        )

    return match
