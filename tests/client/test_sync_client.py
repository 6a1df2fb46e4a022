"""HeadwayClient end to end against the real server: producer handle, coalescing, retries, watch."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import (
    FailedPrecondition,
    HeadwayClient,
    InvalidArgument,
    OperationCancelled,
    OperationNotFound,
    RetryPolicy,
    Unavailable,
)
from headway_server.domain.model import Operation, StartSpec
from headway_server.store.memory import MemoryStore

UPDATE = "/headway.v1.ProgressTracker/UpdateOperation"


class UpdateFaults(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts UpdateOperation calls; can answer UNAVAILABLE after the update was applied."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_after_commit = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method != UPDATE:
            return handler
        inner = handler.unary_unary

        async def behaviour(request: Any, context: Any) -> Any:
            self.calls += 1
            response = await inner(request, context)
            if self.fail_after_commit > 0:
                self.fail_after_commit -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: reply lost")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.fixture
def faults() -> UpdateFaults:
    return UpdateFaults()


@pytest.fixture
def server(server_factory: Callable[..., Any], faults: UpdateFaults) -> Any:
    return server_factory(interceptors=[faults])


@pytest.fixture
def client(server: Any) -> Any:
    with HeadwayClient(server.address, timeout=5) as client:
        yield client


def test_context_manager_completes_with_every_unit_reported(client):
    with client.start(kind="ingest", project="cm", total=10, unit="files") as op:
        for _ in range(10):
            op.advance(1)
        op.update(counters={"issues": 3}, message="almost")
    stored = client.get(op.id)
    assert stored.state == pb.Operation.SUCCEEDED
    assert (stored.completed, stored.total, stored.unit) == (10, 10, "files")
    assert dict(stored.counters) == {"issues": 3}
    assert stored.percent == 100.0


def test_context_manager_fails_with_the_exception_and_reraises(client):
    with pytest.raises(KeyError, match="missing-file"):
        with client.start(kind="ingest", project="cm") as op:
            op.advance(2)
            raise KeyError("missing-file")
    stored = client.get(op.id)
    assert stored.state == pb.Operation.FAILED
    assert stored.error.code == "KeyError"
    assert "missing-file" in stored.error.message
    assert stored.completed == 2
    assert "Traceback" in stored.error.details["traceback"]


def test_a_million_advances_cost_a_few_rpcs_and_lose_nothing(client, faults):
    advances = 100_000
    with client.start(kind="bulk", project="coalesce", total=advances, streaming=False) as op:
        for i in range(advances):
            op.advance(1)
            if i % 1000 == 0:
                op.update(counters={"rows": 1000})
    stored = client.get(op.id)
    assert stored.completed == advances
    assert dict(stored.counters) == {"rows": 100 * 1000}
    assert stored.state == pb.Operation.SUCCEEDED
    # At most one report per min_interval (0.1 s) while the loop ran, plus the final flush.
    assert faults.calls == op.rpcs
    assert faults.calls < 200, f"{faults.calls} UpdateOperation calls for {advances} advances"


def test_reports_go_over_one_stream_by_default(client, faults):
    with client.start(kind="bulk", project="streamed", total=50_000) as op:
        for _ in range(50_000):
            op.advance(1)
        op.update(counters={"rows": 3})
    stored = client.get(op.id)
    assert (stored.completed, dict(stored.counters)) == (50_000, {"rows": 3})
    assert faults.calls == 0, "reports went through unary UpdateOperation"
    assert 0 < op.rpcs < 200


def test_a_rejected_streamed_report_reaches_the_producer(client):
    op = client.start(kind="bad", project="streamed", total=5, min_interval=0)
    op.update(completed=9)
    with pytest.raises(InvalidArgument, match="completed"):
        op.flush(timeout=5)
    op.update(completed=5)
    op.complete()
    assert client.get(op.id).completed == 5


def test_stage_changes_each_reach_the_server(client):
    with client.start(kind="index", project="stages", stages=["clone", ("embed", 3)]) as op:
        op.stage("clone", total=2)
        op.advance(2)
        op.stage("embed", total=4)
        op.advance(4)
    stored = client.get(op.id)
    assert [s.name for s in stored.stages] == ["clone", "embed"]
    assert [s.state for s in stored.stages] == [pb.Stage.DONE, pb.Stage.DONE]
    assert [(s.completed, s.total) for s in stored.stages] == [(2, 2), (4, 4)]


def test_a_reply_lost_after_commit_is_retried_without_double_counting(client, faults):
    op = client.start(kind="retry", project="faults", min_interval=0, streaming=False)
    faults.fail_after_commit = 1
    op.update(counters={"pages": 5}, completed=5)
    op.flush(timeout=10)
    stored = client.get(op.id)
    assert faults.calls == 2  # the first call committed, its reply was lost, the retry was a no-op
    assert dict(stored.counters) == {"pages": 5}
    assert stored.last_sequence == 1
    op.complete()


def test_unary_calls_retry_unavailable_and_surface_it_when_it_persists():
    # Nothing listens on this port: every attempt is UNAVAILABLE.
    with HeadwayClient(
        "127.0.0.1:9", timeout=0.5, retry=RetryPolicy(attempts=3, initial_backoff=0.01)
    ) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client.get("anything")
        assert time.monotonic() - started < 5


def test_errors_map_to_one_class_per_status(client):
    with pytest.raises(OperationNotFound) as info:
        client.get("no-such-op")
    assert isinstance(info.value.__cause__, grpc.RpcError)
    with pytest.raises(InvalidArgument, match="operation_id"):
        client.get("bad id!")
    op = client.start(kind="x", project="errors")
    op.complete()
    with pytest.raises(FailedPrecondition):
        client.fail(op.id, "too late")


def test_raise_on_cancel_stops_the_producer_and_ends_cancelled(client):
    op = client.start(kind="crawl", project="cancel", raise_on_cancel=True, min_interval=0)
    op.advance(1)
    op.flush(timeout=5)
    client.cancel(op.id, reason="user pressed stop")
    with pytest.raises(OperationCancelled):
        with op:
            for _ in range(1000):
                op.advance(1)
                op.flush(timeout=5)
    stored = client.get(op.id)
    assert stored.state == pb.Operation.CANCELLED
    assert op.cancel_requested


def test_track_reports_like_tqdm(client):
    items = list(range(25))
    seen = list(client.track(items, kind="track", project="track-proj"))
    assert seen == items
    [stored] = client.list(project="track-proj")
    assert (stored.completed, stored.total, stored.state) == (25, 25, pb.Operation.SUCCEEDED)


def test_watch_resumes_across_a_server_restart_without_duplicates_or_gaps(server, client):
    op = client.start(kind="watch", project="restart", total=100, min_interval=0)
    events: list[pb.OperationEvent] = []
    done = threading.Event()

    def watch() -> None:
        for event in client.watch(op.id):
            events.append(event)
        done.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    for i in range(1, 51):
        op.update(completed=i)
        op.flush(timeout=5)
    server.restart()  # same port, same store: the watcher reconnects and resumes
    for i in range(51, 101):
        op.update(completed=i)
        op.flush(timeout=10)
    op.complete()
    assert done.wait(15), "watch did not end after the operation completed"
    revisions = [e.revision for e in events if e.operation.id]
    assert revisions == sorted(set(revisions)), "duplicate or out-of-order events"
    completed = [e.operation.completed for e in events if e.operation.id]
    assert completed == sorted(completed)
    assert events[-1].operation.state == pb.Operation.SUCCEEDED
    assert events[-1].operation.completed == 100


def test_watch_operations_follows_a_project(client):
    stream = client.watch_operations(project="follow")
    first = next(stream)
    assert first.type == pb.OperationEvent.SYNCED
    op = client.start(kind="k", project="follow", min_interval=0)
    states = []
    for event in stream:
        if event.operation.id == op.id:
            states.append(event.operation.state)
            # Watches are paced: a state superseded within one interval may be
            # skipped, so complete only once the QUEUED one has been seen.
            if event.operation.state == pb.Operation.QUEUED:
                op.complete()
        if pb.Operation.SUCCEEDED in states:
            break
    stream.close()
    assert states[0] == pb.Operation.QUEUED and states[-1] == pb.Operation.SUCCEEDED


def read_in_thread(
    events: Generator[pb.OperationEvent, None, None], count: int
) -> Callable[[], pb.OperationEvent]:
    """Reads `count` events of a watch in a thread, then closes it; returns a
    read that waits at most 10 s for the next of them."""
    got: queue.Queue[pb.OperationEvent] = queue.Queue()

    def pump() -> None:
        for event in itertools.islice(events, count):
            got.put(event)
        events.close()

    threading.Thread(target=pump, daemon=True).start()
    return lambda: got.get(timeout=10)


async def a_fresh_store(project: str, at_least: int) -> MemoryStore:
    """A new process's store: one operation of `project`, then other work up to
    revision `at_least`, so revisions from before are no longer ahead of it."""
    store = MemoryStore()
    await store.create(Operation(id="after-restart", spec=StartSpec(kind="k", project=project)))
    while await store.revision() < at_least:
        await store.create(Operation(id=f"other-{await store.revision()}", spec=StartSpec()))
    return store


def test_watch_resumes_with_the_epoch_and_starts_over_on_a_restarted_memory_server(server, client):
    client.start(kind="k", project="epoch", min_interval=0).complete()
    for _ in range(5):
        client.start(kind="k", project="elsewhere", min_interval=0)
    read = read_in_thread(client.watch_operations(project="epoch"), 5)
    events = [read(), read()]
    assert [e.type for e in events] == [pb.OperationEvent.SNAPSHOT, pb.OperationEvent.SYNCED]
    resume_at, old_epoch = events[1].revision, events[1].epoch
    assert old_epoch

    # The server comes back as a new process would, with an empty store that has
    # since made more changes than the client's revision: only the epoch the
    # client sends on its own tells that revision is not from here.
    server.restart(store=server.run(a_fresh_store("epoch", resume_at)))
    after = [read(), read(), read()]
    assert [(e.type, e.operation.id) for e in after] == [
        (pb.OperationEvent.RESET, ""),
        (pb.OperationEvent.SNAPSHOT, "after-restart"),
        (pb.OperationEvent.SYNCED, ""),
    ]
    assert after[0].epoch == after[2].epoch != old_epoch
