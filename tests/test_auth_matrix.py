"""Every RPC with every kind of credential (issue 12): no credentials, malformed,
unknown token, expired JWT, wrong issuer or audience, missing role, a foreign
project, and the allowed case, on one server with a token file and a JWT key."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server import auth
from headway_server.handlers import SERVICE

ISSUER, AUDIENCE = "https://issuer.example", "headway"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# RPCs whose request names an operation (a foreign one is NOT_FOUND); the others
# name a project (a foreign one is PERMISSION_DENIED).
NAMES_OPERATION = {
    "UpdateOperation",
    "ReportProgress",
    "BatchUpdateOperations",
    "CompleteOperation",
    "FailOperation",
    "ReportLogs",
    "GetOperation",
    "WatchOperation",
    "ListLogs",
    "GetTimeline",
    "CancelOperation",
    "DeleteOperation",
}


def request_for(name: str, op_id: str) -> Any:
    update = pb.UpdateOperationRequest(operation_id=op_id, completed=1)
    acme = pb.OperationFilter(project="acme")
    return {
        "StartOperation": pb.StartOperationRequest(kind="m", project="acme"),
        "UpdateOperation": update,
        "ReportProgress": update,
        "BatchUpdateOperations": pb.BatchUpdateOperationsRequest(updates=[update]),
        "CompleteOperation": pb.CompleteOperationRequest(operation_id=op_id),
        "FailOperation": pb.FailOperationRequest(
            operation_id=op_id, error=pb.OperationError(code="E", message="m")
        ),
        "ReportLogs": pb.ReportLogsRequest(
            operation_id=op_id, entries=[pb.LogEntry(level=pb.LogEntry.INFO, message="m")]
        ),
        "GetOperation": pb.GetOperationRequest(operation_id=op_id),
        "ListOperations": pb.ListOperationsRequest(filter=acme),
        "WatchOperation": pb.WatchOperationRequest(operation_id=op_id),
        "WatchOperations": pb.WatchOperationsRequest(filter=acme),
        "ListLogs": pb.ListLogsRequest(operation_id=op_id),
        "GetTimeline": pb.GetTimelineRequest(operation_id=op_id),
        "GetStats": pb.GetStatsRequest(filter=acme),
        "CancelOperation": pb.CancelOperationRequest(operation_id=op_id),
        "DeleteOperation": pb.DeleteOperationRequest(operation_id=op_id),
    }[name]


def invoke(stub: Any, name: str, request: Any, metadata: Any) -> grpc.StatusCode:
    method = getattr(stub, name)
    shape = {m.name: m for m in SERVICE.methods}[name]
    try:
        if shape.client_streaming:
            for ack in method(iter([request]), metadata=metadata, timeout=5):
                if ack.error_code:
                    return _status(ack.error_code)
        elif shape.server_streaming:
            stream = method(request, metadata=metadata, timeout=5)
            next(iter(stream))
            stream.cancel()
        else:
            reply = method(request, metadata=metadata, timeout=5)
            if name == "BatchUpdateOperations" and reply.results[0].error_code:
                return _status(reply.results[0].error_code)
    except grpc.RpcError as exc:
        status: grpc.StatusCode = exc.code()
        return status
    return grpc.StatusCode.OK


def _status(number: int) -> grpc.StatusCode:
    """The status an ack's error_code number stands for."""
    return next(c for c in grpc.StatusCode if c.value[0] == number)


@pytest.fixture
def matrix_server(
    tmp_path: Path, server_factory: Any
) -> Iterator[tuple[Any, dict[str, Any], Callable[[], str]]]:
    private = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    tokens = {name: auth.new_token() for name in ("admin", "reader", "reporter", "beta")}
    path = tmp_path / "tokens.toml"
    path.write_text(
        auth.token_block("admin", tokens["admin"], ["acme"], ["admin"])
        + auth.token_block("reader", tokens["reader"], ["acme"], ["read"])
        + auth.token_block("reporter", tokens["reporter"], ["acme"], ["report"])
        + auth.token_block("beta", tokens["beta"], ["beta"], ["admin"])
    )
    server = server_factory(
        auth_tokens=str(path),
        auth_jwt_key=str(key_file),
        auth_jwt_issuer=ISSUER,
        auth_jwt_audience=AUDIENCE,
    )

    def signed(**claims: Any) -> str:
        base = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "exp": int(time.time()) + 300,
            "projects": ["acme"],
            "roles": ["admin"],
        }
        return str(jwt.encode({**base, **claims}, private, "ES256"))

    credentials: dict[str, Any] = {
        "none": (),
        "malformed": (("authorization", "Token abc"),),
        "unknown token": (("authorization", "Bearer hw_nobody-has-this"),),
        "expired JWT": (("authorization", f"Bearer {signed(exp=int(time.time()) - 5)}"),),
        "wrong issuer": (("authorization", f"Bearer {signed(iss='https://evil')}"),),
        "wrong audience": (("authorization", f"Bearer {signed(aud='other')}"),),
        "jwt": (("authorization", f"Bearer {signed()}"),),
        **{name: (("authorization", f"Bearer {t}"),) for name, t in tokens.items()},
    }

    def new_op() -> str:
        with grpc.insecure_channel(server.address) as channel:
            op = pb_grpc.ProgressTrackerStub(channel).StartOperation(
                pb.StartOperationRequest(kind="m", project="acme"),
                metadata=credentials["admin"],
                timeout=5,
            )
            return str(op.id)

    yield server, credentials, new_op


@pytest.mark.parametrize("name", [m.name for m in SERVICE.methods])
def test_every_rpc_with_every_kind_of_credential(matrix_server: Any, name: str) -> None:
    server, credentials, new_op = matrix_server
    role = auth.METHOD_ROLES[name]
    lacking = {auth.Role.READ: "reporter", auth.Role.REPORT: "reader", auth.Role.ADMIN: "reader"}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        for case in ("none", "malformed", "unknown token", "expired JWT"):
            assert invoke(stub, name, request_for(name, new_op()), credentials[case]) == (
                UNAUTHENTICATED
            ), case
        for case in ("wrong issuer", "wrong audience"):
            assert invoke(stub, name, request_for(name, new_op()), credentials[case]) == (
                UNAUTHENTICATED
            ), case
        assert invoke(stub, name, request_for(name, new_op()), credentials[lacking[role]]) == (
            DENIED
        )
        foreign = invoke(stub, name, request_for(name, new_op()), credentials["beta"])
        assert foreign == (NOT_FOUND if name in NAMES_OPERATION else DENIED)
        for case in ("admin", "jwt"):
            allowed = invoke(stub, name, request_for(name, new_op()), credentials[case])
            assert allowed not in (UNAUTHENTICATED, DENIED, NOT_FOUND), (case, allowed)
