"""One client, many operations: the handles' reports share BatchUpdateOperations calls.

Black-box against the real server on a real socket; an interceptor counts the
report calls per method, records what each batch carried, can lose a committed
batch's reply, and can hide methods (UNIMPLEMENTED) to exercise the fallbacks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import (
    AsyncHeadwayClient,
    FailedPrecondition,
    HeadwayClient,
    InvalidArgument,
    OperationCancelled,
)

SERVICE = "/headway.v1.ProgressTracker/"
BATCH = SERVICE + "BatchUpdateOperations"
STREAM = SERVICE + "ReportProgress"
UNARY = SERVICE + "UpdateOperation"
REPORT_METHODS = (BATCH, STREAM, UNARY)


class ReportCalls(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts report calls by method and records each batch as (operation_id, sequence) pairs."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.batches: list[list[tuple[str, int]]] = []
        self.hidden: set[str] = set()
        self.lose_batch_replies = 0  # commit, then answer UNAVAILABLE

    def report_calls(self) -> dict[str, int]:
        return {method.rsplit("/", 1)[1]: self.calls[method] for method in REPORT_METHODS}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method in self.hidden:
            return None  # as if the server predates the method: UNIMPLEMENTED
        if details.method in REPORT_METHODS:
            self.calls[details.method] += 1
        handler = await continuation(details)
        if handler is None or details.method != BATCH:
            return handler
        inner = handler.unary_unary

        async def batch(request: pb.BatchUpdateOperationsRequest, context: Any) -> Any:
            self.batches.append([(u.operation_id, u.sequence) for u in request.updates])
            response = await inner(request, context)
            if self.lose_batch_replies > 0:
                self.lose_batch_replies -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: reply lost")
            return response

        return grpc.unary_unary_rpc_method_handler(
            batch,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@pytest.fixture
def calls() -> ReportCalls:
    return ReportCalls()


@pytest.fixture
def server(server_factory: Callable[..., Any], calls: ReportCalls) -> Any:
    return server_factory(interceptors=[calls])


@pytest.fixture
def client(server: Any) -> Iterator[HeadwayClient]:
    with HeadwayClient(server.address, timeout=5) as client:
        yield client


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


HANDLES, ROUNDS = 200, 30


def expected_stages(stored: pb.Operation) -> list[tuple[str, int, int, int]]:
    return [(s.name, s.state, s.completed, s.total) for s in stored.stages]


def check_final_states(operations: list[pb.Operation]) -> None:
    assert len(operations) == HANDLES
    for stored in operations:
        assert stored.state == pb.Operation.SUCCEEDED, stored.id
        assert stored.last_sequence > 0
        assert stored.completed == ROUNDS + 1
        assert dict(stored.counters) == {"rows": ROUNDS * 2}
        # Every stage entered reached the server, with the progress made within it.
        assert expected_stages(stored) == [
            ("fetch", pb.Stage.DONE, 1, 1),
            ("index", pb.Stage.DONE, ROUNDS, ROUNDS),
        ]
        assert stored.checkpoint == f"row-{ROUNDS}"


def check_few_batch_calls(calls: ReportCalls, elapsed: float) -> None:
    """While HANDLES operations advanced for `elapsed` seconds (no flush): one call per
    paced round (every 0.1 s at most), carrying at most one report per operation
    (plus, once, the segment of the stage each left)."""
    counts = calls.report_calls()
    assert counts["ReportProgress"] == counts["UpdateOperation"] == 0, counts
    rounds = counts["BatchUpdateOperations"]
    assert 0 < rounds <= elapsed / 0.1 + 2, f"{counts} in {elapsed:.2f} s"
    assert max(len(batch) for batch in calls.batches) >= HANDLES // 2, "not batched"
    sent = sum(len(batch) for batch in calls.batches)
    assert sent <= (rounds + 1) * HANDLES, f"{sent} reports in {rounds} rounds: not coalesced"


def advance_all(handles: list[Any], i: int) -> None:
    for op in handles:
        op.advance(1)
        op.update(counters={"rows": 2}, checkpoint=f"row-{i}")


def test_many_handles_share_few_batch_calls_and_end_exact(client, calls):
    handles = [
        client.start(kind="shard", project="many", total=ROUNDS + 1, stages=["fetch", "index"])
        for _ in range(HANDLES)
    ]
    started = time.monotonic()
    for op in handles:
        op.stage("fetch", total=1)
        op.advance(1)
        op.stage("index", total=ROUNDS)
    for i in range(1, ROUNDS + 1):
        advance_all(handles, i)
        time.sleep(0.01)
    check_few_batch_calls(calls, time.monotonic() - started)
    for op in handles:
        op.complete()

    check_final_states(client.list(project="many"))
    assert calls.report_calls()["UpdateOperation"] == 0
    assert all(0 < op.rpcs < ROUNDS for op in handles)


def test_operations_started_at_different_times_fall_into_step(client, calls):
    # A crawler starting pages as it goes: each new operation joins the next
    # round instead of going out on a schedule of its own.
    handles: list[Any] = []
    started = time.monotonic()
    for _ in range(40):
        handles.append(client.start(kind="page", project="staggered"))
        for op in handles:
            op.advance(1)
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    rounds = calls.report_calls()["BatchUpdateOperations"]
    assert 0 < rounds <= elapsed / 0.1 + 2, f"{rounds} calls in {elapsed:.2f} s"
    for op in handles:
        op.complete()
    stored = client.list(project="staggered")
    assert sorted(s.completed for s in stored) == list(range(1, 41))


def in_step(client: HeadwayClient, project: str, n: int, **options: Any) -> list[Any]:
    """A pacer handle and n fresh ones whose next reports share one round: a paced round
    has just gone out, and fresh handles are all due at the next one."""
    pacer = client.start(kind="pace", project=project, min_interval=0.5)
    pacer.advance(1)
    wait_until(lambda: pacer.rpcs == 1)
    return [pacer] + [client.start(project=project, min_interval=0.5, **options) for _ in range(n)]


def test_a_rejected_report_reaches_only_its_handle(client, calls):
    pacer, good, bad, other = in_step(client, "reject", 3, kind="k", total=5)
    good.advance(2)
    bad.update(completed=9, counters={"rows": 1})  # completed above total: rejected
    other.update(completed=3, counters={"rows": 4})
    wait_until(lambda: any(bad.id in dict(batch) for batch in calls.batches))
    [shared] = [batch for batch in calls.batches if bad.id in dict(batch)]
    assert {op_id for op_id, _ in shared} == {good.id, bad.id, other.id}

    good.flush(timeout=5)
    other.flush(timeout=5)
    with pytest.raises(InvalidArgument, match="completed"):
        bad.flush(timeout=5)
    bad.update(completed=5)  # the producer goes on after hearing of the rejection
    for op in (pacer, good, bad, other):
        op.complete()
    stored = {op.id: client.get(op.id) for op in (good, bad, other)}
    assert (stored[good.id].completed, dict(stored[good.id].counters)) == (2, {})
    assert (stored[bad.id].completed, dict(stored[bad.id].counters)) == (5, {})
    assert (stored[other.id].completed, dict(stored[other.id].counters)) == (3, {"rows": 4})
    assert all(s.state == pb.Operation.SUCCEEDED for s in stored.values())


def test_a_batch_committed_then_lost_is_retried_without_double_counting(client, calls):
    pacer, *ops = in_step(client, "lost", 3, kind="retry")
    before = len(calls.batches)
    calls.lose_batch_replies = 1
    for op in ops:
        op.update(counters={"pages": 5}, completed=5)
    wait_until(lambda: all(op.rpcs == 1 for op in ops), timeout=10)
    resent = calls.batches[before:]
    assert len(resent) == 2 and resent[0] == resent[1], resent  # the same reports, resent
    assert {op_id for op_id, _ in resent[0]} == {op.id for op in ops}
    for op in ops:
        op.complete()
        stored = client.get(op.id)
        assert dict(stored.counters) == {"pages": 5}
        assert (stored.completed, stored.last_sequence) == (5, 1)
    pacer.complete()


def test_more_than_a_thousand_reports_are_split_across_calls(client, calls):
    # Each handle's first report goes out at the next round and its next one
    # only min_interval later, all of them together (handles fall into step):
    # whenever the sender ran during the loops, some round carries over 1,000.
    handles = [client.start(kind="wide", project="split", min_interval=2.0) for _ in range(1100)]
    for op in handles:
        op.advance(1)
    for op in handles:
        op.update(counters={"rows": 1})
    # No flush: each would send its handle at once, alone.
    wait_until(lambda: all(op._state.idle for op in handles), timeout=30)
    assert max(len(batch) for batch in calls.batches) == 1000
    assert sum(len(batch) for batch in calls.batches) >= 1100
    for op in handles:
        op.complete()
    stored = client.list(project="split")
    assert len(stored) == 1100
    assert all((s.completed, dict(s.counters)) == (1, {"rows": 1}) for s in stored)


def test_cancel_requested_reaches_only_the_cancelled_handle(client):
    ops = [client.start(kind="c", project="cancels", raise_on_cancel=True) for _ in range(3)]
    for op in ops:
        op.advance(1)
        op.flush(timeout=5)
    client.cancel(ops[1].id, reason="stop this one")
    for op in ops:
        op.advance(1)
        op.flush(timeout=5)
    assert [op.cancel_requested for op in ops] == [False, True, False]
    with pytest.raises(OperationCancelled):
        ops[1].advance(1)
    ops[1].fail(pb.OperationError(code="CANCELLED"))
    ops[0].complete()
    ops[2].complete()
    states = [client.get(op.id).state for op in ops]
    assert states == [pb.Operation.SUCCEEDED, pb.Operation.CANCELLED, pb.Operation.SUCCEEDED]


@pytest.mark.parametrize(
    ("hidden", "route"),
    [({BATCH}, "ReportProgress"), ({BATCH, STREAM}, "UpdateOperation")],
    ids=["to-stream", "to-unary"],
)
def test_falls_back_when_the_server_lacks_batch_updates(client, calls, hidden, route):
    calls.hidden = hidden
    ops = [client.start(kind="old", project="fallback", total=10) for _ in range(5)]
    for _ in range(10):
        for op in ops:
            op.advance(1)
            op.update(counters={"rows": 1})
    for op in ops:
        op.flush(timeout=10)
    ops[0].update(completed=11)  # rejected: still reaches its handle on the fallback route
    with pytest.raises(InvalidArgument, match="completed"):
        ops[0].flush(timeout=10)
    for op in ops:
        op.complete()
    counts = calls.report_calls()
    assert counts[route] > 0, counts
    if route == "ReportProgress":
        assert counts["UpdateOperation"] == 0, counts
    for op in ops:
        stored = client.get(op.id)
        assert (stored.state, stored.completed) == (pb.Operation.SUCCEEDED, 10)
        assert dict(stored.counters) == {"rows": 10}


def test_closing_the_client_fails_unsent_reports(server):
    client = HeadwayClient(server.address, timeout=5)
    op = client.start(kind="k", project="closed", min_interval=60)
    op.advance(1)
    wait_until(lambda: op.rpcs == 1)
    op.advance(1)  # the second waits for its interval
    client.close()
    with pytest.raises(FailedPrecondition, match="closed"):
        op.advance(1)


# The asyncio client: the same behaviour through one task per client.


async def test_async_many_handles_share_few_batch_calls_and_end_exact(server, calls):
    async with AsyncHeadwayClient(server.address, timeout=5) as client:
        handles = [
            await client.start(
                kind="shard", project="many", total=ROUNDS + 1, stages=["fetch", "index"]
            )
            for _ in range(HANDLES)
        ]
        started = time.monotonic()
        for op in handles:
            op.stage("fetch", total=1)
            op.advance(1)
            op.stage("index", total=ROUNDS)
        for i in range(1, ROUNDS + 1):
            advance_all(handles, i)
            await asyncio.sleep(0.01)
        check_few_batch_calls(calls, time.monotonic() - started)
        for op in handles:
            await op.complete()
        check_final_states(await client.list(project="many"))
    assert calls.report_calls()["UpdateOperation"] == 0


async def test_async_rejected_report_and_lost_reply(server, calls):
    async with AsyncHeadwayClient(server.address, timeout=5) as client:
        ops = [await client.start(kind="k", project="aio-mixed", total=5) for _ in range(3)]
        before = len(calls.batches)
        calls.lose_batch_replies = 1
        # No await in between: all three go in the sender's next round.
        ops[0].update(completed=2, counters={"rows": 3})
        ops[1].update(completed=9, counters={"rows": 1})  # rejected
        ops[2].update(completed=4, counters={"rows": 5})
        await asyncio.wait_for(ops[0].flush(), 10)
        with pytest.raises(InvalidArgument, match="completed"):
            await asyncio.wait_for(ops[1].flush(), 10)
        await asyncio.wait_for(ops[2].flush(), 10)
        sent = calls.batches[before:]
        assert len(sent) == 2 and sent[0] == sent[1] and len(sent[0]) == 3, sent
        for op in ops:
            await op.complete()
        stored = [await client.get(op.id) for op in ops]
    assert [(s.completed, dict(s.counters)) for s in stored] == [
        (2, {"rows": 3}),
        (0, {}),
        (4, {"rows": 5}),
    ]
    assert all(s.state == pb.Operation.SUCCEEDED for s in stored)


@pytest.mark.parametrize(
    ("hidden", "route"),
    [({BATCH}, "ReportProgress"), ({BATCH, STREAM}, "UpdateOperation")],
    ids=["to-stream", "to-unary"],
)
async def test_async_falls_back_when_the_server_lacks_batch_updates(server, calls, hidden, route):
    calls.hidden = hidden
    async with AsyncHeadwayClient(server.address, timeout=5) as client:
        ops = [await client.start(kind="old", project="afallback", total=10) for _ in range(5)]
        for _ in range(10):
            for op in ops:
                op.advance(1)
                op.update(counters={"rows": 1})
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*(op.flush() for op in ops)), 10)
        ops[0].update(completed=11)
        with pytest.raises(InvalidArgument, match="completed"):
            await asyncio.wait_for(ops[0].flush(), 10)
        for op in ops:
            await asyncio.wait_for(op.complete(), 10)
        stored = [await client.get(op.id) for op in ops]
    counts = calls.report_calls()
    assert counts[route] > 0, counts
    if route == "ReportProgress":
        assert counts["UpdateOperation"] == 0, counts
    assert all((s.state, s.completed) == (pb.Operation.SUCCEEDED, 10) for s in stored)
    assert all(dict(s.counters) == {"rows": 10} for s in stored)


async def test_async_cancel_requested_reaches_only_the_cancelled_handle(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        ops = [
            await client.start(kind="c", project="acancels", raise_on_cancel=True) for _ in range(3)
        ]
        for op in ops:
            op.advance(1)
        await asyncio.wait_for(asyncio.gather(*(op.flush() for op in ops)), 5)
        await client.cancel(ops[1].id)
        for op in ops:
            op.advance(1)
        await asyncio.wait_for(asyncio.gather(*(op.flush() for op in ops)), 5)
        assert [op.cancel_requested for op in ops] == [False, True, False]
        with pytest.raises(OperationCancelled):
            async with ops[1]:
                ops[1].advance(1)
        await ops[0].complete()
        await ops[2].complete()
        states = [(await client.get(op.id)).state for op in ops]
    assert states == [pb.Operation.SUCCEEDED, pb.Operation.CANCELLED, pb.Operation.SUCCEEDED]
