"""Watch pacing: slow watchers stay fresh, with default settings and a stock grpc client.

The scenario that used to fail: a consumer that takes 50 ms per message follows
a project while 40 operations report 60 times each within about 2 s. grpc's
client library accepted megabytes on its behalf, so it read every superseded
state and saw the final ones minutes after the producers had finished.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import duration_pb2
from headway.v1 import progress_pb2 as pb

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc

OPERATIONS = 40
REPORTS = 60
PRODUCE_FOR = 2.0
DEFAULT_INTERVAL = 0.1  # the server default, --watch-min-interval
# Scheduling noise on a busy 2-core machine, on top of what the guarantee allows.
SLACK = 1.5


@dataclasses.dataclass
class Reader:
    """One WatchOperations consumer: how long it takes per message, what it saw."""

    name: str
    per_message: float
    min_interval: float | None = None  # None: the server's default
    events: list[wc.Event] = dataclasses.field(default_factory=list)
    messages: int = 0
    caught_up_at: float | None = None  # when every operation's terminal state had arrived
    error: BaseException | None = None


def read(reader: Reader, address: str, project: str, ids: set[str], deadline: float) -> None:
    ended: set[str] = set()
    with wc.open_stub(address) as stub:
        request = pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project))
        if reader.min_interval is not None:
            request.min_interval.FromNanoseconds(int(reader.min_interval * 1e9))
        call = stub.WatchOperations(request, timeout=deadline - time.monotonic())
        try:
            for message in call:
                reader.events.extend(message.events)
                reader.messages += 1
                for event in message.events:
                    if event.operation.state in wc.TERMINAL_STATES:
                        ended.add(event.operation.id)
                if ended >= ids:
                    reader.caught_up_at = time.monotonic()
                    return
                time.sleep(reader.per_message)  # rendering, I/O: the consumer's own work
        except grpc.RpcError as exc:
            reader.error = exc
        finally:
            call.cancel()


@pytest.mark.timeout(60)
def test_slow_watchers_get_the_final_states_promptly(server_factory: Any) -> None:
    server = server_factory()  # default pacing
    project = wc.unique("pace")
    ids = [f"op-{i}" for i in range(OPERATIONS)]
    readers = [
        Reader("fast", 0.0),
        Reader("slow-50ms-a", 0.05),
        Reader("slow-50ms-b", 0.05),
        # Slower than the default interval: it asks for pacing of its own (README).
        Reader("slow-250ms-own-interval", 0.25, min_interval=0.3),
        Reader("every-state", 0.0, min_interval=0),
    ]
    with wc.open_stub(server.address) as producer:
        for operation_id in ids:
            producer.StartOperation(
                pb.StartOperationRequest(
                    operation_id=operation_id, kind="upload", project=project, total=REPORTS
                ),
                timeout=5,
            )
        deadline = time.monotonic() + 50
        threads = [
            threading.Thread(target=read, args=(r, server.address, project, set(ids), deadline))
            for r in readers
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.3)  # everyone past the snapshot

        # 2,400 changes in about 2 s, each its own UpdateOperation call, from 4
        # producers of 10 operations each.
        def produce(mine: list[str]) -> None:
            padding = "x" * 300  # a realistic message field, so that states are not tiny
            with wc.open_stub(server.address) as stub:
                began = time.monotonic()
                for step in range(1, REPORTS + 1):
                    for operation_id in mine:
                        response = stub.UpdateOperation(
                            pb.UpdateOperationRequest(
                                operation_id=operation_id,
                                sequence=step,
                                completed=step,
                                message=f"file {step} {padding}",
                                counters={"bytes": 1000},
                            ),
                            timeout=5,
                        )
                        assert response.applied
                    time.sleep(max(0.0, began + step * PRODUCE_FOR / REPORTS - time.monotonic()))

        producers = [threading.Thread(target=produce, args=(ids[i::4],)) for i in range(4)]
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join(timeout=30)
        assert not any(thread.is_alive() for thread in producers)
        for operation_id in ids:
            producer.CompleteOperation(
                pb.CompleteOperationRequest(operation_id=operation_id, message="done"), timeout=5
            )
        finished = time.monotonic()

        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for reader in readers:
            assert reader.error is None, f"{reader.name}: {reader.error!r}"
            assert reader.caught_up_at is not None, (
                f"{reader.name} had not received every final state {deadline - finished:.0f}s"
                f" after the producers finished ({reader.messages} messages read)"
            )
            interval = DEFAULT_INTERVAL if reader.min_interval is None else reader.min_interval
            lag = reader.caught_up_at - finished
            allowed = reader.per_message + interval + SLACK
            assert lag <= allowed, (
                f"{reader.name}: final states {lag:.2f}s after the producers finished"
                f" (allowed {allowed:.2f}s; {reader.messages} messages read)"
            )
            # The rest of the watch guarantees hold on every stream.
            wc.check_revisions(reader.events)
            latest = wc.latest_states(reader.events)
            assert set(latest) == set(ids), reader.name
            wc.assert_matches_store(producer, latest, reader.name)

    by_name = {r.name: r for r in readers}
    # Paced readers were sent about one message per interval, not one per change.
    assert by_name["slow-50ms-a"].messages < REPORTS * OPERATIONS / 10
    # A watcher that asked for every state was not paced.
    assert by_name["every-state"].messages > by_name["fast"].messages


def watch_one(stub: Any, operation_id: str, **fields: Any) -> Any:
    return stub.WatchOperation(pb.WatchOperationRequest(operation_id=operation_id, **fields))


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("min_interval", duration_pb2.Duration(seconds=-1), "non-negative"),
        ("min_interval", duration_pb2.Duration(nanos=-5), "non-negative"),
        ("min_interval", duration_pb2.Duration(seconds=61), "at most 60s"),
    ],
)
@pytest.mark.parametrize("single", [True, False], ids=["WatchOperation", "WatchOperations"])
def test_invalid_min_interval_is_rejected_naming_the_field(
    grpc_stub: Any, single: bool, field: str, value: Any, fragment: str
) -> None:
    op = grpc_stub.StartOperation(pb.StartOperationRequest(kind="k", project="p"), timeout=5)
    if single:
        call = grpc_stub.WatchOperation(
            pb.WatchOperationRequest(operation_id=op.id, **{field: value}), timeout=5
        )
    else:
        call = grpc_stub.WatchOperations(pb.WatchOperationsRequest(**{field: value}), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "") and fragment in (info.value.details() or "")


@pytest.mark.parametrize(
    ("min_interval", "at_most"), [(0.5, 4), (None, 15)], ids=["own-0.5s", "default"]
)
def test_a_single_operation_watch_sends_at_most_one_change_per_interval(
    grpc_stub: Any, min_interval: float | None, at_most: int
) -> None:
    op = grpc_stub.StartOperation(
        pb.StartOperationRequest(kind="k", project="p", total=1000), timeout=5
    )
    request = pb.WatchOperationRequest(operation_id=op.id)
    if min_interval is not None:
        request.min_interval.FromNanoseconds(int(min_interval * 1e9))
    call = grpc_stub.WatchOperation(request, timeout=20)
    received: list[pb.OperationEvent] = []

    def consume() -> None:
        for event in call:
            received.append(event)

    consumer = threading.Thread(target=consume)
    consumer.start()
    began = time.monotonic()
    step = 0
    while time.monotonic() - began < 1.2:  # reports every 5 ms for ~1.2 s
        step += 1
        grpc_stub.UpdateOperation(
            pb.UpdateOperationRequest(operation_id=op.id, sequence=step, completed=step),
            timeout=5,
        )
        time.sleep(0.005)
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id), timeout=5)
    consumer.join(timeout=10)
    assert not consumer.is_alive(), "the stream did not end after the terminal state"
    changes = [e for e in received if e.type == pb.OperationEvent.CHANGED]
    # About 1.2 s / interval messages, however many reports; the last one terminal and exact.
    assert 1 <= len(changes) <= at_most, [e.operation.completed for e in changes]
    assert step > 3 * at_most  # the control: far more reports than messages
    assert changes[-1].operation.state == pb.Operation.SUCCEEDED
    assert changes[-1].operation.completed == step
