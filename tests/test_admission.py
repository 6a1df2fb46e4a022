"""Many Watch streams opened at once are all admitted (grpc.server.max_pending_requests)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

STREAMS = 1000


async def _synced(stub: Any, project: str) -> int:
    call = stub.WatchOperations(
        pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project)), timeout=30
    )
    try:
        async for response in call:
            for event in response.events:
                if event.type == pb.OperationEvent.SYNCED:
                    return int(event.revision)
        raise AssertionError("stream ended before SYNCED")
    finally:
        call.cancel()


async def test_a_thousand_watch_streams_opened_at_once_all_sync(grpc_server):
    async with grpc.aio.insecure_channel(grpc_server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        await stub.StartOperation(pb.StartOperationRequest(operation_id="admit-1", project="admit"))
        results: list[Any] = await asyncio.wait_for(
            asyncio.gather(
                *(_synced(stub, "admit") for _ in range(STREAMS)), return_exceptions=True
            ),
            timeout=50,
        )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {STREAMS} streams failed, first: {failures[0]!r}"
    assert all(revision >= 1 for revision in results)
