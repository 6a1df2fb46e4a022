"""HTTP/JSON gateway: the same API for clients that cannot speak gRPC.

Requests and responses are the proto3 JSON mapping of the gRPC messages
(lowerCamelCase, as grpc-gateway and Envoy's transcoder emit), on routes in the
style of Google's API guidelines (`POST /v1/operations/{id}:update`). Each
route calls the gRPC servicer's method in-process, not over the network, so
validation, idempotency, authentication and project scoping are exactly
those of gRPC; its errors come back as
`{"error": {"code": 404, "status": "NOT_FOUND", "message": "..."}}`.

Served by uvicorn on the gRPC server's event loop (`--http-listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from google.protobuf import json_format
from google.protobuf.message import Message
from headway.v1 import progress_pb2 as pb
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from headway_server import auth, convert, handlers
from headway_server.app.watch import MAX_MIN_INTERVAL, ShuttingDown, WatchEvent
from headway_server.domain.errors import HeadwayError, StoreUnavailable
from headway_server.domain.validation import MAX_EPOCH_LENGTH, check_id, check_name
from headway_server.servicer import ProgressTrackerServicer, status_of

log = logging.getLogger("headway.gateway")

# gRPC status -> HTTP status, as grpc-gateway maps them.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
MAX_BODY_BYTES = 4 * 1024 * 1024
# The dashboard: static files shipped in the package, served at `/`.
DASHBOARD = Path(__file__).parent / "dashboard"


class _Dashboard(StaticFiles):
    """The dashboard's files, with a policy that lets the page run only its own
    scripts and talk only to this server (it shows strings producers wrote)."""

    HEADERS = {
        "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(self.HEADERS)
        return response


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
    """What the servicer's methods use of a gRPC context, for an HTTP request."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


def _error(code: grpc.StatusCode, message: str) -> JSONResponse:
    status = HTTP_STATUS.get(code, 500)
    body = {"error": {"code": status, "status": code.name, "message": message}}
    # RFC 6750: a 401 names the scheme the client should use.
    headers = {"WWW-Authenticate": 'Bearer realm="headway"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _page_size(request: Request) -> int:
    """`pageSize` from the query (0 when absent: the server's default)."""
    text = request.query_params.get("pageSize", "")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if text and not (text.isascii() and text.isdecimal()):
        raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, "pageSize: not a number")
    return int(text) if text else 0


def _json(message: Message) -> JSONResponse:
    return JSONResponse(json_format.MessageToDict(message, preserving_proto_field_name=False))


Handler = Callable[[Request], Awaitable[Response]]


class Gateway:
    """The HTTP routes, over a servicer (and the credentials, when configured)."""

    def __init__(
        self,
        servicer: ProgressTrackerServicer,
        credentials: handlers.Credentials | None,
        cors_origins: tuple[str, ...] = (),
    ) -> None:
        self.servicer = servicer
        self.credentials = credentials
        # Browsers on other origins may call the API only from these (none by
        # default); the dashboard itself is same-origin and needs none.
        middleware = [
            Middleware(
                CORSMiddleware,
                allow_origins=list(cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                max_age=600,
            )
        ]
        self.app = Starlette(
            middleware=middleware if cors_origins else [],
            routes=[
                Route("/v1/me", self._route(self._me), methods=["GET"]),
                Route("/v1/operations:watch", self._route(self._watch_many), methods=["GET"]),
                Route("/v1/operations", self._route(self._collection), methods=["GET", "POST"]),
                Route(
                    "/v1/operations/{name:path}",
                    self._route(self._one),
                    methods=["GET", "POST", "DELETE"],
                ),
                Route("/v1/stats", self._route(self._stats), methods=["GET"]),
                Route("/v1/{rest:path}", self._route(self._no_route)),
                Mount("/", _Dashboard(directory=DASHBOARD, html=True), name="dashboard"),
            ],
        )

    def _route(self, inner: Handler) -> Handler:
        async def handle(request: Request) -> Response:
            try:
                return await inner(request)
            except _Aborted as exc:
                return _error(exc.code, exc.message)
            except HeadwayError as exc:
                return _error(status_of(exc), str(exc))
            except json_format.ParseError as exc:
                return _error(grpc.StatusCode.INVALID_ARGUMENT, f"request body: {exc}")
            except Exception:
                log.exception("gateway error", extra={"path": request.url.path})
                return _error(grpc.StatusCode.INTERNAL, "internal error")

        return handle

    def _authorize(self, request: Request, method: str) -> auth.Principal | None:
        if self.credentials is None:
            return None
        headers = [(k.lower(), v) for k, v in request.headers.items()]
        try:
            return handlers.admit(self.credentials, method, headers)
        except auth.Unauthenticated as exc:
            raise _Aborted(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        except auth.PermissionDenied as exc:
            raise _Aborted(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None

    async def _me(self, request: Request) -> Response:
        """Who the caller is and what it may do: the dashboard shows a cancel
        button only to principals allowed to cancel, and asks for a token when
        the server wants one."""
        principal = self._authorize(request, "")
        if principal is None:
            body: dict[str, Any] = {
                "name": "",
                "authenticated": False,
                "projects": [auth.ALL_PROJECTS],
                "roles": [role.value for role in auth.Role],
            }
        else:
            body = {
                "name": principal.name,
                "authenticated": True,
                "projects": sorted(principal.projects or [auth.ALL_PROJECTS]),
                "roles": sorted(role.value for role in principal.roles),
            }
        body["methods"] = sorted(
            method
            for method, role in auth.METHOD_ROLES.items()
            if principal is None or principal.may(role)
        )
        return JSONResponse(body)

    async def _no_route(self, request: Request) -> Response:
        raise _Aborted(grpc.StatusCode.NOT_FOUND, f"no route {request.method} {request.url.path}")

    async def _call(self, method: str, request: Message) -> JSONResponse:
        response = await getattr(self.servicer, method)(request, _Context())
        return _json(response)

    async def _body(self, request: Request, message: Message) -> Message:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, "request body is too large")
        if raw.strip():
            try:
                json_format.Parse(raw, message)
            except json_format.ParseError as exc:
                raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, f"request body: {exc}") from None
        return message

    async def _collection(self, request: Request) -> Response:
        if request.method == "POST":
            self._authorize(request, "StartOperation")
            body = await self._body(request, pb.StartOperationRequest())
            return await self._call("StartOperation", body)
        self._authorize(request, "ListOperations")
        query = request.query_params
        listing = pb.ListOperationsRequest(
            filter=self._filter(request), page_token=query.get("pageToken", "")
        )
        listing.page_size = _page_size(request)
        return await self._call("ListOperations", listing)

    async def _one(self, request: Request) -> Response:
        name = request.path_params["name"]
        operation_id, _, verb = name.partition(":")
        if "/" in operation_id:
            operation_id, _, sub = operation_id.partition("/")
        else:
            sub = ""
        verbs: dict[tuple[str, str, str], tuple[str, Callable[[], Message]]] = {
            ("GET", "", ""): ("GetOperation", pb.GetOperationRequest),
            ("DELETE", "", ""): ("DeleteOperation", pb.DeleteOperationRequest),
            ("POST", "", "update"): ("UpdateOperation", pb.UpdateOperationRequest),
            ("POST", "", "complete"): ("CompleteOperation", pb.CompleteOperationRequest),
            ("POST", "", "fail"): ("FailOperation", pb.FailOperationRequest),
            ("POST", "", "cancel"): ("CancelOperation", pb.CancelOperationRequest),
            ("GET", "logs", ""): ("ListLogs", pb.ListLogsRequest),
            ("POST", "logs", ""): ("ReportLogs", pb.ReportLogsRequest),
            ("GET", "timeline", ""): ("GetTimeline", pb.GetTimelineRequest),
        }
        if (request.method, sub, verb) == ("GET", "", "watch"):
            return await self._watch_one(request, operation_id)
        found = verbs.get((request.method, sub, verb))
        if found is None:
            route = f"{request.method} {request.url.path}"
            raise _Aborted(grpc.StatusCode.NOT_FOUND, f"no route {route}")
        method, message_class = found
        self._authorize(request, method)
        message = message_class()
        if request.method == "POST":
            await self._body(request, message)
        elif method == "ListLogs":
            query = request.query_params
            message.page_token = query.get("pageToken", "")  # type: ignore[attr-defined]
            message.stage = query.get("stage", "")  # type: ignore[attr-defined]
            message.page_size = _page_size(request)  # type: ignore[attr-defined]
        message.operation_id = operation_id  # type: ignore[attr-defined]
        return await self._call(method, message)

    async def _stats(self, request: Request) -> Response:
        self._authorize(request, "GetStats")
        query = request.query_params
        stats = pb.GetStatsRequest(
            filter=pb.OperationFilter(project=query.get("project", ""), kind=query.get("kind", ""))
        )
        return await self._call("GetStats", stats)

    # --- live updates: Server-Sent Events ---------------------------------------------

    def _filter(self, request: Request) -> pb.OperationFilter:
        query = request.query_params
        where = pb.OperationFilter(
            project=query.get("project", ""),
            dataset=query.get("dataset", ""),
            kind=query.get("kind", ""),
            parent_id=query.get("parentId", ""),
            active_only=query.get("activeOnly", "").lower() in ("1", "true"),
        )
        # Labels as `label=key=value`, repeated; all must match.
        for pair in query.getlist("label"):
            key, equals, value = pair.partition("=")
            if not key or not equals:
                raise _Aborted(
                    grpc.StatusCode.INVALID_ARGUMENT, f"label: {pair!r} is not key=value"
                )
            where.labels[key] = value
        for state in query.getlist("states"):
            try:
                where.states.append(pb.Operation.State.Value(state))
            except ValueError:
                raise _Aborted(
                    grpc.StatusCode.INVALID_ARGUMENT, f"states: {state!r} is not a state"
                ) from None
        return where

    @staticmethod
    def _resume(request: Request) -> tuple[int, str, float | None]:
        """(from revision, from epoch, pacing) from Last-Event-ID (which a
        browser's EventSource sends by itself on reconnect) and the query."""
        last = request.headers.get("last-event-id") or request.query_params.get("lastEventId", "")
        revision, epoch = 0, ""
        if last:
            epoch, _, number = last.rpartition(".")
            # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
            if not (number.isascii() and number.isdecimal()):
                raise _Aborted(
                    grpc.StatusCode.INVALID_ARGUMENT, "Last-Event-ID: not an id this server sent"
                )
            check_name("from_epoch", epoch, MAX_EPOCH_LENGTH)  # as gRPC checks it
            revision = int(number)
        pacing = request.query_params.get("minInterval", "")
        try:
            interval = float(pacing) if pacing else None
        except ValueError:
            raise _Aborted(grpc.StatusCode.INVALID_ARGUMENT, "minInterval: seconds") from None
        if interval is not None and not 0 <= interval <= MAX_MIN_INTERVAL:
            raise _Aborted(
                grpc.StatusCode.INVALID_ARGUMENT, f"minInterval: 0 to {MAX_MIN_INTERVAL:g} seconds"
            )
        return revision, epoch, interval

    async def _watch_many(self, request: Request) -> Response:
        self._authorize(request, "WatchOperations")
        revision, epoch, interval = self._resume(request)
        where = auth.scoped(convert.operation_filter(self._filter(request)))
        hub = self.servicer.hub
        counted = self.servicer.open_stream()
        batches = hub.watch_operations(
            where, revision, from_epoch=epoch, min_interval=interval, bookmark_interval=KEEPALIVE
        )
        return self._stream(batches, counted)

    async def _watch_one(self, request: Request, operation_id: str) -> Response:
        self._authorize(request, "WatchOperation")
        revision, epoch, interval = self._resume(request)
        check_id("operation_id", operation_id)
        await self.servicer.service.check_visible(operation_id)
        hub = self.servicer.hub
        if revision and await self._ended_before(operation_id, revision, epoch):
            # 204 tells a browser's EventSource to stop reconnecting: the
            # operation ended and the client has seen its end already.
            return Response(status_code=204)
        counted = self.servicer.open_stream()
        # The first event (or NOT_FOUND) before the response starts, so that
        # an unknown operation is a 404, not an empty stream.
        events = hub.watch_operation(
            operation_id,
            revision,
            from_epoch=epoch,
            min_interval=interval,
            bookmark_interval=KEEPALIVE,
        )
        try:
            first = await anext(events)
        except BaseException as exc:
            await events.aclose()  # type: ignore[attr-defined]
            self.servicer.close_stream(counted)
            if isinstance(exc, HeadwayError):
                raise _Aborted(status_of(exc), str(exc)) from None
            raise

        async def batches() -> AsyncIterator[list[WatchEvent]]:
            yield [first]
            async for event in events:
                yield [event]

        return self._stream(batches(), counted)

    async def _ended_before(self, operation_id: str, revision: int, epoch: str) -> bool:
        """Whether the operation is finished at or before `revision` of this epoch."""
        if epoch != await self.servicer.hub.epoch():
            return False
        try:
            op = await self.servicer.service.get(operation_id)
        except HeadwayError:
            return False  # deleted or gone: the stream says so
        return op.state.terminal and op.revision <= revision

    def _stream(self, batches: AsyncIterator[list[WatchEvent]], counted: str) -> Response:
        epoch_holder = [""]
        servicer = self.servicer

        async def body() -> AsyncGenerator[bytes, None]:
            if not epoch_holder[0]:
                epoch_holder[0] = await servicer.hub.epoch()
            try:
                yield b"retry: 1000\n\n"
                async for batch in batches:
                    yield b"".join(_sse(event, epoch_holder) for event in batch)
            except (ShuttingDown, StoreUnavailable):
                return  # the client reconnects with Last-Event-ID
            except Exception:
                log.exception("watch stream failed")
                return

        async def release() -> None:
            # However the response ended, even before its body began (a client
            # gone before the headers went out): the hub's generator is closed
            # and the principal's stream slot given back, once.
            await batches.aclose()  # type: ignore[attr-defined]
            servicer.close_stream(counted)

        return _EventStream(body(), release)


class _EventStream(StreamingResponse):
    """A text/event-stream response that runs `release` when it ends."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], release: Callable[[], Awaitable[None]]
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._events = body
        self._release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._release()


# Quiet streams get a bookmark event this often: proxies keep them open, and
# the client's resume position moves on.
KEEPALIVE = 15.0


def _sse(event: WatchEvent, epoch_holder: list[str]) -> bytes:
    """One event as SSE: `event:` its type, `id:` epoch.revision (where to
    resume), `data:` the OperationEvent's JSON. An event about an operation is
    formatted once per stored state and epoch, not once per stream."""
    if event.epoch:
        epoch_holder[0] = event.epoch
    epoch = epoch_holder[0]
    if event.operation is None:
        return _format_sse(event, epoch)
    key = ("sse", int(event.type), event.revision, event.epoch, epoch)
    return convert.cached(event.operation, key, lambda: _format_sse(event, epoch))


def _format_sse(event: WatchEvent, epoch: str) -> bytes:
    head = {"revision": str(event.revision), "type": event.type.name}
    if event.epoch:
        head["epoch"] = event.epoch
    data = json.dumps(head, separators=(",", ":")).encode()
    if event.operation is not None:
        operation = convert.operation_json(event.operation)
        data = b"".join((data[:-1], b',"operation":', operation, b"}"))
    kind = event.type.name.lower()
    prefix = f"event: {kind}\nid: {epoch}.{event.revision}\ndata: ".encode()
    return b"".join((prefix, data, b"\n\n"))


class _QuietServer(uvicorn.Server):
    """uvicorn on the gRPC server's loop: signals stay the server's own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpListener:
    """Serves a Gateway with uvicorn as a task on the running loop."""

    def __init__(
        self,
        gateway: Gateway,
        listen: str,
        tls_cert: str = "",
        tls_key: str = "",
        *,
        reuse_port: bool = False,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]") or "127.0.0.1"
        self.listen = listen
        # With --workers every worker binds the port (SO_REUSEPORT) and the
        # kernel spreads connections over them, as for gRPC.
        self.reuse_port = reuse_port
        # With --tls-cert the HTTP side is HTTPS too, with the same certificate.
        config = uvicorn.Config(
            gateway.app,
            host=self.host,
            port=int(port),
            log_level="warning",
            lifespan="off",
            access_log=False,
            ssl_certfile=tls_cert or None,
            ssl_keyfile=tls_key or None,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.host, self._server.config.port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.listen} for HTTP: {exc.strerror}") from exc
        return sock

    async def start(self) -> int:
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve([sock]), name="headway-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
                raise OSError("HTTP listener did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, 5.0)
        self._task = None
