"""Prometheus metrics for operators, served over HTTP at /metrics.

Each `Metrics` has its own registry, so several servers (and tests) can run in
one process. Exported:

- headway_rpcs_total{method,code}: finished RPCs by short method name and status
- headway_updates_total: progress reports applied
- headway_open_watchers: open watch streams
- headway_operations{state,kind}: operations held, by state and kind
- headway_operation_duration_seconds{kind,state}: histogram of finished operations
- headway_stage_duration_seconds{kind,stage}: histogram of finished stages
- headway_alerts_raised_total{type}: alerts raised
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from headway_server.domain.model import Operation

# Seconds to days: a quick job takes seconds, an ingestion or crawl hours.
DURATION_BUCKETS = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
    float("inf"),
)


def _split_listen(listen: str) -> tuple[str, int]:
    """("host", port) from "host:port", "[::1]:port" or ":port" (all interfaces)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpcs = Counter(
            "headway_rpcs",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self._rpc_series: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._updates = Counter(
            "headway_updates", "Progress reports applied.", registry=self.registry
        )
        self._watchers = Gauge(
            "headway_open_watchers", "Watch streams open.", registry=self.registry
        )
        self._operations = Gauge(
            "headway_operations",
            "Operations held, by state and kind.",
            ["state", "kind"],
            registry=self.registry,
        )
        self._operation_keys: set[tuple[str, str]] = set()
        self._operation_duration = Histogram(
            "headway_operation_duration_seconds",
            "Duration of finished operations, from start to finish.",
            ["kind", "state"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._stage_duration = Histogram(
            "headway_stage_duration_seconds",
            "Duration of finished stages.",
            ["kind", "stage"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._alerts = Counter(
            "headway_alerts_raised",
            "Alerts raised, by type.",
            ["type"],
            registry=self.registry,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # Recording ---------------------------------------------------------------

    def rpc_finished(self, method: str, code: grpc.StatusCode) -> None:
        # labels() validates and locks on every call; the children are few.
        child = self._rpc_series.get((method, code))
        if child is None:
            child = self._rpc_series[method, code] = self._rpcs.labels(
                method=method, code=code.name
            )
        child.inc()

    def update_applied(self) -> None:
        self._updates.inc()

    def set_open_watchers(self, n: int) -> None:
        self._watchers.set(n)

    def set_operation_counts(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replaces every (state, kind) series; pairs absent from `counts` disappear.

        Stale series are removed one by one instead of clear() so a concurrent
        scrape never sees the gauge empty.
        """
        keys = set(counts)
        for state, kind in self._operation_keys - keys:
            self._operations.remove(state, kind)
        for (state, kind), n in counts.items():
            self._operations.labels(state=state, kind=kind).set(n)
        self._operation_keys = keys

    def operation_finished(self, op: Operation) -> None:
        """Observes a terminal operation's duration and its finished stages' durations."""
        if op.finished_at is not None:
            began = op.started_at if op.started_at is not None else op.created_at
            self._operation_duration.labels(kind=op.kind, state=op.state.name).observe(
                max(0.0, op.finished_at - began)
            )
        for stage in op.stages:
            if stage.started_at is not None and stage.finished_at is not None:
                self._stage_duration.labels(kind=op.kind, stage=stage.name).observe(
                    max(0.0, stage.finished_at - stage.started_at)
                )

    def alert_raised(self, alert_type: str) -> None:
        self._alerts.labels(type=alert_type).inc()

    def counted(self, method: str, behaviour: Callable[..., Any], streaming: bool) -> Any:
        """`behaviour` (an RPC method's implementation) wrapped to record its end in
        headway_rpcs_total. Wrapped once at registration: a server interceptor
        would run a coroutine and build a handler on every call (~10 % of a
        unary report's server time)."""
        wrap = _count_stream if streaming else _count_unary
        return wrap(self.rpc_finished, method, behaviour)

    def unknown_methods(self) -> grpc.GenericRpcHandler[Any, Any]:
        """A catch-all handler, registered last: answers UNIMPLEMENTED, counted."""
        return _UnknownMethods(self.rpc_finished)

    # Exposition --------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, listen: str) -> int:
        """Serves /metrics over HTTP on "host:port" (port 0 picks one) in a daemon
        thread; returns the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics endpoint already serving")
        host, port = _split_listen(listen)
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_address[1])

    def close(self) -> None:
        """Stops the HTTP endpoint, if serving; safe to call twice."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(5)


def _code_after(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
) -> grpc.StatusCode:
    """The status an RPC ended with: what the handler set (abort sets it before
    raising), else OK on return, CANCELLED when cancelled, UNKNOWN on an error."""
    code = context.code()
    if code is not None:
        return code
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


Record = Callable[[str, grpc.StatusCode], None]


def _count_unary(record: Record, method: str, inner: Callable[..., Any]) -> Any:
    async def behaviour(request: Any, context: Any) -> Any:
        try:
            response = await inner(request, context)
        except BaseException as exc:
            record(method, _code_after(context, exc))
            raise
        record(method, _code_after(context, None))
        return response

    return behaviour


def _count_stream(record: Record, method: str, inner: Callable[..., Any]) -> Any:
    async def behaviour(request: Any, context: Any) -> AsyncIterator[Any]:
        result = inner(request, context)
        try:
            if hasattr(result, "__aiter__"):
                async for message in result:
                    yield message
            else:
                # A handler that writes with context.write() (health's Watch).
                await result
        except BaseException as exc:
            record(method, _code_after(context, exc))
            raise
        finally:
            # Closed here, not whenever it is collected, so its cleanup (e.g. a
            # watcher unregistering) runs when the call ends.
            if hasattr(result, "aclose"):
                await result.aclose()
        record(method, _code_after(context, None))

    return behaviour


if TYPE_CHECKING:
    _GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # not subscriptable at run time
    _GenericHandler = grpc.GenericRpcHandler


# Distinct unknown method names counted under their own name; later ones are
# counted together under OTHER_UNKNOWN_METHODS.
MAX_UNKNOWN_METHOD_SERIES = 32
OTHER_UNKNOWN_METHODS = "(other unknown)"


class _UnknownMethods(_GenericHandler):
    def __init__(self, record: Record) -> None:
        self._record = record
        # Method names come from clients: each distinct one is a metric series
        # for the life of the process, so only the first few get their own.
        self._named: set[str] = set()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        full_name = handler_call_details.method
        method = full_name.rpartition("/")[2]
        if method not in self._named:
            if len(self._named) < MAX_UNKNOWN_METHOD_SERIES:
                self._named.add(method)
            else:
                method = OTHER_UNKNOWN_METHODS
        record = self._record

        async def refuse(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            record(method, grpc.StatusCode.UNIMPLEMENTED)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"method {full_name} not found")

        # Streaming both ways, so that the call is refused at once whatever its
        # shape, without waiting for a request the client may never send.
        return grpc.stream_stream_rpc_method_handler(refuse)
