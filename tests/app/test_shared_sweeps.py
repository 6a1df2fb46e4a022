"""Sweeps on replicas sharing one Redis store: each lease expiry and each
retention delete happens once, however many replicas sweep at the same time."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from headway_server.app.service import OperationService
from headway_server.domain.model import StartSpec, TimelineType, Update
from headway_server.store.redis import RedisStore

if TYPE_CHECKING:
    from tests.redis_support import session_redis
else:
    from redis_support import session_redis

T0 = 10_000.0
REPLICAS = 3
OPERATIONS = 20


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Clock, list[OperationService]]]:
    namespace = "sweeps-" + secrets.token_hex(6)
    clock = Clock()
    stores = [RedisStore(session_redis().url, namespace=namespace) for _ in range(REPLICAS)]
    yield clock, [OperationService(s, retention=60.0, clock=clock) for s in stores]
    for store in stores:
        await store.close()


async def test_each_lease_expiry_and_retention_delete_happens_once(
    replicas: tuple[Clock, list[OperationService]],
) -> None:
    clock, services = replicas
    first = services[0]
    ids = []
    for i in range(OPERATIONS):
        op = await first.start(
            StartSpec(kind="sweep", heartbeat_timeout=10.0), operation_id=f"s{i}"
        )
        await first.update(op.id, Update(completed=1))
        ids.append(op.id)

    clock.now = T0 + 30  # every lease has run out
    stalled = await asyncio.gather(*(s.sweep() for s in services))
    assert sum(stalled) == OPERATIONS
    for op_id in ids:
        entries, _ = await first.timeline(op_id)
        assert [e.type for e in entries].count(TimelineType.STALLED) == 1

    for op_id in ids:
        await services[1].complete(op_id)
    clock.now = T0 + 1000  # past the retention
    deleted = await asyncio.gather(*(s.sweep() for s in services))
    assert sum(deleted) == OPERATIONS
    assert await first.store.counts() == {}
    # Each delete made one tombstone, at one revision.
    tombstones = [await first.store.tombstone(op_id) for op_id in ids]
    assert all(t is not None for t in tombstones)
    assert len({t.revision for t in tombstones if t is not None}) == OPERATIONS
