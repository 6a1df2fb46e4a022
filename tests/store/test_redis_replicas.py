"""Several processes on one Redis store, as the review of the store found them
going wrong: a flush noticed by a process that only sees others' writes, a
stale copy written into a new keyspace, a refusal judged on a stale copy,
Redis error replies that mean "not now"."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from headway_server.app.service import OperationService
from headway_server.domain.errors import Conflict, Deleted, StoreUnavailable
from headway_server.domain.model import Operation, StartSpec, State, Update
from headway_server.store.memory import MemoryStore
from headway_server.store.redis import RedisStore
from headway_server.store.resp import ReplyError

if TYPE_CHECKING:
    from tests.redis_support import session_redis
else:
    from redis_support import session_redis


@pytest.fixture
async def replicas() -> AsyncIterator[Callable[[], RedisStore]]:
    namespace = "replicas-" + secrets.token_hex(6)
    opened: list[RedisStore] = []

    def make() -> RedisStore:
        store = RedisStore(session_redis().url, namespace=namespace)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


async def flush(store: RedisStore) -> None:
    """Deletes the namespace's keys, as a FLUSHALL would (other tests share the server)."""
    keys = await store._exec("KEYS", store.key("*"))
    if keys:
        await store._exec("DEL", *keys)


async def test_a_process_that_only_sees_others_writes_notices_a_flush(
    replicas: Callable[[], RedisStore],
) -> None:
    a, b = replicas(), replicas()
    for i in range(5):
        await a.create(Operation(id=f"x{i}", spec=StartSpec()))
    await b.open()
    old_epoch = await b.epoch()
    seen = await b.revision()
    await flush(a)
    waiting = asyncio.ensure_future(b.wait_for_change(seen))
    # A keeps writing (into a new keyspace, whose revisions start again).
    for i in range(3):
        await a.create(Operation(id=f"y{i}", spec=StartSpec()))
    await asyncio.wait_for(waiting, 3.0)
    assert await b.epoch() != old_epoch
    assert await b.epoch() == await a.epoch()


@pytest.mark.parametrize("noticed", [False, True], ids=["unnoticed", "noticed-first"])
async def test_a_copy_from_before_a_flush_is_not_written_into_the_new_keyspace(
    replicas: Callable[[], RedisStore], noticed: bool
) -> None:
    a, b = replicas(), replicas()
    stale = await b.create(Operation(id="x", spec=StartSpec(), message="old world"))
    await flush(a)
    fresh = await a.create(Operation(id="x", spec=StartSpec(), message="new world"))
    assert fresh.revision == stale.revision  # the same number, another keyspace
    if noticed:
        # B's tailer hears of the new keyspace before B writes its old copy.
        for _ in range(100):
            if await b.epoch() == await a.epoch():
                break
            await asyncio.sleep(0.01)
        assert await b.epoch() == await a.epoch()
    with pytest.raises(Conflict):
        await b.replace(dataclasses.replace(stale, message="stale"), expected_revision=1)
    assert (await b.get("x")) == fresh


async def test_a_refusal_judged_on_a_stale_copy_is_judged_again(
    replicas: Callable[[], RedisStore],
) -> None:
    here = OperationService(replicas())
    elsewhere = OperationService(replicas())
    spec = StartSpec(kind="job")
    await here.start(spec, operation_id="job")
    await here.complete("job")  # this process's copy: SUCCEEDED
    await elsewhere.delete("job")
    await elsewhere.start(spec, operation_id="job")  # started again, by the same id
    result = await here.update("job", Update(completed=3))
    assert result.applied and result.operation.state is State.RUNNING


async def test_error_replies_that_mean_not_now_are_unavailable(
    replicas: Callable[[], RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = replicas()
    await store.open()

    async def loading(*args: Any) -> Any:
        raise ReplyError("LOADING Redis is loading the dataset in memory")

    monkeypatch.setattr(store._fast, "execute", loading)
    with pytest.raises(StoreUnavailable, match="cannot serve now: LOADING"):
        await store.check()


async def test_a_batch_fails_whole_when_the_store_is_unavailable() -> None:
    class Down(MemoryStore):
        async def get_cached(self, operation_id: str) -> Operation | None:
            raise StoreUnavailable("store redis://db.invalid:7000/0 is unavailable: refused")

    service = OperationService(Down())
    with pytest.raises(StoreUnavailable):
        await service.update_many([("a", Update(completed=1)), ("b", Update(completed=1))])


async def test_a_replace_of_an_operation_deleted_since_it_was_read_is_deleted(
    replicas: Callable[[], RedisStore],
) -> None:
    # A report judged on this process's copy while another deletes the
    # operation: its producer hears Deleted (leave it), not NotFound (register
    # it again), as when the deletion is seen before the read.
    here, elsewhere = replicas(), replicas()
    stored = await here.create(Operation(id="gone", spec=StartSpec()))
    await elsewhere.delete("gone")
    with pytest.raises(Deleted):
        await here.replace(
            dataclasses.replace(stored, message="late"), expected_revision=stored.revision
        )
