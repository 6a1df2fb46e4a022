"""How the Redis store reaches Redis: a password, TLS (rediss://), a unix
socket, a database number; and a wrong password is UNAVAILABLE naming the store
(never the password)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from headway_server.domain.errors import StoreUnavailable
from headway_server.domain.model import Operation, StartSpec
from headway_server.store.redis import RedisStore

if TYPE_CHECKING:
    from tests.redis_support import RedisServer, free_port
else:
    from redis_support import RedisServer, free_port


def op(op_id: str) -> Operation:
    return Operation(id=op_id, spec=StartSpec(kind="conn"))


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisStore]]:
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        await store.close()


async def round_trip(url: str, stores: list[RedisStore]) -> None:
    """Writes through one store, and another (a second process) sees it: its
    reads and its tailer's subscription go over the same kind of connection."""
    writer = RedisStore(url)
    reader = RedisStore(url)
    stores += [writer, reader]
    await reader.open()
    before = await reader.revision()
    waiting = asyncio.ensure_future(reader.wait_for_change(before))
    stored = await writer.create(op("a"))
    assert await asyncio.wait_for(waiting, 5.0) == stored.revision
    assert await reader.get("a") == stored


async def test_a_password_and_a_database_number(tmp_path: Path, stores: list[RedisStore]) -> None:
    redis = RedisServer(tmp_path, extra=["--requirepass", "s3cret word"]).start()
    try:
        await round_trip(f"redis://:s3cret%20word@127.0.0.1:{redis.port}/3", stores)
        wrong = RedisStore(f"redis://:nope@127.0.0.1:{redis.port}/3")
        stores.append(wrong)
        with pytest.raises(StoreUnavailable) as refused:
            await wrong.get("a")
        message = str(refused.value)
        assert f"redis://127.0.0.1:{redis.port}/3" in message
        assert "nope" not in message
    finally:
        redis.stop(kill=True)


async def test_tls(tmp_path: Path, stores: list[RedisStore]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    cert_file = tmp_path / "cert.pem"
    key_file = tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls_port = free_port()
    redis = RedisServer(
        tmp_path,
        extra=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-ca-cert-file",
            str(ca_file),
            "--tls-auth-clients",
            "no",
        ],
    ).start()
    try:
        await round_trip(f"rediss://localhost:{tls_port}/0?ssl_ca_certs={ca_file}", stores)
        # A certificate from a CA the store does not trust is refused.
        untrusted = RedisStore(f"rediss://localhost:{tls_port}/0")
        stores.append(untrusted)
        with pytest.raises(StoreUnavailable):
            await untrusted.get("a")
    finally:
        redis.stop(kill=True)


async def test_a_unix_socket(tmp_path: Path, stores: list[RedisStore]) -> None:
    path = tmp_path / "redis.sock"
    redis = RedisServer(tmp_path, extra=["--unixsocket", str(path)]).start()
    try:
        await round_trip(f"unix://{path}?db=2", stores)
    finally:
        redis.stop(kill=True)
