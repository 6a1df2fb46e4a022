"""Validation, unknown ids and the operation limit (README guarantee 4).

Every rejected call answers INVALID_ARGUMENT naming the field, and changes nothing:
neither the operation nor the store revision moves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import struct_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

State = pb.Operation.State
Stub = pb_grpc.ProgressTrackerStub
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def uid(prefix: str = "op") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def struct(**values: Any) -> struct_pb2.Struct:
    result = struct_pb2.Struct()
    result.update(values)
    return result


def big_struct() -> struct_pb2.Struct:
    return struct(blob="x" * (16 * 1024 + 1))


def nan_struct() -> struct_pb2.Struct:
    return struct(value=float("nan"))


def rpc_error(method: Any, request: Any, code: grpc.StatusCode) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=5)
    error = cast(grpc.Call, info.value)
    assert error.code() == code, f"expected {code}, got {error.code()}: {error.details()}"
    return error


def assert_names_field(error: grpc.Call, fields: tuple[str, ...]) -> None:
    details = error.details() or ""
    assert any(field in details for field in fields), f"message {details!r} names none of {fields}"


def store_revision(stub: Stub) -> int:
    return stub.ListOperations(pb.ListOperationsRequest(page_size=1)).revision


def get(stub: Stub, op_id: str) -> pb.Operation:
    return stub.GetOperation(pb.GetOperationRequest(operation_id=op_id))


@pytest.fixture
def base_op(grpc_stub: Stub) -> pb.Operation:
    """A RUNNING operation in stage "b" of a, b, c, with 10 of 100 done."""
    op = grpc_stub.StartOperation(
        pb.StartOperationRequest(
            operation_id=uid(),
            kind="validation",
            project="validation",
            total=100,
            labels={"env": "test"},
            stages=[pb.StageSpec(name=n) for n in ("a", "b", "c")],
        )
    )
    grpc_stub.UpdateOperation(
        pb.UpdateOperationRequest(
            operation_id=op.id,
            sequence=1,
            stage="b",
            stage_completed=1,
            stage_total=10,
            completed=10,
            counters={"files": 1},
            message="working",
        )
    )
    return get(grpc_stub, op.id)


# --- StartOperation -----------------------------------------------------------------------

LONG = "x" * 129


def _labels(count: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(count)}


START_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("id-too-long", {"operation_id": "a" * 129}, ("operation_id",)),
    ("id-space", {"operation_id": "op 1"}, ("operation_id",)),
    ("id-slash", {"operation_id": "op/1"}, ("operation_id",)),
    ("id-leading-dash", {"operation_id": "-op"}, ("operation_id",)),
    ("id-leading-dot", {"operation_id": ".op"}, ("operation_id",)),
    ("id-leading-colon", {"operation_id": ":op"}, ("operation_id",)),
    ("id-leading-underscore", {"operation_id": "_op"}, ("operation_id",)),
    ("id-non-ascii", {"operation_id": "op-\u00e9"}, ("operation_id",)),
    ("kind-too-long", {"kind": LONG}, ("kind",)),
    ("project-too-long", {"project": LONG}, ("project",)),
    ("dataset-too-long", {"dataset": LONG}, ("dataset",)),
    ("unit-too-long", {"unit": LONG}, ("unit",)),
    ("negative-total", {"total": -1}, ("total",)),
    ("too-many-labels", {"labels": _labels(65)}, ("labels",)),
    ("label-key-too-long", {"labels": {"k" * 64: "v"}}, ("labels",)),
    ("label-value-too-long", {"labels": {"k": "v" * 257}}, ("labels",)),
    ("too-many-stages", {"stages": [pb.StageSpec(name=f"s{i}") for i in range(65)]}, ("stages",)),
    ("stage-weight-nan", {"stages": [pb.StageSpec(name="s", weight=float("nan"))]}, ("stages",)),
    ("stage-weight-inf", {"stages": [pb.StageSpec(name="s", weight=float("inf"))]}, ("stages",)),
    ("parent-id-invalid", {"parent_id": "bad parent"}, ("parent_id",)),
    ("parent-id-too-long", {"parent_id": "p" * 129}, ("parent_id",)),
    ("request-id-too-long", {"operation_id": "", "request_id": "r" * 129}, ("request_id",)),
]


@pytest.mark.parametrize(
    ("fields", "names"),
    [pytest.param(fields, names, id=case) for case, fields, names in START_CASES],
)
def test_start_rejects_invalid_requests(
    grpc_stub: Stub, fields: dict[str, Any], names: tuple[str, ...]
) -> None:
    op_id = uid()
    request: dict[str, Any] = {"operation_id": op_id, "kind": "k", "project": "validation"}
    request.update(fields)
    revision = store_revision(grpc_stub)
    error = rpc_error(grpc_stub.StartOperation, pb.StartOperationRequest(**request), INVALID)
    assert_names_field(error, names)
    assert store_revision(grpc_stub) == revision
    rpc_error(
        grpc_stub.GetOperation,
        pb.GetOperationRequest(operation_id=op_id),
        grpc.StatusCode.NOT_FOUND,
    )


def test_start_accepts_values_at_the_limits(grpc_stub: Stub) -> None:
    op_id = "A" + "b" * 120 + "9._:-Zz"
    assert len(op_id) == 128
    name = "n" * 128
    labels = {f"{i:02d}" + "k" * 61: "v" * 256 for i in range(64)}
    op = grpc_stub.StartOperation(
        pb.StartOperationRequest(
            operation_id=op_id,
            kind=name,
            project=name,
            dataset=name,
            unit=name,
            labels=labels,
            stages=[pb.StageSpec(name=f"s{i}") for i in range(64)],
        )
    )
    assert op.id == op_id
    assert dict(op.labels) == labels
    assert len(op.stages) == 64


# --- UpdateOperation ----------------------------------------------------------------------

UPDATE_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("negative-completed", {"completed": -1}, ("completed",)),
    ("completed-above-total", {"completed": 101}, ("completed",)),
    ("completed-above-new-total", {"completed": 50, "total": 40}, ("completed", "total")),
    ("total-below-completed", {"total": 5}, ("total", "completed")),
    ("negative-total", {"total": -1}, ("total",)),
    ("negative-stage-completed", {"stage_completed": -1}, ("stage_completed",)),
    ("negative-stage-total", {"stage_total": -1}, ("stage_total",)),
    (
        "stage-completed-above-stage-total",
        {"stage_completed": 5, "stage_total": 4},
        ("stage_completed",),
    ),
    ("percent-below-0", {"percent": -0.1}, ("percent",)),
    ("percent-above-100", {"percent": 100.1}, ("percent",)),
    ("percent-nan", {"percent": float("nan")}, ("percent",)),
    ("percent-inf", {"percent": float("inf")}, ("percent",)),
    ("percent-minus-inf", {"percent": float("-inf")}, ("percent",)),
    ("stage-not-in-plan", {"stage": "zzz"}, ("stage",)),
    ("stage-before-current", {"stage": "a"}, ("stage",)),
    ("message-too-long", {"message": "m" * 4097}, ("message",)),
    ("message-too-many-bytes", {"message": "\u00e9" * 2049}, ("message",)),
    ("checkpoint-too-long", {"checkpoint": "c" * 4097}, ("checkpoint",)),
    ("details-too-large", {"details": big_struct()}, ("details",)),
    ("details-nan", {"details": nan_struct()}, ("details",)),
    ("negative-counter-delta", {"counters": {"files": -1}}, ("counters",)),
    ("too-many-counters", {"counters": {f"c{i}": 1 for i in range(65)}}, ("counters",)),
    (
        "too-many-counter-names-in-total",
        {"counters": {f"c{i}": 1 for i in range(64)}},
        ("counters",),
    ),
    ("counter-name-too-long", {"counters": {"c" * 64: 1}}, ("counters",)),
    ("empty-id", {"operation_id": ""}, ("operation_id",)),
    ("invalid-id", {"operation_id": "bad id"}, ("operation_id",)),
    ("id-too-long", {"operation_id": "a" * 129}, ("operation_id",)),
]


@pytest.mark.parametrize(
    ("fields", "names"),
    [pytest.param(fields, names, id=case) for case, fields, names in UPDATE_CASES],
)
def test_update_rejects_invalid_requests(
    grpc_stub: Stub, base_op: pb.Operation, fields: dict[str, Any], names: tuple[str, ...]
) -> None:
    request: dict[str, Any] = {"operation_id": base_op.id, "sequence": 2, "message": "changed"}
    request.update(fields)
    revision = store_revision(grpc_stub)
    error = rpc_error(grpc_stub.UpdateOperation, pb.UpdateOperationRequest(**request), INVALID)
    assert_names_field(error, names)
    assert get(grpc_stub, base_op.id) == base_op
    assert store_revision(grpc_stub) == revision
    # The sequence of the rejected report was not used up.
    ok = grpc_stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=base_op.id, sequence=2))
    assert ok.applied


def test_update_accepts_values_at_the_limits(grpc_stub: Stub, base_op: pb.Operation) -> None:
    counters = {f"{i:02d}" + "c" * 61: 1 for i in range(63)}  # base_op already has "files"
    response = grpc_stub.UpdateOperation(
        pb.UpdateOperationRequest(
            operation_id=base_op.id,
            stage="c",
            stage_completed=4,
            stage_total=4,
            completed=100,
            message="\u00e9" * 2048,
            checkpoint="c" * 4096,
            counters=counters,
            details=struct(blob="x" * (15 * 1024)),
        )
    )
    assert response.applied
    stored = get(grpc_stub, base_op.id)
    assert stored.completed == 100
    assert len(stored.counters) == 64
    assert stored.message == "\u00e9" * 2048


@pytest.mark.parametrize("percent", [0.0, 100.0])
def test_update_accepts_percent_bounds(grpc_stub: Stub, percent: float) -> None:
    op = grpc_stub.StartOperation(pb.StartOperationRequest(operation_id=uid(), kind="k"))
    response = grpc_stub.UpdateOperation(
        pb.UpdateOperationRequest(operation_id=op.id, percent=percent)
    )
    assert response.percent == percent


# --- Complete, Fail, Cancel, Delete, Get --------------------------------------------------


def _complete(op_id: str, **fields: Any) -> pb.CompleteOperationRequest:
    return pb.CompleteOperationRequest(**{"operation_id": op_id, **fields})


def _fail(op_id: str, **fields: Any) -> pb.FailOperationRequest:
    error = fields.pop("error", pb.OperationError(code="E", message="m"))
    return pb.FailOperationRequest(**{"operation_id": op_id, "error": error, **fields})


OTHER_CASES: list[tuple[str, str, Callable[[str], Any], tuple[str, ...]]] = [
    ("complete-empty-id", "CompleteOperation", lambda _: _complete(""), ("operation_id",)),
    ("complete-invalid-id", "CompleteOperation", lambda _: _complete("a b"), ("operation_id",)),
    (
        "complete-message-too-long",
        "CompleteOperation",
        lambda i: _complete(i, message="m" * 4097),
        ("message",),
    ),
    (
        "complete-result-too-large",
        "CompleteOperation",
        lambda i: _complete(i, result=big_struct()),
        ("result",),
    ),
    (
        "complete-result-nan",
        "CompleteOperation",
        lambda i: _complete(i, result=nan_struct()),
        ("result",),
    ),
    (
        "complete-request-id-too-long",
        "CompleteOperation",
        lambda i: _complete(i, request_id="r" * 129),
        ("request_id",),
    ),
    ("fail-empty-id", "FailOperation", lambda _: _fail(""), ("operation_id",)),
    ("fail-invalid-id", "FailOperation", lambda _: _fail("a/b"), ("operation_id",)),
    (
        "fail-error-details-too-large",
        "FailOperation",
        lambda i: _fail(i, error=pb.OperationError(code="E", details=big_struct())),
        ("details",),
    ),
    (
        "fail-error-details-nan",
        "FailOperation",
        lambda i: _fail(i, error=pb.OperationError(code="E", details=nan_struct())),
        ("details",),
    ),
    (
        "fail-request-id-too-long",
        "FailOperation",
        lambda i: _fail(i, request_id="r" * 129),
        ("request_id",),
    ),
    (
        "cancel-empty-id",
        "CancelOperation",
        lambda _: pb.CancelOperationRequest(),
        ("operation_id",),
    ),
    (
        "cancel-invalid-id",
        "CancelOperation",
        lambda _: pb.CancelOperationRequest(operation_id="a b"),
        ("operation_id",),
    ),
    (
        "delete-empty-id",
        "DeleteOperation",
        lambda _: pb.DeleteOperationRequest(),
        ("operation_id",),
    ),
    (
        "delete-invalid-id",
        "DeleteOperation",
        lambda _: pb.DeleteOperationRequest(operation_id="x" * 129),
        ("operation_id",),
    ),
    ("get-empty-id", "GetOperation", lambda _: pb.GetOperationRequest(), ("operation_id",)),
    (
        "get-invalid-id",
        "GetOperation",
        lambda _: pb.GetOperationRequest(operation_id="-x"),
        ("operation_id",),
    ),
]


@pytest.mark.parametrize(
    ("method", "build", "names"),
    [pytest.param(method, build, names, id=case) for case, method, build, names in OTHER_CASES],
)
def test_other_calls_reject_invalid_requests(
    grpc_stub: Stub,
    base_op: pb.Operation,
    method: str,
    build: Callable[[str], Any],
    names: tuple[str, ...],
) -> None:
    revision = store_revision(grpc_stub)
    error = rpc_error(getattr(grpc_stub, method), build(base_op.id), INVALID)
    assert_names_field(error, names)
    assert get(grpc_stub, base_op.id) == base_op
    assert store_revision(grpc_stub) == revision


@pytest.mark.parametrize("op_id", ["", "bad id"])
def test_watch_operation_rejects_invalid_id(grpc_stub: Stub, op_id: str) -> None:
    call = grpc_stub.WatchOperation(pb.WatchOperationRequest(operation_id=op_id), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    error = cast(grpc.Call, info.value)
    assert error.code() == INVALID, error.details()
    assert_names_field(error, ("operation_id",))


# --- Unknown ids --------------------------------------------------------------------------

NOT_FOUND_CASES: list[tuple[str, Callable[[str], Any]]] = [
    ("GetOperation", lambda i: pb.GetOperationRequest(operation_id=i)),
    ("UpdateOperation", lambda i: pb.UpdateOperationRequest(operation_id=i, completed=1)),
    ("CompleteOperation", lambda i: _complete(i)),
    ("FailOperation", lambda i: _fail(i)),
    ("CancelOperation", lambda i: pb.CancelOperationRequest(operation_id=i)),
    ("DeleteOperation", lambda i: pb.DeleteOperationRequest(operation_id=i)),
]


@pytest.mark.parametrize(
    ("method", "build"),
    [pytest.param(method, build, id=method) for method, build in NOT_FOUND_CASES],
)
def test_unknown_ids_are_not_found(
    grpc_stub: Stub, method: str, build: Callable[[str], Any]
) -> None:
    revision = store_revision(grpc_stub)
    rpc_error(getattr(grpc_stub, method), build(uid("missing")), grpc.StatusCode.NOT_FOUND)
    assert store_revision(grpc_stub) == revision


def test_watch_unknown_operation_is_not_found(grpc_stub: Stub) -> None:
    call = grpc_stub.WatchOperation(
        pb.WatchOperationRequest(operation_id=uid("missing")), timeout=5
    )
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    assert cast(grpc.Call, info.value).code() == grpc.StatusCode.NOT_FOUND


def test_unknown_parent_id_is_not_found(grpc_stub: Stub) -> None:
    op_id = uid()
    revision = store_revision(grpc_stub)
    rpc_error(
        grpc_stub.StartOperation,
        pb.StartOperationRequest(operation_id=op_id, kind="child", parent_id=uid("missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert store_revision(grpc_stub) == revision
    rpc_error(
        grpc_stub.GetOperation,
        pb.GetOperationRequest(operation_id=op_id),
        grpc.StatusCode.NOT_FOUND,
    )


def test_known_parent_id_is_accepted(grpc_stub: Stub, base_op: pb.Operation) -> None:
    child = grpc_stub.StartOperation(
        pb.StartOperationRequest(operation_id=uid(), kind="child", parent_id=base_op.id)
    )
    assert child.parent_id == base_op.id


# --- max_operations -----------------------------------------------------------------------


@pytest.fixture
def small_stub(server_factory: Callable[..., Any]) -> Iterator[Stub]:
    server = server_factory(max_operations=3)
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.ProgressTrackerStub(channel)


def test_full_store_is_resource_exhausted(small_stub: Stub) -> None:
    ops = [
        small_stub.StartOperation(pb.StartOperationRequest(operation_id=f"full-{i}", kind="k"))
        for i in range(3)
    ]
    # Terminal operations still count until they are removed.
    small_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=ops[0].id))
    revision = store_revision(small_stub)
    rpc_error(
        small_stub.StartOperation,
        pb.StartOperationRequest(operation_id="full-3", kind="k"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    rpc_error(
        small_stub.StartOperation,
        pb.StartOperationRequest(kind="k"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert store_revision(small_stub) == revision
    rpc_error(
        small_stub.GetOperation,
        pb.GetOperationRequest(operation_id="full-3"),
        grpc.StatusCode.NOT_FOUND,
    )
    listed = small_stub.ListOperations(pb.ListOperationsRequest())
    assert [op.id for op in listed.operations] == ["full-0", "full-1", "full-2"]

    # Existing operations keep working, and a retried start is not a new operation.
    small_stub.UpdateOperation(pb.UpdateOperationRequest(operation_id="full-1", completed=1))
    again = small_stub.StartOperation(pb.StartOperationRequest(operation_id="full-2", kind="k"))
    assert again.id == "full-2"

    # Deleting one makes room again.
    small_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id="full-0"))
    new = small_stub.StartOperation(pb.StartOperationRequest(operation_id="full-3", kind="k"))
    assert new.state == State.QUEUED
