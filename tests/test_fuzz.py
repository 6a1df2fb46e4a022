"""Hypothesis over every RPC: random bytes, and requests with extreme values in
every field. Every answer is a documented status (never UNKNOWN or INTERNAL),
the server stays SERVING, and a rejected call changes nothing (issue 12)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server.handlers import SERVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ABORTED,
    # A stream cut short by the test's own deadline.
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
METHODS = {m.name: m for m in SERVICE.methods}

_INTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63)])
)
_UINTS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1]))
_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, float("nan"), float("inf")]),
)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "op-1", "x" * 5000, "ü" * 300, "a/b\\c", "\x00", "*"]),
)


def _value(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_MESSAGE:
        message_type = field.message_type
        assert message_type is not None
        if depth > 3:
            return st.none()
        if message_type.full_name == "google.protobuf.Struct":
            return st.recursive(
                st.dictionaries(st.text(max_size=8), st.one_of(st.none(), _FLOATS, _TEXT)),
                lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3),
                max_leaves=20,
            )
        return message(message_factory.GetMessageClass(message_type), depth + 1)
    if kind in (d.FieldDescriptor.TYPE_STRING,):
        return _TEXT
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return _FLOATS if kind == d.FieldDescriptor.TYPE_DOUBLE else st.floats(width=32)
    if kind == d.FieldDescriptor.TYPE_ENUM:
        return st.integers(-5, 50)  # unknown values included
    if kind in (d.FieldDescriptor.TYPE_UINT64, d.FieldDescriptor.TYPE_FIXED64):
        return _UINTS
    if kind in (d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    return _INTS


def message(cls: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    fields = [f for f in cls.DESCRIPTOR.fields]

    @st.composite
    def build(draw: Any) -> Any:
        msg = cls()
        for field in fields:
            if not draw(st.booleans()):
                continue
            strategy = _value(field, depth)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key = _value(field.message_type.fields_by_name["key"], depth)
                val = _value(field.message_type.fields_by_name["value"], depth)
                for k, v in draw(st.dictionaries(key, val, max_size=3)).items():
                    _set_map(getattr(msg, field.name), k, v)
                continue
            if field.is_repeated:
                for value in draw(st.lists(strategy, max_size=3)):
                    _append(getattr(msg, field.name), field, value)
                continue
            value = draw(strategy)
            if value is None:
                continue
            _assign(msg, field, value)
        return msg

    return build()


def _assign(msg: Any, field: d.FieldDescriptor, value: Any) -> None:
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        if isinstance(value, dict):
            getattr(msg, field.name).update(value)
        else:
            getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def _append(container: Any, field: d.FieldDescriptor, value: Any) -> None:
    if value is None:
        return
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        if isinstance(value, dict):
            container.add().update(value)
        else:
            container.add().CopyFrom(value)
    else:
        container.append(value)


def _set_map(container: Any, key: Any, value: Any) -> None:
    if value is None:
        return
    if hasattr(container, "get_or_create"):
        if isinstance(value, dict):
            container.get_or_create(key).update(value)
        else:
            container[key].CopyFrom(value)
    else:
        container[key] = value


def call(
    channel: grpc.Channel, name: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
) -> grpc.StatusCode:
    method = METHODS[name]
    path = f"/{SERVICE.full_name}/{name}"
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming:
            reply = channel.stream_stream(path, **raw)(
                iter([payload]), timeout=2, metadata=metadata
            )
            list(reply)
        elif method.server_streaming:
            stream = channel.unary_stream(path, **raw)(payload, timeout=2, metadata=metadata)
            next(iter(stream), None)  # the first message is enough; then cancel
            stream.cancel()
        else:
            channel.unary_unary(path, **raw)(payload, timeout=2, metadata=metadata)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def _serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


_FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_random_bytes_get_documented_answers(grpc_addr: str, name: str) -> None:
    with grpc.insecure_channel(grpc_addr) as channel:

        @_FUZZ
        @given(payload=st.binary(max_size=200))
        def run(payload: bytes) -> None:
            assert call(channel, name, payload) in DOCUMENTED

        run()
        assert _serving(channel)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_extreme_values_get_documented_answers_and_refusals_change_nothing(
    grpc_addr: str, grpc_stub: pb_grpc.ProgressTrackerStub, name: str
) -> None:
    request_class = message_factory.GetMessageClass(METHODS[name].input_type)
    with grpc.insecure_channel(grpc_addr) as channel:

        @_FUZZ
        @given(request=message(request_class))
        def run(request: Any) -> None:
            before = grpc_stub.ListOperations(pb.ListOperationsRequest(), timeout=5).revision
            code = call(channel, name, request.SerializeToString())
            assert code in DOCUMENTED, (code, request)
            if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
                after = grpc_stub.ListOperations(pb.ListOperationsRequest(), timeout=5).revision
                assert after == before, (code, request)

        run()
        assert _serving(channel)


def test_with_authentication_every_answer_is_documented_too(
    tmp_path: Any, server_factory: Any
) -> None:
    from headway_server import auth

    path = tmp_path / "tokens.toml"
    token = auth.new_token()
    path.write_text(auth.token_block("fuzz", token, ["acme"], ["report", "read"]))
    server = server_factory(auth_tokens=str(path))
    allowed = DOCUMENTED | {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
    with grpc.insecure_channel(server.address) as channel:
        for name, method in sorted(METHODS.items()):
            _authenticated_run(channel, name, method, token, allowed)()
        assert _serving(channel)


def _authenticated_run(
    channel: grpc.Channel, name: str, method: Any, token: str, allowed: set[grpc.StatusCode]
) -> Any:
    request_class = message_factory.GetMessageClass(method.input_type)
    credentials = [(), (("authorization", f"Bearer {token}"),), (("authorization", "Bearer x"),)]

    @_FUZZ
    @given(request=message(request_class), metadata=st.sampled_from(credentials))
    def run(request: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        code = call(channel, name, request.SerializeToString(), metadata)
        assert code in allowed, (name, code, request)

    return run
