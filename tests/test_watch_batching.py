"""A watcher that is behind gets many operations' latest states in one WatchOperationsResponse."""

from __future__ import annotations

from typing import Any

from headway.v1 import progress_pb2 as pb
from headway_server.domain.model import StartSpec, Update


def test_changes_made_while_a_watcher_waits_arrive_in_one_message(grpc_server, grpc_stub, record):
    stream = record(
        grpc_stub.WatchOperations(
            pb.WatchOperationsRequest(filter=pb.OperationFilter(project="batch"))
        )
    )
    [synced] = stream.next().events
    assert synced.type == pb.OperationEvent.SYNCED
    service: Any = grpc_server.server.service

    async def burst() -> list[str]:
        # The in-memory store never yields to the event loop, so the watcher's
        # task runs only after all of these changes: it is 100 changes behind.
        ids = []
        for i in range(50):
            op = await service.start(StartSpec(kind="k", project="batch", total=10))
            await service.update(op.id, Update(sequence=1, completed=i % 10))
            ids.append(op.id)
        return ids

    ids = grpc_server.run(burst())
    events = list(stream.next().events)
    # One message, one event per operation (its latest state), in revision order.
    assert [e.operation.id for e in events] == ids
    assert all(e.type == pb.OperationEvent.CHANGED for e in events)
    assert all(e.operation.state == pb.Operation.RUNNING for e in events)
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions)
