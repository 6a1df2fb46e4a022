"""Prometheus metrics: recorded values, the HTTP endpoint, and RPC counting through the
real server and generated stubs, checked by scraping /metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server.config import ServerConfig
from headway_server.domain.model import (
    Operation,
    Stage,
    StageState,
    StartSpec,
    State,
)
from headway_server.metrics import MAX_UNKNOWN_METHOD_SERIES, OTHER_UNKNOWN_METHODS, Metrics
from headway_server.server import create_server
from prometheus_client.parser import text_string_to_metric_families

CONFIG = ServerConfig(listen="127.0.0.1:0", log_level="WARNING", shutdown_grace=0.0)


def samples(text: str | bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by (name, labels)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def series(text: str | bytes, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples(text).items() if n == name}


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.close()


# --- recorded values --------------------------------------------------------------------


def test_counters_and_gauges(metrics: Metrics) -> None:
    metrics.update_applied()
    metrics.update_applied()
    metrics.set_open_watchers(5)
    metrics.set_open_watchers(3)
    metrics.alert_raised("SLOW")
    metrics.alert_raised("SLOW")
    metrics.alert_raised("STALLED")

    text = metrics.render()
    assert value(text, "headway_updates_total") == 2
    assert value(text, "headway_open_watchers") == 3
    assert value(text, "headway_alerts_raised_total", type="SLOW") == 2
    assert value(text, "headway_alerts_raised_total", type="STALLED") == 1
    # Each instance has its own registry.
    assert value(Metrics().render(), "headway_updates_total") == 0


def test_operation_counts_replace_every_series(metrics: Metrics) -> None:
    metrics.set_operation_counts({("RUNNING", "ingest"): 4, ("QUEUED", "crawl"): 2})
    assert series(metrics.render(), "headway_operations") == {
        frozenset({("state", "RUNNING"), ("kind", "ingest")}): 4,
        frozenset({("state", "QUEUED"), ("kind", "crawl")}): 2,
    }
    metrics.set_operation_counts({("RUNNING", "ingest"): 1, ("SUCCEEDED", "ingest"): 3})
    assert series(metrics.render(), "headway_operations") == {
        frozenset({("state", "RUNNING"), ("kind", "ingest")}): 1,
        frozenset({("state", "SUCCEEDED"), ("kind", "ingest")}): 3,
    }
    metrics.set_operation_counts({})
    assert series(metrics.render(), "headway_operations") == {}


def test_finished_operation_durations_go_to_histograms(metrics: Metrics) -> None:
    op = Operation(
        id="op-1",
        spec=StartSpec(kind="ingest"),
        state=State.SUCCEEDED,
        created_at=90.0,
        started_at=100.0,
        finished_at=145.0,
        stages=(
            Stage("clone", 1, StageState.DONE, started_at=100.0, finished_at=103.0),
            Stage("index", 4, StageState.DONE, started_at=103.0, finished_at=145.0),
            Stage("extra", 1, StageState.SKIPPED),
        ),
    )
    metrics.operation_finished(op)
    metrics.operation_finished(
        Operation(
            id="op-2",
            spec=StartSpec(kind="ingest"),
            state=State.FAILED,
            created_at=0.0,
            started_at=0.0,
            finished_at=7200.0,
        )
    )

    text = metrics.render()
    duration = "headway_operation_duration_seconds"
    assert value(text, f"{duration}_count", kind="ingest", state="SUCCEEDED") == 1
    assert value(text, f"{duration}_sum", kind="ingest", state="SUCCEEDED") == 45.0
    assert value(text, f"{duration}_bucket", kind="ingest", state="SUCCEEDED", le="30.0") == 0
    assert value(text, f"{duration}_bucket", kind="ingest", state="SUCCEEDED", le="60.0") == 1
    assert value(text, f"{duration}_sum", kind="ingest", state="FAILED") == 7200.0
    assert value(text, f"{duration}_bucket", kind="ingest", state="FAILED", le="3600.0") == 0
    assert value(text, f"{duration}_bucket", kind="ingest", state="FAILED", le="7200.0") == 1
    stage = "headway_stage_duration_seconds"
    assert value(text, f"{stage}_sum", kind="ingest", stage="clone") == 3.0
    assert value(text, f"{stage}_sum", kind="ingest", stage="index") == 42.0
    assert value(text, f"{stage}_count", kind="ingest", stage="extra") is None


# --- the HTTP endpoint ------------------------------------------------------------------


def test_endpoint_serves_metrics_until_closed(metrics: Metrics) -> None:
    port = metrics.serve("127.0.0.1:0")
    assert port > 0
    metrics.update_applied()
    body = scrape(port)
    assert value(body, "headway_updates_total") == 1
    with pytest.raises(RuntimeError, match="already"):
        metrics.serve("127.0.0.1:0")

    metrics.close()
    metrics.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(port)


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:http", ""])
def test_endpoint_rejects_addresses_without_a_port(metrics: Metrics, listen: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        metrics.serve(listen)


# --- RPCs through the real server -------------------------------------------------------


class Served(NamedTuple):
    channel: grpc.aio.Channel
    # The generated stubs are typed for sync channels; on an aio channel they are not.
    stub: Any
    metrics_port: int


@pytest.fixture
async def served(metrics: Metrics) -> AsyncIterator[Served]:
    """The real Headway server recording in `metrics`, and a channel to it."""
    metrics_port = metrics.serve("127.0.0.1:0")
    server, port = create_server(CONFIG, metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(channel, pb_grpc.ProgressTrackerStub(channel), metrics_port)
    finally:
        await server.shutdown(0)


async def rpc_counts(metrics_port: int) -> Mapping[tuple[str, str], float]:
    text = await asyncio.to_thread(scrape, metrics_port)
    return {
        (dict(labels)["method"], dict(labels)["code"]): v
        for labels, v in series(text, "headway_rpcs_total").items()
    }


async def eventually(
    metrics_port: int, expected: Mapping[tuple[str, str], float], within: float = 5.0
) -> Mapping[tuple[str, str], float]:
    """The RPC counts once they include `expected` (stream ends are recorded async)."""
    deadline = time.monotonic() + within
    while True:
        counts = await rpc_counts(metrics_port)
        if all(counts.get(k) == v for k, v in expected.items()) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_unary_rpcs_counted_by_method_and_code(
    served: Served,
) -> None:
    _, stub, metrics_port = served
    op = await stub.StartOperation(pb.StartOperationRequest(kind="ingest", total=10))
    for sequence in (1, 2):
        await stub.UpdateOperation(
            pb.UpdateOperationRequest(operation_id=op.id, sequence=sequence, completed=sequence)
        )
    bad_percent = pb.UpdateOperationRequest(operation_id=op.id, sequence=3, percent=200)
    assert await code_of(stub.UpdateOperation(bad_percent)) == grpc.StatusCode.INVALID_ARGUMENT
    missing = pb.UpdateOperationRequest(operation_id="op-missing", sequence=1)
    assert await code_of(stub.UpdateOperation(missing)) == grpc.StatusCode.NOT_FOUND
    get_missing = stub.GetOperation(pb.GetOperationRequest(operation_id="op-missing"))
    assert await code_of(get_missing) == grpc.StatusCode.NOT_FOUND

    counts = await rpc_counts(metrics_port)

    assert counts == {
        ("StartOperation", "OK"): 1,
        ("UpdateOperation", "OK"): 2,
        ("UpdateOperation", "INVALID_ARGUMENT"): 1,
        ("UpdateOperation", "NOT_FOUND"): 1,
        ("GetOperation", "NOT_FOUND"): 1,
    }


async def test_streams_counted_when_they_end(
    served: Served,
) -> None:
    _, stub, metrics_port = served
    op = await stub.StartOperation(pb.StartOperationRequest(kind="ingest"))

    # Ends OK after delivering the terminal state.
    watch = stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.id))
    first = await watch.read()
    assert first.operation.id == op.id
    assert ("WatchOperation", "OK") not in await rpc_counts(metrics_port)
    await stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
    while await watch.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass
    assert await watch.code() == grpc.StatusCode.OK

    # Aborted inside the stream handler.
    missing = stub.WatchOperation(pb.WatchOperationRequest(operation_id="op-missing"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in missing:
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # Cancelled by the client while open.
    project = stub.WatchOperations(pb.WatchOperationsRequest())
    await project.read()
    project.cancel()

    counts = await eventually(
        metrics_port,
        {
            ("WatchOperation", "OK"): 1,
            ("WatchOperation", "NOT_FOUND"): 1,
            ("WatchOperations", "CANCELLED"): 1,
        },
    )
    assert counts == {
        ("StartOperation", "OK"): 1,
        ("CompleteOperation", "OK"): 1,
        ("WatchOperation", "OK"): 1,
        ("WatchOperation", "NOT_FOUND"): 1,
        ("WatchOperations", "CANCELLED"): 1,
    }


async def test_other_services_and_unknown_methods_are_counted(
    served: Served,
) -> None:
    channel, _, metrics_port = served
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    nope = channel.unary_unary(
        "/headway.v1.ProgressTracker/Nope",
        request_serializer=bytes,
        response_deserializer=bytes,
    )(b"")
    assert await code_of(nope) == grpc.StatusCode.UNIMPLEMENTED

    counts = await rpc_counts(metrics_port)
    assert counts == {("Check", "OK"): 1, ("Nope", "UNIMPLEMENTED"): 1}


async def test_unknown_method_names_make_a_bounded_number_of_series(
    served: Served,
) -> None:
    # A client probing made-up names must not grow the metrics without end.
    channel, _, metrics_port = served
    for i in range(MAX_UNKNOWN_METHOD_SERIES + 5):
        call = channel.unary_unary(
            f"/headway.v1.ProgressTracker/Nope{i}",
            request_serializer=bytes,
            response_deserializer=bytes,
        )(b"")
        assert await code_of(call) == grpc.StatusCode.UNIMPLEMENTED
    counts = await rpc_counts(metrics_port)
    assert len(counts) == MAX_UNKNOWN_METHOD_SERIES + 1
    assert counts[(OTHER_UNKNOWN_METHODS, "UNIMPLEMENTED")] == 5
    assert counts[("Nope0", "UNIMPLEMENTED")] == 1


async def test_a_stream_to_an_unknown_method_is_refused_before_any_request(
    served: Served,
) -> None:
    channel, _, metrics_port = served
    call = channel.stream_stream(
        "/headway.v1.ProgressTracker/NopeStream",
        request_serializer=bytes,
        response_deserializer=bytes,
    )()  # type: ignore[call-arg]  # no iterator: grpc.aio's write() API, unused here
    # The client sends nothing and waits: the server must not wait for it.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await asyncio.wait_for(call.read(), 5)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert await rpc_counts(metrics_port) == {("NopeStream", "UNIMPLEMENTED"): 1}


def test_metrics_listen_flag_serves_prometheus_text(server_factory):
    import urllib.request

    import grpc as grpc_module
    from headway.v1 import progress_pb2 as pb
    from headway.v1 import progress_pb2_grpc as pb_grpc

    server = server_factory(metrics_listen="127.0.0.1:0")
    port = server.server.metrics_port
    assert port > 0
    with grpc_module.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        op = stub.StartOperation(pb.StartOperationRequest(kind="scrape", project="m"))
        stub.UpdateOperation(pb.UpdateOperationRequest(operation_id=op.id, sequence=1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    assert 'headway_rpcs_total{code="OK",method="StartOperation"} 1.0' in text
    assert "headway_updates_total 1.0" in text
