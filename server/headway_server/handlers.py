"""Registers the ProgressTracker servicer with grpc, built from the service descriptor.

The generated add_ProgressTrackerServicer_to_server serializes every response
with the message class's SerializeToString. Watch streams instead yield bytes
they have already serialized once for all their watchers, so the handlers here
pass bytes through and serialize messages as usual.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import message_factory
from headway.v1 import progress_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ProgressTracker"]

_HANDLER_BY_SHAPE = {
    # (client streaming, server streaming)
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def serialize(response: Any) -> bytes:
    """A response message's wire bytes; bytes are taken as already serialized."""
    if type(response) is bytes:
        return response
    return bytes(response.SerializeToString())


def add_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers every method of the service, as the generated function does."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        make = _HANDLER_BY_SHAPE[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    # Registered methods skip grpc's per-call generic lookup; not in grpc's stubs yet.
    server.add_registered_method_handlers(SERVICE.full_name, handlers)  # type: ignore[attr-defined]
