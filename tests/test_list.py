"""ListOperations: filters, paging and the response revision (README "Filters" and guarantee 5)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

State = pb.Operation.State
Stub = pb_grpc.ProgressTrackerStub


def uid(prefix: str = "op") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def start(stub: Stub, project: str, **fields: Any) -> pb.Operation:
    fields.setdefault("operation_id", uid())
    fields.setdefault("kind", "job")
    return stub.StartOperation(pb.StartOperationRequest(project=project, **fields))


def list_ids(stub: Stub, **filter_fields: Any) -> list[str]:
    """Every matching id, following page tokens."""
    return [op.id for op in list_all(stub, pb.OperationFilter(**filter_fields))]


def list_all(stub: Stub, filter_: pb.OperationFilter, page_size: int = 0) -> list[pb.Operation]:
    operations: list[pb.Operation] = []
    token = ""
    for _ in range(10_000):
        page = stub.ListOperations(
            pb.ListOperationsRequest(filter=filter_, page_size=page_size, page_token=token)
        )
        operations.extend(page.operations)
        token = page.next_page_token
        if not token:
            return operations
    raise AssertionError("paging never ended")


def rpc_error(method: Any, request: Any, code: grpc.StatusCode) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=5)
    error = cast(grpc.Call, info.value)
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    return error


def project() -> str:
    return uid("proj")


# --- Filters ------------------------------------------------------------------------------


def test_project_filter_in_creation_order(grpc_stub: Stub) -> None:
    mine, other = project(), project()
    ids = []
    for i in range(5):
        ids.append(start(grpc_stub, mine, operation_id=f"z-{uuid.uuid4().hex[:8]}-{i}").id)
        start(grpc_stub, other)
    assert list_ids(grpc_stub, project=mine) == ids


def test_empty_filter_lists_all_projects(grpc_stub: Stub) -> None:
    a = start(grpc_stub, project())
    b = start(grpc_stub, project())
    listed = list_ids(grpc_stub)
    assert a.id in listed
    assert b.id in listed
    assert listed.index(a.id) < listed.index(b.id)


def test_dataset_and_kind_filters(grpc_stub: Stub) -> None:
    p = project()
    crawl_docs = start(grpc_stub, p, kind="crawl", dataset="docs")
    crawl_blog = start(grpc_stub, p, kind="crawl", dataset="blog")
    index_docs = start(grpc_stub, p, kind="index", dataset="docs")
    assert list_ids(grpc_stub, project=p, dataset="docs") == [crawl_docs.id, index_docs.id]
    assert list_ids(grpc_stub, project=p, kind="crawl") == [crawl_docs.id, crawl_blog.id]
    assert list_ids(grpc_stub, project=p, kind="crawl", dataset="docs") == [crawl_docs.id]
    assert list_ids(grpc_stub, project=p, kind="upload") == []


def _ops_in_every_state(stub: Stub, p: str) -> dict[str, str]:
    """One operation per state; returns state name -> id."""
    queued = start(stub, p)
    running = start(stub, p)
    stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=running.id, completed=1))
    paused = start(stub, p)
    stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=paused.id, completed=1))
    stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=paused.id, paused=True))
    succeeded = start(stub, p)
    stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=succeeded.id))
    failed = start(stub, p)
    stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=failed.id, completed=1))
    stub.FailOperation(
        pb.FailOperationRequest(operation_id=failed.id, error=pb.OperationError(code="E"))
    )
    cancelled = start(stub, p)
    stub.CancelOperation(pb.CancelOperationRequest(operation_id=cancelled.id))
    return {
        "QUEUED": queued.id,
        "RUNNING": running.id,
        "PAUSED": paused.id,
        "SUCCEEDED": succeeded.id,
        "FAILED": failed.id,
        "CANCELLED": cancelled.id,
    }


def test_states_filter_matches_any_of(grpc_stub: Stub) -> None:
    p = project()
    ids = _ops_in_every_state(grpc_stub, p)
    for op in list_all(grpc_stub, pb.OperationFilter(project=p)):
        assert op.id == ids[State.Name(op.state)]
    assert list_ids(grpc_stub, project=p, states=[State.RUNNING, State.PAUSED]) == [
        ids["RUNNING"],
        ids["PAUSED"],
    ]
    assert list_ids(grpc_stub, project=p, states=[State.FAILED]) == [ids["FAILED"]]


def test_active_only(grpc_stub: Stub) -> None:
    p = project()
    ids = _ops_in_every_state(grpc_stub, p)
    assert list_ids(grpc_stub, project=p, active_only=True) == [
        ids["QUEUED"],
        ids["RUNNING"],
        ids["PAUSED"],
    ]
    # Combined with states, both must match.
    assert list_ids(
        grpc_stub, project=p, active_only=True, states=[State.PAUSED, State.SUCCEEDED]
    ) == [ids["PAUSED"]]


def test_labels_must_all_match(grpc_stub: Stub) -> None:
    p = project()
    both = start(grpc_stub, p, labels={"env": "prod", "team": "search", "extra": "1"})
    env_only = start(grpc_stub, p, labels={"env": "prod"})
    other_env = start(grpc_stub, p, labels={"env": "dev", "team": "search"})
    start(grpc_stub, p)
    assert list_ids(grpc_stub, project=p, labels={"env": "prod", "team": "search"}) == [both.id]
    assert list_ids(grpc_stub, project=p, labels={"env": "prod"}) == [both.id, env_only.id]
    assert list_ids(grpc_stub, project=p, labels={"team": "search"}) == [both.id, other_env.id]
    assert list_ids(grpc_stub, project=p, labels={"env": "staging"}) == []


def test_parent_id_filter(grpc_stub: Stub) -> None:
    p = project()
    parent = start(grpc_stub, p)
    other_parent = start(grpc_stub, p)
    children = [start(grpc_stub, p, parent_id=parent.id).id for _ in range(3)]
    start(grpc_stub, p, parent_id=other_parent.id)
    assert list_ids(grpc_stub, parent_id=parent.id) == children
    assert list_ids(grpc_stub, project=p, parent_id=parent.id) == children


def test_listed_operations_are_the_stored_ones(grpc_stub: Stub) -> None:
    p = project()
    op = start(grpc_stub, p, total=10)
    grpc_stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op.id, completed=4))
    (listed,) = list_all(grpc_stub, pb.OperationFilter(project=p))
    assert listed == grpc_stub.GetOperation(pb.GetOperationRequest(operation_id=op.id))


# --- Paging -------------------------------------------------------------------------------


def test_paging_covers_every_item_exactly_once(grpc_stub: Stub) -> None:
    p = project()
    ids = [start(grpc_stub, p).id for _ in range(7)]
    filter_ = pb.OperationFilter(project=p)
    sizes = []
    seen: list[str] = []
    token = ""
    while True:
        page = grpc_stub.ListOperations(
            pb.ListOperationsRequest(filter=filter_, page_size=3, page_token=token)
        )
        sizes.append(len(page.operations))
        seen.extend(op.id for op in page.operations)
        token = page.next_page_token
        if not token:
            break
        assert len(sizes) < 10, "paging never ended"
    assert seen == ids
    assert sizes[:2] == [3, 3]
    assert sum(sizes) == 7


def test_exact_multiple_of_page_size(grpc_stub: Stub) -> None:
    p = project()
    ids = [start(grpc_stub, p).id for _ in range(4)]
    assert [op.id for op in list_all(grpc_stub, pb.OperationFilter(project=p), 2)] == ids


def test_paging_with_changes_between_pages(grpc_stub: Stub) -> None:
    """Changes between pages never make a listed operation repeat or an untouched one vanish."""
    p = project()
    ids = [start(grpc_stub, p).id for _ in range(6)]
    filter_ = pb.OperationFilter(project=p)
    first = grpc_stub.ListOperations(pb.ListOperationsRequest(filter=filter_, page_size=3))
    seen = [op.id for op in first.operations]
    assert seen == ids[:3]

    # Delete an item already listed, update another, and add a new one.
    grpc_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=ids[0]))
    grpc_stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=ids[1], completed=1))
    new = start(grpc_stub, p)

    token = first.next_page_token
    assert token
    while token:
        page = grpc_stub.ListOperations(
            pb.ListOperationsRequest(filter=filter_, page_size=3, page_token=token)
        )
        seen.extend(op.id for op in page.operations)
        token = page.next_page_token
    assert len(seen) == len(set(seen)), seen
    assert seen[:6] == ids
    assert set(seen) <= {*ids, new.id}


def test_default_page_size_is_100(grpc_stub: Stub) -> None:
    p = project()
    _start_many(grpc_stub, p, 101)
    page = grpc_stub.ListOperations(pb.ListOperationsRequest(filter=pb.OperationFilter(project=p)))
    assert len(page.operations) == 100
    assert page.next_page_token
    rest = grpc_stub.ListOperations(
        pb.ListOperationsRequest(
            filter=pb.OperationFilter(project=p), page_token=page.next_page_token
        )
    )
    assert len(rest.operations) == 1
    assert not rest.next_page_token


def _start_many(stub: Stub, p: str, count: int) -> list[str]:
    ids = [f"{p}-{i:05d}" for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda op_id: start(stub, p, operation_id=op_id), ids))
    return ids


def test_page_size_above_1000_is_capped(grpc_stub: Stub) -> None:
    p = project()
    ids = _start_many(grpc_stub, p, 1001)
    filter_ = pb.OperationFilter(project=p)
    page = grpc_stub.ListOperations(pb.ListOperationsRequest(filter=filter_, page_size=5000))
    assert len(page.operations) == 1000
    assert page.next_page_token
    rest = grpc_stub.ListOperations(
        pb.ListOperationsRequest(filter=filter_, page_size=5000, page_token=page.next_page_token)
    )
    assert len(rest.operations) == 1
    assert sorted(op.id for op in [*page.operations, *rest.operations]) == ids


def test_negative_page_size_is_invalid(grpc_stub: Stub) -> None:
    error = rpc_error(
        grpc_stub.ListOperations,
        pb.ListOperationsRequest(page_size=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_size" in (error.details() or "")


@pytest.mark.parametrize(
    "token", ["garbage", "!!!", "eyJvZmZzZXQiOiAxfQ==", "\u00e9\u00e9", "0", "a" * 500]
)
def test_garbage_page_token_is_invalid(grpc_stub: Stub, token: str) -> None:
    error = rpc_error(
        grpc_stub.ListOperations,
        pb.ListOperationsRequest(page_token=token),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in (error.details() or "")


def test_page_token_is_tied_to_the_filter(grpc_stub: Stub) -> None:
    p = project()
    for _ in range(3):
        start(grpc_stub, p)
    page = grpc_stub.ListOperations(
        pb.ListOperationsRequest(filter=pb.OperationFilter(project=p), page_size=1)
    )
    assert page.next_page_token
    error = rpc_error(
        grpc_stub.ListOperations,
        pb.ListOperationsRequest(
            filter=pb.OperationFilter(project=project()),
            page_size=1,
            page_token=page.next_page_token,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "page_token" in (error.details() or "")


# --- Revision -----------------------------------------------------------------------------


def test_response_revision_is_the_store_revision(grpc_stub: Stub) -> None:
    p = project()
    op = start(grpc_stub, p)
    response = grpc_stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op.id, completed=1))
    listed = grpc_stub.ListOperations(
        pb.ListOperationsRequest(filter=pb.OperationFilter(project=p))
    )
    assert listed.revision == response.revision
    assert all(item.revision <= listed.revision for item in listed.operations)

    # Changes elsewhere move the store revision even when the page does not change.
    other = start(grpc_stub, project())
    again = grpc_stub.ListOperations(pb.ListOperationsRequest(filter=pb.OperationFilter(project=p)))
    assert again.revision == other.revision
    assert list(again.operations) == list(listed.operations)


def test_empty_result_still_carries_the_revision(grpc_stub: Stub) -> None:
    op = start(grpc_stub, project())
    empty = grpc_stub.ListOperations(
        pb.ListOperationsRequest(filter=pb.OperationFilter(project=project()))
    )
    assert list(empty.operations) == []
    assert not empty.next_page_token
    assert empty.revision == op.revision
