"""OperationService.update_many: the same outcome as the reports one by one,
written together (one round trip to a shared store), on every store."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from headway_server.app.service import OperationService, UpdateResult
from headway_server.domain.errors import HeadwayError
from headway_server.domain.model import Operation, StageSpec, StartSpec, Update
from headway_server.store.base import OperationStore
from headway_server.store.memory import MemoryStore
from headway_server.store.redis import RedisStore

if TYPE_CHECKING:
    from tests.redis_support import session_redis
else:
    from redis_support import session_redis

T0 = 10_000.0
SPEC = StartSpec(
    kind="ingest",
    project="acme",
    total=10,
    stages=(StageSpec("fetch", 1.0), StageSpec("index", 1.0)),
)


def clock() -> float:
    return T0


@pytest.fixture(params=["memory", "redis"])
async def new_store(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., OperationStore]]:
    opened: list[OperationStore] = []
    namespace = "batch-" + secrets.token_hex(6)

    def make() -> OperationStore:
        store: OperationStore
        if request.param == "memory":
            store = MemoryStore()
        else:
            # Every store made by one test shares a namespace: replicas of one Headway.
            store = RedisStore(session_redis().url, namespace=namespace)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def outcome(result: UpdateResult | HeadwayError) -> tuple[Any, ...]:
    if isinstance(result, HeadwayError):
        return (type(result).__name__, str(result))
    op = result.operation
    return (result.applied, op.revision, op.completed, op.stage, op.last_sequence, op.state)


REPORTS = [
    ("a", Update(sequence=1, completed=2)),
    ("b", Update(sequence=1, stage="fetch")),
    ("a", Update(sequence=2, completed=4)),
    ("a", Update(sequence=2, completed=9)),  # a retry: a duplicate of the one before
    ("missing", Update(completed=1)),
    ("b", Update(stage="nope")),  # not in the plan
    ("a", Update(sequence=3, completed=11)),  # above total
    ("b", Update(sequence=2, stage="index", stage_completed=1, stage_total=2)),
    ("a", Update(sequence=1, completed=1)),  # late: a duplicate
]


async def started(store: OperationStore) -> OperationService:
    service = OperationService(store, clock=clock)
    for op_id in ("a", "b"):
        await service.start(SPEC, operation_id=op_id)
    return service


async def test_a_batch_ends_as_the_reports_one_by_one(
    new_store: Callable[[], OperationStore],
) -> None:
    alone = await started(MemoryStore())
    expected = []
    for op_id, update in REPORTS:
        try:
            expected.append(outcome(await alone.update(op_id, update)))
        except HeadwayError as exc:
            expected.append(outcome(exc))
    together = await started(new_store())
    got = [outcome(r) for r in await together.update_many(REPORTS)]
    assert got == expected
    for op_id in ("a", "b"):
        assert await together.get(op_id) == await alone.get(op_id)
        assert await together.timeline(op_id) == await alone.timeline(op_id)


async def test_a_batch_judged_on_a_stale_copy_is_judged_again(
    new_store: Callable[[], OperationStore],
) -> None:
    store = new_store()
    here = await started(store)
    await here.update("a", Update(sequence=1, completed=1))  # this process's copy
    # Another replica (on a shared store; on memory, the same one) moves it on.
    elsewhere = OperationService(
        store if isinstance(store, MemoryStore) else new_store(), clock=clock
    )
    await elsewhere.update("a", Update(sequence=2, completed=5, total=20))
    results = await here.update_many(
        [
            ("a", Update(sequence=2, completed=6)),  # a duplicate, seen only on the store
            ("a", Update(sequence=3, completed=15)),  # above the stale total, not the real one
        ]
    )
    assert [outcome(r)[:3] for r in results] == [(False, 4, 5), (True, 5, 15)]
    stored = await elsewhere.get("a")
    assert isinstance(stored, Operation)
    assert (stored.completed, stored.total, stored.last_sequence) == (15, 20, 3)
