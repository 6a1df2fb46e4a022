"""TLS and mTLS on a real socket with real certificates (trustme): a plaintext
client cannot talk to a TLS server; with mTLS a client needs a certificate the
configured CA signed, and its subject is a principal with its projects."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_client import HeadwayClient
from headway_client._errors import HeadwayError as ClientError
from headway_server import auth


def pem(path: Path, blob: Any) -> str:
    blob.write_to_path(str(path))
    return str(path)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_files(tmp_path: Path, ca: trustme.CA) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return {
        "tls_cert": pem(tmp_path / "server.pem", cert.cert_chain_pems[0]),
        "tls_key": pem(tmp_path / "server.key", cert.private_key_pem),
        "ca": pem(tmp_path / "ca.pem", ca.cert_pem),
    }


def test_tls_serves_tls_clients_only(server_factory: Any, server_files: dict[str, str]) -> None:
    server = server_factory(tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"])
    with HeadwayClient(server.address, tls_ca=server_files["ca"], strict=True) as client:
        op = client.start_operation(kind="tls", project="p")
        assert client.get(op.id).id == op.id
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ProgressTrackerStub(channel).ListOperations(
                pb.ListOperationsRequest(), timeout=3
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def mtls(
    tmp_path: Path, server_factory: Any, server_files: dict[str, str], ca: trustme.CA
) -> Iterator[tuple[Any, Path]]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        '[[client]]\nsubject = "worker.acme.internal"\nprojects = ["acme"]\n'
        'roles = ["report", "read"]\n'
    )
    server = server_factory(
        tls_cert=server_files["tls_cert"],
        tls_key=server_files["tls_key"],
        tls_client_ca=server_files["ca"],
        auth_tokens=str(tokens),
    )
    yield server, tmp_path


def client_cert(ca: trustme.CA, directory: Path, subject: str) -> tuple[str, str]:
    cert = ca.issue_cert(subject)
    return (
        pem(directory / f"{subject}.pem", cert.cert_chain_pems[0]),
        pem(directory / f"{subject}.key", cert.private_key_pem),
    )


def test_mtls_subjects_are_principals_with_their_projects(
    mtls: Any, ca: trustme.CA, server_files: dict[str, str]
) -> None:
    server, directory = mtls
    cert, key = client_cert(ca, directory, "worker.acme.internal")
    with HeadwayClient(
        server.address, tls_ca=server_files["ca"], tls_cert=cert, tls_key=key, strict=True
    ) as client:
        op = client.start_operation(kind="m", project="acme")
        assert client.get(op.id).project == "acme"
        with pytest.raises(ClientError) as caught:
            client.start_operation(kind="m", project="beta")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    # A certificate the CA signed for a subject nobody listed: UNAUTHENTICATED.
    cert, key = client_cert(ca, directory, "stranger.internal")
    with (
        HeadwayClient(
            server.address, tls_ca=server_files["ca"], tls_cert=cert, tls_key=key, strict=True
        ) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.list()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_refuses_clients_without_a_certificate_of_its_ca(
    mtls: Any, server_files: dict[str, str]
) -> None:
    server, directory = mtls
    other = trustme.CA()
    cert, key = client_cert(other, directory, "worker.acme.internal")
    no_cert: dict[str, Any] = {}
    for options in (no_cert, {"tls_cert": cert, "tls_key": key}):
        with HeadwayClient(
            server.address, tls_ca=server_files["ca"], strict=True, timeout=3, **options
        ) as client:
            with pytest.raises(ClientError) as caught:
                client.list()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_client_entry_is_checked_like_a_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[client]]\nsubject = "a"\nprojects = ["*"]\nroles = ["root"]\n')
    with pytest.raises(auth.AuthConfigError, match=r":4: client #1: 'roles'"):
        auth.TokenTable.load(path)


def test_the_http_gateway_serves_https_with_the_same_certificate(
    server_factory: Any, server_files: dict[str, str]
) -> None:
    server = server_factory(
        http_listen="127.0.0.1:0",
        tls_cert=server_files["tls_cert"],
        tls_key=server_files["tls_key"],
    )
    port = server.server.http_port
    with httpx.Client(verify=ssl.create_default_context(cafile=server_files["ca"])) as client:
        assert client.get(f"https://127.0.0.1:{port}/v1/stats").status_code == 200
    with httpx.Client() as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://127.0.0.1:{port}/v1/stats", timeout=3)
