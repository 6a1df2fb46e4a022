"""NOT_FOUND tells "deleted" from "never seen", so a producer re-registers only the latter.

A producer whose server restarted with an empty store registers its operation again;
one whose operation was deliberately deleted must leave it deleted. The status stays
NOT_FOUND either way; UpdateOperation marks a deletion with the trailing metadata
`headway-deleted: true`, ReportProgress and BatchUpdateOperations acks with `deleted`.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway_server import servicer
from headway_server.domain import errors

Stub = Any


def deleted_operation(stub: Stub) -> str:
    op = stub.StartOperation(pb.StartOperationRequest(kind="k", project="tomb"), timeout=5)
    stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=op.id), timeout=5)
    return str(op.id)


def never_seen() -> str:
    return f"never-{uuid.uuid4().hex}"


def update(operation_id: str) -> pb.UpdateOperationRequest:
    return pb.UpdateOperationRequest(operation_id=operation_id, sequence=1, completed=1)


def marker(error: Any) -> list[str]:
    trailing = error.trailing_metadata() or ()
    return [value for key, value in trailing if key == servicer.DELETED_KEY]


def test_update_of_a_deleted_operation_is_not_found_marked_deleted(grpc_stub: Stub) -> None:
    with pytest.raises(grpc.RpcError) as deleted:
        grpc_stub.UpdateOperation(update(deleted_operation(grpc_stub)), timeout=5)
    assert deleted.value.code() == grpc.StatusCode.NOT_FOUND
    assert marker(deleted.value) == ["true"]
    with pytest.raises(grpc.RpcError) as unknown:
        grpc_stub.UpdateOperation(update(never_seen()), timeout=5)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert marker(unknown.value) == []


def test_complete_of_a_deleted_operation_is_marked_too(grpc_stub: Stub) -> None:
    request = pb.CompleteOperationRequest(operation_id=deleted_operation(grpc_stub))
    with pytest.raises(grpc.RpcError) as deleted:
        grpc_stub.CompleteOperation(request, timeout=5)
    assert deleted.value.code() == grpc.StatusCode.NOT_FOUND
    assert marker(deleted.value) == ["true"]


def test_batch_acks_tell_deleted_from_never_seen(grpc_stub: Stub) -> None:
    live = grpc_stub.StartOperation(pb.StartOperationRequest(kind="k", project="tomb"), timeout=5)
    gone, unknown = deleted_operation(grpc_stub), never_seen()
    response = grpc_stub.BatchUpdateOperations(
        pb.BatchUpdateOperationsRequest(updates=[update(gone), update(unknown), update(live.id)]),
        timeout=5,
    )
    codes = [(r.error_code, r.deleted) for r in response.results]
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert codes == [(not_found, True), (not_found, False), (0, False)]


def test_report_progress_acks_tell_deleted_from_never_seen(grpc_stub: Stub) -> None:
    gone, unknown = deleted_operation(grpc_stub), never_seen()
    acks = list(grpc_stub.ReportProgress(iter([update(gone), update(unknown)]), timeout=5))
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    assert [(a.error_code, a.deleted) for a in acks] == [(not_found, True), (not_found, False)]


def test_deleted_maps_as_not_found_along_the_class_hierarchy() -> None:
    assert issubclass(errors.Deleted, errors.NotFound)
    assert servicer.status_of(errors.Deleted("gone")) == grpc.StatusCode.NOT_FOUND


def test_a_child_of_a_deleted_parent_is_not_found_marked_deleted(grpc_stub: Stub) -> None:
    def start_child(parent_id: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            grpc_stub.StartOperation(
                pb.StartOperationRequest(kind="k", project="tomb", parent_id=parent_id),
                timeout=5,
            )
        return info.value

    deleted = start_child(deleted_operation(grpc_stub))
    assert deleted.code() == grpc.StatusCode.NOT_FOUND
    assert "parent_id" in (deleted.details() or "")
    assert marker(deleted) == ["true"]
    unknown = start_child(never_seen())
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert marker(unknown) == []
