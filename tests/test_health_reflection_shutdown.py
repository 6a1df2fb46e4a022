"""Health, reflection and graceful shutdown as orchestrators and generic tools see them.

README: "Orchestrators probe it with the standard grpc.health.v1.Health service; generic
tools discover the API through server reflection" and guarantee 10 (shutdown).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

SERVICE = "headway.v1.ProgressTracker"
HEALTH = "grpc.health.v1.Health"
RESUME_KEY = "headway-resume-revision"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Event = pb.OperationEvent
GRACE = 1.0


def uid(prefix: str = "op") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --- Health -------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_is_serving(grpc_channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(grpc_channel)
    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == SERVING


def test_health_check_of_unknown_service_is_not_found(grpc_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(grpc_channel)
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert cast(grpc.Call, info.value).code() == grpc.StatusCode.NOT_FOUND


# --- Reflection ---------------------------------------------------------------------------


def _reflect(channel: grpc.Channel, **request: Any) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=5
    )
    return next(iter(responses))


def test_reflection_lists_the_services(grpc_channel: grpc.Channel) -> None:
    response = _reflect(grpc_channel, list_services="")
    names = {service.name for service in response.list_services_response.service}
    assert SERVICE in names
    assert HEALTH in names


def test_reflection_describes_the_api(grpc_channel: grpc.Channel) -> None:
    response = _reflect(grpc_channel, file_containing_symbol=SERVICE)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    (progress,) = [f for f in files if f.name == "headway/v1/progress.proto"]
    (service,) = progress.service
    assert service.name == "ProgressTracker"
    methods = {method.name for method in service.method}
    assert {"StartOperation", "UpdateOperation", "WatchOperations"} <= methods


# --- Shutdown -----------------------------------------------------------------------------


class Shutdown:
    """Runs ServerThread.shutdown(grace) in another thread, as SIGTERM would."""

    def __init__(self, server: Any, grace: float = GRACE) -> None:
        self.began = time.monotonic()
        self.took: float | None = None
        self._thread = threading.Thread(target=self._run, args=(server, grace), daemon=True)
        self._thread.start()

    def _run(self, server: Any, grace: float) -> None:
        server.shutdown(grace)
        self.took = time.monotonic() - self.began

    def join(self, timeout: float = 10.0) -> float:
        self._thread.join(timeout)
        assert self.took is not None, "shutdown did not finish"
        return self.took


@pytest.fixture
def server(server_factory: Callable[..., Any]) -> Any:
    return server_factory(shutdown_grace=GRACE)


@pytest.fixture
def channel(server: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_watch_turns_not_serving_on_shutdown(
    server: Any, channel: grpc.Channel, record: Callable[..., Any], service: str
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    stream = record(health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=15))
    assert stream.next(timeout=5).status == SERVING

    shutdown = Shutdown(server)
    statuses: list[int] = []
    deadline = time.monotonic() + 5.0
    while NOT_SERVING not in statuses:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no NOT_SERVING, only {statuses}"
        try:
            statuses.append(stream.next(timeout=remaining).status)
        except EOFError:
            pytest.fail(f"health watch ended without NOT_SERVING (saw {statuses})")
    shutdown.join()


def _resume_revision(error: grpc.RpcError | None) -> int:
    assert error is not None, "the stream ended with OK instead of UNAVAILABLE"
    call = cast(grpc.Call, error)
    assert call.code() == grpc.StatusCode.UNAVAILABLE, (call.code(), call.details())
    metadata = dict(call.trailing_metadata() or ())
    assert RESUME_KEY in metadata, f"no {RESUME_KEY} in trailing metadata {metadata}"
    value = metadata[RESUME_KEY]
    assert isinstance(value, str)
    assert value.isdigit(), f"{RESUME_KEY}={value!r} is not an integer"
    return int(value)


def test_watch_operations_ends_unavailable_with_resume_revision(
    server: Any, channel: grpc.Channel, record: Callable[..., Any]
) -> None:
    stub = pb_grpc.ProgressTrackerStub(channel)
    project = uid("proj")
    stream = record(
        stub.WatchOperations(
            pb.WatchOperationsRequest(filter=pb.OperationFilter(project=project)), timeout=15
        )
    )
    assert [e.type for e in stream.next(timeout=5).events] == [Event.SYNCED]
    op = stub.StartOperation(pb.StartOperationRequest(operation_id=uid(), project=project))
    latest = stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op.id, completed=1))
    seen = 0
    while seen < latest.revision:
        seen = max(e.revision for e in stream.next(timeout=5).events)

    shutdown = Shutdown(server)
    resume = _resume_revision(stream.wait_end(timeout=5))
    assert resume >= latest.revision, "resuming from there would replay delivered changes"
    assert shutdown.join() < GRACE + 2.0


def test_watch_operation_ends_unavailable_with_resume_revision(
    server: Any, channel: grpc.Channel, record: Callable[..., Any]
) -> None:
    stub = pb_grpc.ProgressTrackerStub(channel)
    op = stub.StartOperation(pb.StartOperationRequest(operation_id=uid()))
    stream = record(stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.id), timeout=15))
    snapshot = stream.next(timeout=5)
    assert snapshot.type == Event.SNAPSHOT

    shutdown = Shutdown(server)
    resume = _resume_revision(stream.wait_end(timeout=5))
    assert resume >= snapshot.revision
    shutdown.join()


def test_shutdown_ends_idle_watchers_quickly(
    server: Any, channel: grpc.Channel, record: Callable[..., Any]
) -> None:
    """Open watch streams do not hold the server for the whole grace period."""
    stub = pb_grpc.ProgressTrackerStub(channel)
    streams = [
        record(stub.WatchOperations(pb.WatchOperationsRequest(), timeout=15)) for _ in range(5)
    ]
    for stream in streams:
        stream.next(timeout=5)
    shutdown = Shutdown(server, grace=5.0)
    for stream in streams:
        _resume_revision(stream.wait_end(timeout=5))
    assert shutdown.join() < 4.0
