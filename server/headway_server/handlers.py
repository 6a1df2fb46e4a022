"""Registers servicers with grpc, built from their service descriptors.

The generated add_*Servicer_to_server functions serialize every response with
the message class's SerializeToString. Watch streams instead yield bytes they
have serialized once for all their watchers, so the handlers here pass bytes
through and serialize messages as usual. Each method is also wrapped, once, to
count its calls in the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from headway.v1 import progress_pb2 as pb

from headway_server import auth

log = logging.getLogger("headway.auth")

SERVICE = pb.DESCRIPTOR.services_by_name["ProgressTracker"]

_HANDLER_BY_SHAPE = {
    # (client streaming, server streaming)
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

# (method name, implementation, server streaming?) -> what grpc calls.
Wrap = Callable[[str, Callable[..., Any], bool], Callable[..., Any]]


class Undecodable:
    """What a request that is not a valid message of its type decodes to.

    grpc would answer a deserializer's exception with UNKNOWN and the
    exception's class in the message; this placeholder lets the handler answer
    INVALID_ARGUMENT in plain words instead (guarantee 4)."""

    __slots__ = ("message_type",)

    def __init__(self, message_type: str) -> None:
        self.message_type = message_type

    @property
    def problem(self) -> str:
        return f"the request is not a valid {self.message_type} message"


def _decoder(message_class: Any) -> Callable[[bytes], Any]:
    from_string = message_class.FromString
    name = message_class.DESCRIPTOR.full_name

    def decode(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError:
            return Undecodable(name)

    return decode


def _refusal(code: grpc.StatusCode, message: str, context: Any, streaming: bool) -> Any:
    """What a handler of either shape returns to end its call with `code`: a
    coroutine, or an async generator for a streaming response."""

    async def refuse() -> Any:
        await context.abort(code, message)

    async def refuse_stream() -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    return refuse_stream() if streaming else refuse()


def _refusing_undecodable(behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """`behaviour`, but a request that did not decode is INVALID_ARGUMENT. It
    returns the behaviour's own coroutine or generator: no layer per call."""

    def checked(request: Any, context: Any) -> Any:
        if type(request) is Undecodable:
            return _refusal(grpc.StatusCode.INVALID_ARGUMENT, request.problem, context, streaming)
        return behaviour(request, context)

    return checked


class Credentials:
    """The token table calls are checked against; replaced whole on reload."""

    def __init__(self, tokens: auth.TokenTable) -> None:
        self.tokens = tokens


_REPORTS = frozenset({"UpdateOperation", "ReportProgress", "BatchUpdateOperations"})
_WRITES = _REPORTS | {
    "StartOperation",
    "CompleteOperation",
    "FailOperation",
    "CancelOperation",
    "DeleteOperation",
    "ReportLogs",
}

_AUTH_STATUS = {
    auth.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    auth.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def admit(
    credentials: Credentials,
    method: str,
    metadata: Any,
    peer: Any = None,
) -> auth.Principal:
    """The caller, when its credentials carry the role `method` needs (any
    valid caller when `method` is empty), set as auth.current; denials and
    writes are logged with the principal's name, never the token. gRPC calls
    and the HTTP gateway's requests both come through here.

    Raises:
        auth.Unauthenticated, auth.PermissionDenied
    """
    principal = None
    try:
        principal = credentials.tokens.authenticate(metadata, peer)
        if method:
            auth.authorize(principal, method)
    except (auth.Unauthenticated, auth.PermissionDenied) as exc:
        log.warning(
            "call denied",
            extra={
                "method": method,
                "principal": principal.name if principal else "",
                "detail": str(exc),
            },
        )
        raise
    auth.current.set(principal)
    if method in _WRITES:
        # Who changed what: one line per write. Reports, many a second, at DEBUG.
        level = logging.DEBUG if method in _REPORTS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "write", extra={"method": method, "principal": principal.name})
    return principal


def _guarded(
    behaviour: Callable[..., Any], method: str, streaming: bool, credentials: Credentials
) -> Callable[..., Any]:
    """`behaviour` for callers whose token has the role `method` needs; it
    returns the behaviour's own coroutine or generator, with the caller set as
    auth.current for the call."""

    def checked(request: Any, context: Any) -> Any:
        try:
            admit(credentials, method, context.invocation_metadata(), context.auth_context())
        except (auth.Unauthenticated, auth.PermissionDenied) as exc:
            return _refusal(_AUTH_STATUS[type(exc)], str(exc), context, streaming)
        return behaviour(request, context)

    return checked


def uncounted(name: str, behaviour: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    """A Wrap that adds nothing but what grpc needs to see: a streaming
    behaviour as an async generator function (grpc tells the shapes apart by it)."""
    if not streaming:
        return behaviour

    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        async for message in behaviour(request, context):
            yield message

    return stream


def serialize(response: Any) -> bytes:
    """A response message's wire bytes; bytes are taken as already serialized."""
    if type(response) is bytes:
        return response
    return bytes(response.SerializeToString())


def add_service(
    server: grpc.aio.Server,
    service: ServiceDescriptor,
    servicer: Any,
    wrap: Wrap,
    credentials: Credentials | None = None,
) -> None:
    """Registers every method of `service` that `servicer` implements; with
    `credentials`, each call must carry a token with the role it needs."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            continue  # e.g. a newer health proto's method the servicer lacks: UNIMPLEMENTED
        request = message_factory.GetMessageClass(method.input_type)
        make = _HANDLER_BY_SHAPE[method.client_streaming, method.server_streaming]
        if not method.client_streaming:
            # (A streaming request's messages are checked as they are read.)
            behaviour = _refusing_undecodable(behaviour, method.server_streaming)
        if credentials is not None:
            behaviour = _guarded(behaviour, method.name, method.server_streaming, credentials)
        handlers[method.name] = make(
            wrap(method.name, behaviour, method.server_streaming),
            request_deserializer=_decoder(request),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    # Registered methods skip grpc's per-call generic lookup; not in grpc's stubs yet.
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
