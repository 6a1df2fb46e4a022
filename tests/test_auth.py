"""Bearer tokens and roles (issue 12, first part): a server with --auth-tokens
refuses calls without a known token (UNAUTHENTICATED) or without the role the
RPC needs (PERMISSION_DENIED); health stays open; the token file is checked at
start and re-read on reload; protected mode refuses an open address without
authentication."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_client import HeadwayClient, Unavailable
from headway_client._errors import HeadwayError as ClientError
from headway_server import auth
from headway_server.config import ServerConfig

if TYPE_CHECKING:
    from tests.conftest import ServerThread
else:
    from conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"reporter": ["report"], "reader": ["read"], "admin": ["admin"]}


def write_tokens(path: Path, names: dict[str, list[str]]) -> dict[str, str]:
    tokens = {name: auth.new_token() for name in names}
    path.write_text(
        "".join(auth.token_block(n, tokens[n], ["*"], roles) for n, roles in names.items())
    )
    return tokens


@pytest.fixture
def secured(
    tmp_path: Path, server_factory: Any
) -> Iterator[tuple[ServerThread, dict[str, str], Path]]:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, TOKENS)
    yield server_factory(auth_tokens=str(path)), tokens, path


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_calls_need_a_known_token(secured: Any) -> None:
    server, tokens, _ = secured
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        request = pb.ListOperationsRequest()
        for metadata in (
            (),
            (("authorization", "Basic dXNlcjpwYXNz"),),
            (("authorization", "Bearer "),),
            bearer("hw_not-a-token-anyone-was-given"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListOperations(request, metadata=metadata, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in (caught.value.details() or "")
        assert stub.ListOperations(request, metadata=bearer(tokens["reader"]), timeout=5)
        # Health stays open: orchestrators probe without credentials.
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_each_rpc_needs_its_role(secured: Any) -> None:
    server, tokens, _ = secured
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        as_reporter, as_reader, as_admin = (
            bearer(tokens[n]) for n in ("reporter", "reader", "admin")
        )
        start = pb.StartOperationRequest(kind="auth", project="acme")
        op = stub.StartOperation(start, metadata=as_reporter, timeout=5)
        get = pb.GetOperationRequest(operation_id=op.id)
        update = pb.UpdateOperationRequest(operation_id=op.id, completed=1)
        watch = pb.WatchOperationsRequest(filter=pb.OperationFilter(project="acme"))
        cancel = pb.CancelOperationRequest(operation_id=op.id)
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: stub.GetOperation(get, metadata=as_reporter, timeout=5)) == denied
        assert (
            code_of(lambda: stub.UpdateOperation(update, metadata=as_reader, timeout=5)) == denied
        )
        assert (
            code_of(lambda: list(stub.WatchOperations(watch, metadata=as_reporter, timeout=5)))
            == denied
        )
        assert (
            code_of(
                lambda: list(stub.ReportProgress(iter([update]), metadata=as_reader, timeout=5))
            )
            == denied
        )
        assert (
            code_of(lambda: stub.CancelOperation(cancel, metadata=as_reader, timeout=5)) == denied
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.CancelOperation(cancel, metadata=as_reporter, timeout=5)
        assert caught.value.details() == "role admin required for CancelOperation"
        # Allowed: each role its own calls; admin every one.
        assert stub.UpdateOperation(update, metadata=as_reporter, timeout=5).applied
        assert stub.GetOperation(get, metadata=as_reader, timeout=5).id == op.id
        assert stub.GetOperation(get, metadata=as_admin, timeout=5).completed == 1
        stub.CancelOperation(cancel, metadata=as_admin, timeout=5)


def test_the_python_client_sends_its_token(secured: Any) -> None:
    server, tokens, _ = secured
    with HeadwayClient(server.address, token=tokens["admin"], strict=True) as client:
        op = client.start_operation(kind="auth", project="py")
        assert client.get(op.id).id == op.id
    with (
        HeadwayClient(server.address, token="hw_wrong", strict=True) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.get(op.id)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert not isinstance(caught.value, Unavailable)


def test_a_reload_takes_new_tokens_and_keeps_the_old_ones_if_the_file_is_bad(
    secured: Any,
) -> None:
    server, tokens, path = secured
    added = write_tokens(path, {"newcomer": ["read"]})
    server.run(_reload(server))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        request = pb.ListOperationsRequest()
        stub.ListOperations(request, metadata=bearer(added["newcomer"]), timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.ListOperations(request, metadata=bearer(tokens["reader"]), timeout=5)
        path.write_text("[[token]]\nname = 'broken'\n")
        server.run(_reload(server))
        stub.ListOperations(request, metadata=bearer(added["newcomer"]), timeout=5)


async def _reload(server: ServerThread) -> None:
    assert server.server is not None
    server.server.reload_credentials()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[token]\n", "not valid TOML"),
        ('[[token]]\nname = "a"\nsha256 = "abc"\nprojects = ["*"]\nroles = ["read"]\n', ":3:"),
        (
            '[[token]]\nname = "a"\nsha256 = "' + "a" * 64 + '"\nprojects = []\nroles = ["read"]\n',
            "'projects'",
        ),
        (
            '[[token]]\nname = "a"\nsha256 = "'
            + "a" * 64
            + '"\nprojects = ["*"]\nroles = ["root"]\n',
            "'roles'",
        ),
        ('[[token]]\nname = "a"\npassword = "x"\n', "unknown key"),
    ],
)
def test_a_malformed_token_file_is_refused_with_its_line_and_reason(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(auth.AuthConfigError) as caught:
        auth.TokenTable.load(path)
    assert problem in str(caught.value)
    result = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--auth-tokens", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert problem in result.stderr


def test_protected_mode_refuses_an_open_address_without_authentication(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--auth-tokens FILE"):
        ServerConfig(listen="0.0.0.0:50051")
    ServerConfig(listen="0.0.0.0:50051", insecure=True)
    ServerConfig(listen="0.0.0.0:50051", auth_tokens=str(tmp_path / "t.toml"))
    for loopback in ("127.0.0.1:0", "localhost:50051", "[::1]:50051", "127.0.0.2:1"):
        ServerConfig(listen=loopback)
    result = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'client'}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "--insecure" in result.stderr


@pytest.fixture
def two_teams(tmp_path: Path, server_factory: Any) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    path = tmp_path / "tokens.toml"
    tokens = {name: auth.new_token() for name in ("acme", "beta", "both")}
    path.write_text(
        auth.token_block("acme", tokens["acme"], ["acme"], ["report", "read"])
        + auth.token_block("beta", tokens["beta"], ["beta"], ["report", "read"])
        + auth.token_block("both", tokens["both"], ["acme", "beta"], ["read"])
    )
    yield server_factory(auth_tokens=str(path)), tokens


def test_a_foreign_projects_operations_do_not_exist_for_a_token(two_teams: Any) -> None:
    server, tokens = two_teams
    acme, beta, both = (bearer(tokens[n]) for n in ("acme", "beta", "both"))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        mine = stub.StartOperation(
            pb.StartOperationRequest(kind="k", project="acme"), metadata=acme, timeout=5
        )
        theirs = stub.StartOperation(
            pb.StartOperationRequest(kind="k", project="beta"), metadata=beta, timeout=5
        )
        unknown = "op-" + "0" * 32

        def details(call: Any) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            text = caught.value.details() or ""
            return caught.value.code(), text.replace(theirs.id, "ID").replace(unknown, "ID")

        def of(op_id: str) -> list[Any]:
            def unary(method: Any, request: Any) -> Any:
                return lambda: method(request, metadata=acme, timeout=5)

            watch = pb.WatchOperationRequest(operation_id=op_id)
            return [
                unary(stub.GetOperation, pb.GetOperationRequest(operation_id=op_id)),
                unary(
                    stub.UpdateOperation, pb.UpdateOperationRequest(operation_id=op_id, completed=1)
                ),
                unary(stub.ListLogs, pb.ListLogsRequest(operation_id=op_id)),
                lambda: list(stub.WatchOperation(watch, metadata=acme, timeout=5)),
                unary(
                    stub.StartOperation,
                    pb.StartOperationRequest(kind="k", project="acme", parent_id=op_id),
                ),
            ]

        # A foreign operation answers exactly as one that does not exist.
        for foreign, missing in zip(of(theirs.id), of(unknown), strict=True):
            answer = details(foreign)
            assert answer[0] == grpc.StatusCode.NOT_FOUND
            assert answer == details(missing)
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert (
            details(
                lambda: stub.StartOperation(
                    pb.StartOperationRequest(kind="k", project="beta"), metadata=acme, timeout=5
                )
            )[0]
            == denied
        )
        assert (
            details(
                lambda: stub.ListOperations(
                    pb.ListOperationsRequest(filter=pb.OperationFilter(project="beta")),
                    metadata=acme,
                    timeout=5,
                )
            )[0]
            == denied
        )
        batch = stub.BatchUpdateOperations(
            pb.BatchUpdateOperationsRequest(
                updates=[
                    pb.UpdateOperationRequest(operation_id=mine.id, completed=1),
                    pb.UpdateOperationRequest(operation_id=theirs.id, completed=1),
                ]
            ),
            metadata=acme,
            timeout=5,
        )
        assert [r.error_code for r in batch.results] == [0, grpc.StatusCode.NOT_FOUND.value[0]]
        # Lists and statistics without a project see only the token's projects.
        listed = stub.ListOperations(pb.ListOperationsRequest(), metadata=acme, timeout=5)
        assert [op.project for op in listed.operations] == ["acme"]
        stats = stub.GetStats(pb.GetStatsRequest(), metadata=acme, timeout=5)
        assert sum(stats.counts_by_state.values()) == 1
        wide = stub.ListOperations(pb.ListOperationsRequest(), metadata=both, timeout=5)
        assert sorted(op.project for op in wide.operations) == ["acme", "beta"]


def test_a_watcher_of_everything_sees_nothing_of_a_busy_foreign_project(
    two_teams: Any, record: Any
) -> None:
    server, tokens = two_teams
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        watcher = record(
            stub.WatchOperations(
                pb.WatchOperationsRequest(min_interval=Duration()), metadata=acme, timeout=30
            )
        )
        events = []
        while True:
            message = watcher.next(timeout=5)
            events.extend(message.events)
            if any(e.type == pb.OperationEvent.SYNCED for e in message.events):
                break
        busy = stub.StartOperation(
            pb.StartOperationRequest(kind="k", project="beta"), metadata=beta, timeout=5
        )
        for i in range(20):
            stub.UpdateOperation(
                pb.UpdateOperationRequest(operation_id=busy.id, completed=i + 1),
                metadata=beta,
                timeout=5,
            )
        mine = stub.StartOperation(
            pb.StartOperationRequest(kind="k", project="acme"), metadata=acme, timeout=5
        )
        while not any(e.operation.id == mine.id for e in events):
            events.extend(watcher.next(timeout=5).events)
        assert {e.operation.project for e in events if e.operation.id} == {"acme"}


@pytest.mark.parametrize("guarded", [False, True])
def test_reflection_is_open_unless_auth_reflection(
    tmp_path: Path, server_factory: Any, guarded: bool
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"reader": ["read"]})
    server = server_factory(auth_tokens=str(path), auth_reflection=guarded)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        def services(metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
            (reply,) = list(
                stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5)
            )
            return [s.name for s in reply.list_services_response.service]

        if guarded:
            with pytest.raises(grpc.RpcError) as caught:
                services()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "headway.v1.ProgressTracker" in services(bearer(tokens["reader"]))
        else:
            assert "headway.v1.ProgressTracker" in services()


def test_limits_per_project_and_per_principal(tmp_path: Path, server_factory: Any) -> None:
    path = tmp_path / "tokens.toml"
    tokens = write_tokens(path, {"admin": ["admin"]})
    server = server_factory(
        auth_tokens=str(path),
        max_active_operations_per_project=2,
        max_watch_streams_per_principal=1,
    )
    as_admin = bearer(tokens["admin"])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)

        def start(project: str) -> pb.Operation:
            request = pb.StartOperationRequest(kind="k", project=project)
            return stub.StartOperation(request, metadata=as_admin, timeout=5)

        first, _ = start("acme"), start("acme")
        with pytest.raises(grpc.RpcError) as caught:
            start("acme")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-active-operations-per-project" in (caught.value.details() or "")
        start("beta")  # another project has its own count
        stub.CompleteOperation(
            pb.CompleteOperationRequest(operation_id=first.id), metadata=as_admin, timeout=5
        )
        start("acme")  # a finished one no longer counts

        watch = pb.WatchOperationsRequest(filter=pb.OperationFilter(project="acme"))
        held = stub.WatchOperations(watch, metadata=as_admin, timeout=30)
        next(iter(held))  # open and synced
        second = stub.WatchOperations(watch, metadata=as_admin, timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(second))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.cancel()
        deadline = time.monotonic() + 5
        while True:  # released once the server has seen the cancel
            again = stub.WatchOperations(watch, metadata=as_admin, timeout=5)
            try:
                next(iter(again))
                again.cancel()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


# --- JWT ------------------------------------------------------------------------------------


@pytest.fixture
def jwt_server(tmp_path: Path, server_factory: Any) -> Iterator[tuple[Any, Any, Path]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_file = tmp_path / "jwt.pem"
    key_file.write_bytes(public_pem)
    server = server_factory(
        auth_jwt_key=str(key_file),
        auth_jwt_issuer="https://issuer.example",
        auth_jwt_audience="headway",
    )
    yield server, private, key_file


def _jwt(private: Any, **overrides: Any) -> str:
    import time as clock

    import jwt

    claims = {
        "iss": "https://issuer.example",
        "aud": "headway",
        "sub": "svc-crawler",
        "exp": int(clock.time()) + 300,
        "projects": ["acme"],
        "roles": ["report", "read"],
    }
    claims.update(overrides)
    algorithm = str(claims.pop("alg", "ES256"))
    return str(jwt.encode({k: v for k, v in claims.items() if v is not None}, private, algorithm))


def test_jwt_bearer_tokens_carry_projects_and_roles(jwt_server: Any) -> None:
    import time as clock

    import jwt

    server, private, _ = jwt_server
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)

        def start(token: str, project: str = "acme") -> pb.Operation:
            request = pb.StartOperationRequest(kind="k", project=project)
            return stub.StartOperation(request, metadata=bearer(token), timeout=5)

        assert start(_jwt(private)).project == "acme"
        with pytest.raises(grpc.RpcError) as caught:
            start(_jwt(private), project="beta")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        forged_hmac = str(jwt.encode({"projects": ["*"]}, "s" * 32, "HS256"))
        for token, problem in (
            (_jwt(private, exp=int(clock.time()) - 10), "token expired"),
            (_jwt(private, iss="https://elsewhere"), "token invalid"),
            (_jwt(private, aud="another-service"), "token invalid"),
            (_jwt(private, exp=None), "token invalid"),
            (_jwt(private, roles=["root"]), "claim 'roles'"),
            (forged_hmac, "token invalid"),
            (_jwt(private)[:-4] + "AAAA", "token invalid"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                start(token)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
            assert problem in (caught.value.details() or ""), caught.value.details()


def test_a_jwks_file_picks_the_key_by_kid(tmp_path: Path, server_factory: Any) -> None:
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in "ab"}
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.public_key())), "kid": kid}
            for kid, k in keys.items()
        ]
    }
    key_file = tmp_path / "jwks.json"
    key_file.write_text(json.dumps(jwks))
    server = server_factory(
        auth_jwt_key=str(key_file),
        auth_jwt_issuer="https://issuer.example",
        auth_jwt_audience="headway",
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        for kid, key in keys.items():
            token = jwt.encode(
                {
                    "iss": "https://issuer.example",
                    "aud": "headway",
                    "exp": 4102444800,
                    "projects": ["*"],
                    "roles": ["read"],
                },
                key,
                "RS256",
                headers={"kid": kid},
            )
            stub.ListOperations(pb.ListOperationsRequest(), metadata=bearer(token), timeout=5)


def test_a_jwt_key_that_is_not_asymmetric_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.pem"
    key_file.write_text("not a key")
    with pytest.raises(auth.AuthConfigError, match="not a PEM public key or JWKS"):
        auth.load(jwt_key=str(key_file), jwt_issuer="i", jwt_audience="a")


def test_writes_and_denials_are_logged_with_the_principals_name_never_the_token(
    secured: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server, tokens, _ = secured
    caplog.set_level("INFO", logger="headway.auth")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        stub.StartOperation(
            pb.StartOperationRequest(kind="k", project="p"),
            metadata=bearer(tokens["reporter"]),
            timeout=5,
        )
        with pytest.raises(grpc.RpcError):
            stub.DeleteOperation(
                pb.DeleteOperationRequest(operation_id="op-x"),
                metadata=bearer(tokens["reader"]),
                timeout=5,
            )
    records = [
        (r.getMessage(), getattr(r, "principal", ""), getattr(r, "method", ""))
        for r in caplog.records
    ]
    assert ("write", "reporter", "StartOperation") in records
    assert ("call denied", "reader", "DeleteOperation") in records
    assert not any(t in caplog.text for t in tokens.values())


def test_sighup_re_reads_the_token_file_of_a_running_server(tmp_path: Path) -> None:
    import os
    import signal as signals

    if TYPE_CHECKING:
        from tests.redis_e2e import ServerProcess
        from tests.redis_support import free_port
    else:
        from redis_e2e import ServerProcess
        from redis_support import free_port

    path = tmp_path / "tokens.toml"
    first = write_tokens(path, {"first": ["read"]})
    server = ServerProcess("memory", free_port(), "--auth-tokens", str(path)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ProgressTrackerStub(channel)
            request = pb.ListOperationsRequest()
            stub.ListOperations(request, metadata=bearer(first["first"]), timeout=5)
            second = write_tokens(path, {"second": ["read"]})
            assert server.process is not None
            os.kill(server.process.pid, signals.SIGHUP)
            deadline = time.monotonic() + 10
            while True:
                try:
                    stub.ListOperations(request, metadata=bearer(second["second"]), timeout=5)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, "SIGHUP did not load the new file"
                    time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListOperations(request, metadata=bearer(first["first"]), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def test_under_authentication_a_child_is_in_its_parents_project(
    tmp_path: Path, server_factory: Any
) -> None:
    path = tmp_path / "tokens.toml"
    token = auth.new_token()
    path.write_text(auth.token_block("ops", token, ["acme", "beta"], ["report", "read"]))
    server = server_factory(auth_tokens=str(path))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        ops = bearer(token)

        def start(project: str, parent_id: str = "") -> pb.Operation:
            request = pb.StartOperationRequest(kind="k", project=project, parent_id=parent_id)
            return stub.StartOperation(request, metadata=ops, timeout=5)

        parent = start("acme")
        assert start("acme", parent.id).parent_id == parent.id
        # A beta child would show beta's progress to acme's readers, in the roll-up.
        with pytest.raises(grpc.RpcError) as caught:
            start("beta", parent.id)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "parent_id" in (caught.value.details() or "")


def test_an_id_taken_in_a_foreign_project_says_nothing_of_it(two_teams: Any) -> None:
    server, tokens = two_teams
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        taken = pb.StartOperationRequest(operation_id="op-shared-name", kind="k", project="beta")
        stub.StartOperation(taken, metadata=bearer(tokens["beta"]), timeout=5)
        mine = pb.StartOperationRequest(operation_id="op-shared-name", kind="k", project="acme")
        with pytest.raises(grpc.RpcError) as caught:
            stub.StartOperation(mine, metadata=bearer(tokens["acme"]), timeout=5)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert caught.value.details() == "operation id 'op-shared-name' is not available"
