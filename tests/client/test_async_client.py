"""AsyncHeadwayClient end to end: the asyncio producer handle and watch."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import AsyncHeadwayClient, InvalidArgument, OperationNotFound
from headway_server.domain.model import Operation, StartSpec
from headway_server.store.memory import MemoryStore


async def test_async_producer_reports_coalesced_and_completes(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        async with await client.start(kind="async", project="aio", total=5000) as op:
            for _ in range(5000):
                op.advance(1)
            op.update(counters={"rows": 7})
            await op.flush()
            assert op.rpcs < 50
        stored = await client.get(op.id)
    assert stored.state == pb.Operation.SUCCEEDED
    assert stored.completed == 5000
    assert dict(stored.counters) == {"rows": 7}


async def test_async_context_manager_fails_on_exception(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        with pytest.raises(RuntimeError, match="disk full"):
            async with await client.start(kind="async", project="aio") as op:
                op.advance(3)
                raise RuntimeError("disk full")
        stored = await client.get(op.id)
        with pytest.raises(OperationNotFound):
            await client.get("never-started")
    assert stored.state == pb.Operation.FAILED
    assert (stored.error.code, stored.completed) == ("RuntimeError", 3)


async def test_async_watch_sees_the_operation_to_its_end(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        op = await client.start(kind="async", project="aio-watch", total=3, min_interval=0)

        async def produce() -> None:
            for _ in range(3):
                op.advance(1)
                await op.flush()
            await op.complete()

        async def watch() -> list[pb.OperationEvent]:
            return [event async for event in client.watch(op.id)]

        events, _ = await asyncio.wait_for(asyncio.gather(watch(), produce()), timeout=10)
    assert events[0].type == pb.OperationEvent.SNAPSHOT
    assert events[-1].operation.state == pb.Operation.SUCCEEDED
    assert events[-1].operation.completed == 3


class CountUnaryUpdates(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method == "/headway.v1.ProgressTracker/UpdateOperation":
            self.calls += 1
        return await continuation(details)


async def test_async_handle_reports_over_the_stream_and_surfaces_rejections(server_factory):
    counter = CountUnaryUpdates()
    server = server_factory(interceptors=[counter])
    async with AsyncHeadwayClient(server.address, timeout=5) as client:
        op = await client.start(kind="async", project="aio-stream", total=10, min_interval=0)
        op.advance(4)
        await op.flush()
        op.update(completed=11)
        with pytest.raises(InvalidArgument, match="completed"):
            await op.flush()
        await op.complete()
        stored = await client.get(op.id)
    assert (stored.completed, stored.state) == (4, pb.Operation.SUCCEEDED)
    assert counter.calls == 0 and op.rpcs >= 1


async def test_async_track_reports_sync_and_async_iterables(grpc_server):
    async def rows(n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        listed = [item async for item in client.track(list(range(25)), project="atrack")]
        streamed = [item async for item in client.track(rows(7), total=7, project="atrack2")]
        [from_list] = await client.list(project="atrack")
        [from_stream] = await client.list(project="atrack2")
    assert listed == list(range(25))
    assert streamed == list(range(7))
    assert (from_list.completed, from_list.total, from_list.state) == (
        25,
        25,
        pb.Operation.SUCCEEDED,
    )
    assert (from_stream.completed, from_stream.total, from_stream.state) == (
        7,
        7,
        pb.Operation.SUCCEEDED,
    )


async def test_async_track_fails_the_operation_when_the_loop_raises(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in client.track([1, 2, 3], project="atrack-fail"):
                raise RuntimeError("boom")
        # The abandoned generator is closed by the event loop's finalizer.
        for _ in range(100):
            [stored] = await client.list(project="atrack-fail")
            if stored.state != pb.Operation.RUNNING and stored.state != pb.Operation.QUEUED:
                break
            await asyncio.sleep(0.05)
    assert stored.state == pb.Operation.FAILED


async def test_async_watch_resumes_with_the_epoch_and_starts_over_on_a_restarted_memory_server(
    server_factory,
):
    server = server_factory()
    async with AsyncHeadwayClient(server.address, timeout=5) as client:
        for _ in range(5):
            await client.stub.StartOperation(pb.StartOperationRequest(kind="k", project="other"))
        op = await client.stub.StartOperation(
            pb.StartOperationRequest(operation_id="kept-id", kind="k", project="epoch")
        )
        events = client.watch(op.id)
        snapshot = await asyncio.wait_for(anext(events), 5)
        assert (snapshot.type, snapshot.revision) == (pb.OperationEvent.SNAPSHOT, op.revision)
        assert snapshot.epoch

        async def fresh_store() -> MemoryStore:
            # A new process's store, where the producer registered its operation
            # again (revision 1) and other work moved past the client's revision.
            store = MemoryStore()
            await store.create(Operation(id=op.id, spec=StartSpec(kind="k", project="epoch")))
            while await store.revision() < op.revision:
                await store.create(
                    Operation(id=f"other-{await store.revision()}", spec=StartSpec())
                )
            return store

        await asyncio.to_thread(lambda: server.restart(store=server.run(fresh_store())))
        reset = await asyncio.wait_for(anext(events), 10)
        again = await asyncio.wait_for(anext(events), 5)
        await events.aclose()  # type: ignore[attr-defined]
    assert (reset.type, again.type, again.revision) == (
        pb.OperationEvent.RESET,
        pb.OperationEvent.SNAPSHOT,
        1,
    )
    assert reset.epoch and reset.epoch != snapshot.epoch
