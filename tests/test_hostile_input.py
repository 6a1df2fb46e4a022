"""Bytes that are not a valid request get INVALID_ARGUMENT in plain words, on
every RPC and every call shape, and change nothing (README guarantee 4)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server.handlers import SERVICE

# Not a protobuf message whatever its type: a tag no field can have (field 0),
# and a length-delimited field running past the end.
GARBAGE = [b"\xff\xff\xff\x0f\x01garbage", b"\x0a\xff\x01"]


def _raw(channel: grpc.Channel, method: object) -> object:
    path = f"/{SERVICE.full_name}/{method.name}"  # type: ignore[attr-defined]
    shape = (method.client_streaming, method.server_streaming)  # type: ignore[attr-defined]
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[shape]
    return make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
@pytest.mark.parametrize("garbage", GARBAGE, ids=["field-zero", "truncated"])
def test_bytes_that_are_no_message_are_invalid_argument(
    grpc_addr: str, grpc_stub: pb_grpc.ProgressTrackerStub, method: object, garbage: bytes
) -> None:
    before = grpc_stub.ListOperations(pb.ListOperationsRequest(), timeout=5)
    with grpc.insecure_channel(grpc_addr) as channel:
        call = _raw(channel, method)
        request = iter([garbage]) if method.client_streaming else garbage  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as caught:
            reply = call(request, timeout=5)  # type: ignore[operator]
            if method.server_streaming:  # type: ignore[attr-defined]
                list(reply)
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        details = error.details() or ""
        assert details.startswith("the request is not a valid headway.v1."), details
        assert "Error" not in details and "class" not in details
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = grpc_stub.ListOperations(pb.ListOperationsRequest(), timeout=5)
    assert after.revision == before.revision


@pytest.mark.parametrize("method", ["GetOperation", "UpdateOperation", "CancelOperation"])
def test_a_string_that_is_not_utf8_is_invalid_argument(grpc_addr: str, method: str) -> None:
    # Field 1 (operation_id, a string) holding bytes that are not UTF-8.
    with grpc.insecure_channel(grpc_addr) as channel:
        call = channel.unary_unary(
            f"/{SERVICE.full_name}/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(b"\x0a\x02\xc3\x28", timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
