"""The store contract (store/base.py), run against every store implementation.

To add a store, add a factory to STORE_FACTORIES: it takes the limits as keyword
arguments and returns a fresh, empty store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest
from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    HistoryCompacted,
    NotFound,
    ResourceExhausted,
)
from headway_server.domain.model import (
    ChildProgress,
    HeldOperation,
    LogEntry,
    LogLevel,
    Operation,
    OperationFilter,
    StartSpec,
    State,
    TimelineEntry,
    TimelineType,
)
from headway_server.store.base import OperationStore
from headway_server.store.memory import MemoryStore
from headway_server.store.redis import RedisStore

if TYPE_CHECKING:  # mypy knows the helpers as tests.redis_support, pytest as redis_support
    from tests.redis_support import session_redis
else:
    from redis_support import session_redis

StoreFactory = Callable[..., OperationStore]


def memory_store(*, max_operations: int = 100_000, history_size: int = 10_000) -> OperationStore:
    return MemoryStore(max_operations=max_operations, history_size=history_size)


def memory_store_unpacked(
    *, max_operations: int = 100_000, history_size: int = 10_000
) -> OperationStore:
    """The memory store holding finished operations as objects, as it did before packing."""
    return MemoryStore(
        max_operations=max_operations, history_size=history_size, pack_finished=False
    )


_redis_stores: list[RedisStore] = []


def redis_store(*, max_operations: int = 100_000, history_size: int = 10_000) -> OperationStore:
    """A Redis store in a namespace of its own on the session's private redis-server."""
    store = RedisStore(
        session_redis().url,
        namespace="test-" + secrets.token_hex(6),
        max_operations=max_operations,
        history_size=history_size,
    )
    _redis_stores.append(store)
    return store


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": memory_store,
    "memory-unpacked": memory_store_unpacked,
    "redis": redis_store,
}


@pytest.fixture(autouse=True)
async def _close_redis_stores() -> AsyncIterator[None]:
    yield
    while _redis_stores:
        await _redis_stores.pop().close()


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = STORE_FACTORIES[request.param]
    return factory


@pytest.fixture
def store(store_factory: StoreFactory) -> OperationStore:
    return store_factory()


def new_op(op_id: str, **spec: Any) -> Operation:
    return Operation(id=op_id, spec=StartSpec(**spec))


async def bump(store: OperationStore, op_id: str, **changes: Any) -> Operation:
    current = await store.get(op_id)
    assert current is not None
    return await store.replace(
        dataclasses.replace(current, **changes), expected_revision=current.revision
    )


def ids(ops: Sequence[HeldOperation]) -> list[str]:
    return [op.id for op in ops]


# --- create / get -----------------------------------------------------------------------


async def test_new_store_is_empty(store: OperationStore) -> None:
    assert (await store.revision()) == 0
    assert await store.get("a") is None
    assert await store.scan() == []
    changes = await store.changes(0, limit=10)
    assert changes.changes == []
    assert changes.revision == 0


async def test_create_assigns_increasing_revisions(store: OperationStore) -> None:
    stored = [await store.create(new_op(f"op-{i}")) for i in range(3)]
    assert [op.revision for op in stored] == [1, 2, 3]
    assert [op.created_revision for op in stored] == [1, 2, 3]
    assert (await store.revision()) == 3
    assert await store.get("op-1") == stored[1]


async def test_create_ignores_revisions_on_the_input(store: OperationStore) -> None:
    op = dataclasses.replace(new_op("a"), revision=77, created_revision=55)
    stored = await store.create(op)
    assert (stored.revision, stored.created_revision) == (1, 1)


async def test_create_duplicate_changes_nothing(store: OperationStore) -> None:
    first = await store.create(new_op("a", kind="one"))
    with pytest.raises(AlreadyExists):
        await store.create(new_op("a", kind="two"))
    assert (await store.revision()) == 1
    assert await store.get("a") == first
    assert len((await store.changes(0, limit=10)).changes) == 1


async def test_create_beyond_max_operations(store_factory: StoreFactory) -> None:
    store = store_factory(max_operations=2)
    await store.create(new_op("a"))
    await store.create(new_op("b"))
    with pytest.raises(ResourceExhausted):
        await store.create(new_op("c"))
    assert (await store.revision()) == 2
    assert await store.get("c") is None
    # Deleting frees a place.
    await store.delete("a")
    await store.create(new_op("c"))
    assert (await store.revision()) == 4


# --- replace ----------------------------------------------------------------------------


async def test_replace_moves_to_next_revision(store: OperationStore) -> None:
    await store.create(new_op("a"))
    await store.create(new_op("b"))
    a = await store.get("a")
    assert a is not None
    new = await store.replace(dataclasses.replace(a, message="hi"), expected_revision=1)
    assert new.revision == 3
    assert new.created_revision == 1
    assert new.message == "hi"
    assert await store.get("a") == new


async def test_replace_with_stale_revision_is_conflict(store: OperationStore) -> None:
    await store.create(new_op("a"))
    current = await bump(store, "a", message="v2")
    with pytest.raises(Conflict):
        await store.replace(dataclasses.replace(current, message="v3"), expected_revision=1)
    assert await store.get("a") == current
    assert (await store.revision()) == 2


async def test_replace_missing_is_not_found(store: OperationStore) -> None:
    with pytest.raises(NotFound):
        await store.replace(new_op("ghost"), expected_revision=0)
    await store.create(new_op("a"))
    a = await store.get("a")
    await store.delete("a")
    assert a is not None
    with pytest.raises(NotFound):
        await store.replace(a, expected_revision=a.revision)
    assert (await store.revision()) == 2


# --- delete / tombstone -----------------------------------------------------------------


async def test_delete_keeps_a_tombstone(store: OperationStore) -> None:
    await store.create(new_op("a"))
    last = await bump(store, "a", message="last words")
    revision = await store.delete("a")
    assert revision == (await store.revision()) == 3
    assert await store.get("a") is None
    assert await store.scan() == []
    tomb = await store.tombstone("a")
    assert tomb is not None
    assert tomb.deleted
    assert tomb.revision == 3
    assert tomb.operation == last
    with pytest.raises(NotFound):
        await store.delete("a")
    assert (await store.revision()) == 3


async def test_tombstone_of_live_or_unknown_is_none(store: OperationStore) -> None:
    await store.create(new_op("a"))
    assert await store.tombstone("a") is None
    assert await store.tombstone("never") is None


async def test_recreated_id_is_live_not_a_tombstone(store: OperationStore) -> None:
    await store.create(new_op("a"))
    await store.delete("a")
    again = await store.create(new_op("a", kind="second"))
    assert again.created_revision == 3
    assert await store.tombstone("a") is None
    changes = await store.changes(0, limit=10)
    assert [(c.revision, c.deleted) for c in changes.changes] == [(3, False)]


# --- changes ----------------------------------------------------------------------------


async def test_changes_hold_only_the_latest_state_per_operation(store: OperationStore) -> None:
    await store.create(new_op("a"))  # 1
    await store.create(new_op("b"))  # 2
    await store.create(new_op("c"))  # 3
    await bump(store, "a", message="a2")  # 4
    await bump(store, "b", message="b2")  # 5
    await bump(store, "a", message="a3")  # 6
    await store.delete("c")  # 7
    changes = await store.changes(0, limit=100)
    assert [(c.revision, c.operation.id, c.deleted) for c in changes.changes] == [
        (5, "b", False),
        (6, "a", False),
        (7, "c", True),
    ]
    assert changes.changes[1].operation.message == "a3"
    assert changes.changes[1].operation.revision == 6
    assert changes.revision == 7


async def test_changes_after_a_revision(store: OperationStore) -> None:
    for i in range(5):
        await store.create(new_op(f"op-{i}"))
    changes = await store.changes(3, limit=100)
    assert [c.revision for c in changes.changes] == [4, 5]
    assert changes.revision == 5
    at_head = await store.changes(5, limit=100)
    assert at_head.changes == []
    assert at_head.revision == 5


async def test_changes_respect_limit(store: OperationStore) -> None:
    for i in range(5):
        await store.create(new_op(f"op-{i}"))
    await bump(store, "op-0")  # 6
    page = await store.changes(0, limit=2)
    assert [c.revision for c in page.changes] == [2, 3]
    assert page.revision == 3
    page = await store.changes(page.revision, limit=2)
    assert [c.revision for c in page.changes] == [4, 5]
    assert page.revision == 5
    page = await store.changes(page.revision, limit=2)
    assert [c.revision for c in page.changes] == [6]
    assert page.revision == 6
    # Exactly `limit` left: all returned, caught up to the store.
    exact = await store.changes(3, limit=3)
    assert [c.revision for c in exact.changes] == [4, 5, 6]
    assert exact.revision == 6


async def test_changes_with_zero_limit_probe(store: OperationStore) -> None:
    for i in range(3):
        await store.create(new_op(f"op-{i}"))
    probe = await store.changes(1, limit=0)
    assert probe.changes == []
    assert probe.revision == 1
    at_head = await store.changes(3, limit=0)
    assert at_head.changes == []
    assert at_head.revision == 3


async def test_changes_ahead_of_the_store_are_compacted(store: OperationStore) -> None:
    await store.create(new_op("a"))
    with pytest.raises(HistoryCompacted):
        await store.changes(2, limit=10)
    with pytest.raises(HistoryCompacted):
        await store.changes(100, limit=0)


async def test_changes_below_the_tombstone_window_are_compacted(
    store_factory: StoreFactory,
) -> None:
    store = store_factory(history_size=2)
    for op_id in "abcd":
        await store.create(new_op(op_id))  # 1..4
    await store.delete("a")  # 5
    await store.delete("b")  # 6
    # Two tombstones fit: the whole history is still answerable.
    full = await store.changes(0, limit=10)
    assert [(c.operation.id, c.deleted) for c in full.changes] == [
        ("c", False),
        ("d", False),
        ("a", True),
        ("b", True),
    ]
    await store.delete("c")  # 7: drops a's tombstone (revision 5)
    assert await store.tombstone("a") is None
    assert await store.tombstone("b") is not None
    for after in (0, 3, 4):
        with pytest.raises(HistoryCompacted):
            await store.changes(after, limit=10)
    # From the dropped tombstone's revision on, nothing is missing.
    changes = await store.changes(5, limit=10)
    assert [(c.revision, c.operation.id, c.deleted) for c in changes.changes] == [
        (6, "b", True),
        (7, "c", True),
    ]
    assert changes.revision == 7


# --- snapshot ---------------------------------------------------------------------------


async def test_snapshot_sorted_by_revision_and_filtered(store: OperationStore) -> None:
    await store.create(new_op("a", project="p"))  # 1
    await store.create(new_op("b", project="q"))  # 2
    await store.create(new_op("c", project="p"))  # 3
    await store.create(new_op("d", project="p"))  # 4
    await bump(store, "a", state=State.RUNNING)  # 5
    await store.delete("d")  # 6
    snap = await store.snapshot(OperationFilter(project="p"))
    assert [(c.revision, c.operation.id) for c in snap.changes] == [(3, "c"), (5, "a")]
    assert all(not c.deleted for c in snap.changes)
    assert all(c.revision == c.operation.revision for c in snap.changes)
    assert snap.revision == 6
    everything = await store.snapshot(OperationFilter())
    assert [c.operation.id for c in everything.changes] == ["b", "c", "a"]
    running = await store.snapshot(OperationFilter(states=frozenset({State.RUNNING})))
    assert [c.operation.id for c in running.changes] == ["a"]


# --- list_page --------------------------------------------------------------------------


async def test_list_page_in_creation_order(store: OperationStore) -> None:
    for op_id in ("z", "a", "m", "b"):
        await store.create(new_op(op_id, project="p"))
    await store.create(new_op("other", project="q"))
    await bump(store, "z", message="changed")  # does not move it
    page = await store.list_page(OperationFilter(project="p"), limit=10)
    assert ids(page.operations) == ["z", "a", "m", "b"]
    assert page.next_after is None
    assert page.revision == 6


async def test_list_page_paging(store: OperationStore) -> None:
    for i in range(5):
        await store.create(new_op(f"op-{i}", kind="even" if i % 2 == 0 else "odd"))
    where = OperationFilter(kind="even")
    first = await store.list_page(where, limit=2)
    assert ids(first.operations) == ["op-0", "op-2"]
    assert first.next_after == 3
    second = await store.list_page(where, after=first.next_after or 0, limit=2)
    assert ids(second.operations) == ["op-4"]
    assert second.next_after is None
    exact = await store.list_page(where, after=0, limit=3)
    assert ids(exact.operations) == ["op-0", "op-2", "op-4"]
    assert exact.next_after is None
    empty = await store.list_page(where, after=5, limit=3)
    assert empty.operations == []
    assert empty.next_after is None


async def test_list_page_skips_deleted(store: OperationStore) -> None:
    for op_id in "abc":
        await store.create(new_op(op_id))
    await store.delete("b")
    page = await store.list_page(OperationFilter(), limit=10)
    assert ids(page.operations) == ["a", "c"]


async def test_scan_returns_live_operations(store: OperationStore) -> None:
    for op_id in "abc":
        await store.create(new_op(op_id))
    await store.delete("a")
    assert sorted(ids(await store.scan())) == ["b", "c"]


# --- finished operations ----------------------------------------------------------------
# A store may hold finished operations differently (the memory store packs them);
# every read that returns an Operation returns it whole and equal.


async def finish(store: OperationStore, op_id: str, **spec: Any) -> Operation:
    await store.create(new_op(op_id, **spec))
    return await bump(
        store,
        op_id,
        state=State.SUCCEEDED,
        percent=100.0,
        message="done",
        result={"files": 1000.0, "nested": ["a", 1.5, None]},
        counters={"files": 1000},
        finished_at=1795445899.25,
        finished_by=("CompleteOperation", "req-1"),
    )


async def test_finished_operation_reads_back_whole_from_every_read(
    store: OperationStore,
) -> None:
    done = await finish(store, "a", project="p", parent_id="parent")
    assert await store.get("a") == done
    assert (await store.list_page(OperationFilter(project="p"))).operations == [done]
    snap = await store.snapshot(OperationFilter(project="p"))
    assert [(c.revision, c.operation) for c in snap.changes] == [(done.revision, done)]
    changes = await store.changes(0, limit=10)
    assert [(c.revision, c.operation, c.deleted) for c in changes.changes] == [
        (done.revision, done, False)
    ]
    filtered = await store.snapshot(OperationFilter(states=frozenset({State.RUNNING})))
    assert filtered.changes == []
    # Statistics read these fields of what scan returns...
    assert [
        (h.id, h.spec, h.state, h.total, h.percent, h.finished_at) for h in await store.scan()
    ] == [("a", done.spec, State.SUCCEEDED, done.total, 100.0, 1795445899.25)]
    # ...and roll-ups what children returns: the same as for the whole operation.
    assert await store.children("parent") == [ChildProgress.of(done)]


async def test_finished_operation_can_still_be_replaced(store: OperationStore) -> None:
    done = await finish(store, "a")
    counted = await bump(store, "a", children={"SUCCEEDED": 1})
    assert counted.revision == done.revision + 1
    assert await store.get("a") == counted
    with pytest.raises(Conflict):
        await store.replace(done, expected_revision=done.revision)


async def test_tombstone_of_a_finished_operation_holds_its_last_state(
    store: OperationStore,
) -> None:
    done = await finish(store, "a")
    revision = await store.delete("a")
    tomb = await store.tombstone("a")
    assert tomb is not None
    assert (tomb.revision, tomb.operation, tomb.deleted) == (revision, done, True)
    changes = await store.changes(done.revision, limit=10)
    assert [(c.revision, c.operation, c.deleted) for c in changes.changes] == [
        (revision, done, True)
    ]


# --- wait_for_change --------------------------------------------------------------------


async def test_wait_for_change_returns_at_once_when_ahead(store: OperationStore) -> None:
    await store.create(new_op("a"))
    await store.create(new_op("b"))
    assert await asyncio.wait_for(store.wait_for_change(0), 1.0) == 2
    assert await asyncio.wait_for(store.wait_for_change(1), 1.0) == 2


async def test_wait_for_change_wakes_on_a_change(store: OperationStore) -> None:
    await store.create(new_op("a"))
    waiter = asyncio.ensure_future(store.wait_for_change(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await bump(store, "a", message="x")
    assert await asyncio.wait_for(waiter, 1.0) == 2


async def test_wait_for_change_wakes_every_waiter_on_delete(store: OperationStore) -> None:
    await store.create(new_op("a"))
    waiters = [asyncio.ensure_future(store.wait_for_change(1)) for _ in range(3)]
    await asyncio.sleep(0.01)
    await store.delete("a")
    results = await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    assert results == [2, 2, 2]


async def test_wait_for_change_keeps_waiting_while_at_or_below(store: OperationStore) -> None:
    await store.create(new_op("a"))
    await store.create(new_op("b"))
    waiter = asyncio.ensure_future(store.wait_for_change(3))
    await bump(store, "a")  # 3: not above 3
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await bump(store, "b")  # 4
    assert await asyncio.wait_for(waiter, 1.0) == 4


async def test_wait_for_change_can_be_cancelled(store: OperationStore) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(store.wait_for_change(0), 0.02)
    # Still usable afterwards.
    waiter = asyncio.ensure_future(store.wait_for_change(0))
    await store.create(new_op("a"))
    assert await asyncio.wait_for(waiter, 1.0) == 1


# --- indexed sweeps, counts, the store's secret and epoch ---------------------------------


async def test_secret_is_stable_and_random_per_store(store_factory: StoreFactory) -> None:
    store = store_factory()
    first = await store.secret()
    assert len(first) >= 32
    assert await store.secret() == first
    assert await store_factory().secret() != first


async def test_epoch_is_stable_and_random_per_store(store_factory: StoreFactory) -> None:
    store = store_factory()
    first = await store.epoch()
    assert 0 < len(first) <= 64
    await store.create(new_op("a"))
    assert await store.epoch() == first  # writes do not start a new epoch
    assert await store_factory().epoch() != first


async def test_lapsed_leases_come_from_the_lease_index(store: OperationStore) -> None:
    await store.create(new_op("quiet", heartbeat_timeout=10.0))
    await store.create(new_op("no-lease"))
    await store.create(new_op("paused", heartbeat_timeout=10.0))
    await bump(store, "quiet", state=State.RUNNING, last_report_at=100.0)
    await bump(store, "no-lease", state=State.RUNNING, last_report_at=100.0)
    await bump(store, "paused", state=State.PAUSED, last_report_at=100.0)
    assert await store.lapsed_leases(109.9) == []
    assert await store.lapsed_leases(110.0) == ["quiet"]
    # A later report moves the deadline; stalling or finishing takes it out.
    await bump(store, "quiet", last_report_at=105.0)
    assert await store.lapsed_leases(110.0) == []
    await bump(store, "quiet", stalled=True)
    assert await store.lapsed_leases(1000.0) == []
    await bump(store, "quiet", stalled=False, last_report_at=200.0)
    assert await store.lapsed_leases(1000.0) == ["quiet"]
    await bump(store, "quiet", state=State.SUCCEEDED, finished_at=300.0)
    assert await store.lapsed_leases(1000.0) == []


async def test_finished_before_lists_terminal_operations_in_finish_order(
    store: OperationStore,
) -> None:
    for op_id, finished in (("b", 20.0), ("a", 10.0), ("c", 30.0)):
        await store.create(new_op(op_id))
        await bump(store, op_id, state=State.SUCCEEDED, finished_at=finished)
    await store.create(new_op("running"))
    await bump(store, "running", state=State.RUNNING)
    assert await store.finished_before(5.0, limit=10) == []
    assert await store.finished_before(25.0, limit=10) == ["a", "b"]
    assert await store.finished_before(25.0, limit=1) == ["a"]
    # Not deleted yet: found again; deleted: gone.
    assert await store.finished_before(25.0, limit=10) == ["a", "b"]
    await store.delete("a")
    assert await store.finished_before(100.0, limit=10) == ["b", "c"]
    # An id created again after its deletion is a new, unfinished operation.
    await store.create(new_op("a"))
    assert await store.finished_before(100.0, limit=10) == ["b", "c"]


async def test_counts_follow_every_write(store: OperationStore) -> None:
    assert await store.counts() == {}
    await store.create(new_op("x", kind="crawl"))
    await store.create(new_op("y", kind="crawl"))
    await store.create(new_op("z", kind="upload"))
    await bump(store, "x", state=State.RUNNING)
    await bump(store, "z", state=State.SUCCEEDED, finished_at=1.0)
    assert await store.counts() == {
        ("QUEUED", "crawl"): 1,
        ("RUNNING", "crawl"): 1,
        ("SUCCEEDED", "upload"): 1,
    }
    await store.delete("z")
    await store.delete("y")
    assert await store.counts() == {("RUNNING", "crawl"): 1}


async def test_a_finish_is_recorded_in_the_statistics_once(store: OperationStore) -> None:
    await store.create(new_op("a", kind="crawl"))
    await bump(store, "a", state=State.RUNNING)
    assert len(store.stats) == 0
    await bump(store, "a", state=State.SUCCEEDED, finished_at=10.0, completed=5)
    assert len(store.stats) == 1
    # A finished operation written again (its log counted, say) is not a new finish.
    await bump(store, "a", error_count=1)
    await store.delete("a")
    assert len(store.stats) == 1
    # Statistics outlive the operations they summarize.
    where = OperationFilter(kind="crawl")
    assert store.stats.compute([], where, window=None, now=20.0).finished == 1


async def test_snapshot_reads_what_is_held_after_tombstones_were_dropped(
    store_factory: StoreFactory,
) -> None:
    store = store_factory(history_size=1)
    for op_id in ("a", "b", "c"):
        await store.create(new_op(op_id))
    await store.delete("a")
    await store.delete("b")  # drops a's tombstone: history before it is gone
    with pytest.raises(HistoryCompacted):
        await store.changes(0, limit=10)
    snap = await store.snapshot(OperationFilter())
    assert [c.operation.id for c in snap.changes] == ["c"]
    assert snap.revision == 5


async def test_replace_many_writes_in_order_each_on_its_own(store: OperationStore) -> None:
    a = await store.create(new_op("a"))
    b = await store.create(new_op("b"))
    outcomes = await store.replace_many(
        [
            (dataclasses.replace(a, message="a1"), a.revision),
            (dataclasses.replace(b, message="b1"), b.revision - 1),  # stale: Conflict
            (dataclasses.replace(a, message="a2"), None),  # after a1
            (dataclasses.replace(b, message="b2"), None),  # after a failed write: Conflict
            (new_op("missing"), 1),
        ]
    )
    a1, b1, a2, b2, missing = outcomes
    assert isinstance(a1, Operation) and isinstance(a2, Operation)
    assert (a1.message, a1.revision, a2.message, a2.revision) == ("a1", 3, "a2", 4)
    assert isinstance(b1, Conflict) and isinstance(b2, Conflict)
    assert isinstance(missing, NotFound)
    assert await store.get("a") == a2
    assert await store.get("b") == b
    assert [(c.operation.id, c.revision) for c in (await store.changes(2, limit=10)).changes] == [
        ("a", 4)
    ]
    assert await store.replace_many([]) == []


# --- journals: logs and timelines beside the operations ----------------------------------


async def test_logs_are_numbered_capped_and_counted(store: OperationStore) -> None:
    journal = store.journal
    entries = [LogEntry(LogLevel.INFO, f"line {i}", time=float(i)) for i in range(1, 1006)]
    assert await journal.append_logs("a", entries[:5]) == 0
    assert await journal.append_logs("a", []) == 0
    dropped = await journal.append_logs("a", entries[5:])
    assert dropped == 5  # 1,005 appended, the newest 1,000 held
    held, dropped = await journal.logs("a")
    assert dropped == 5
    assert [(e.index, e.message) for e in held[:2]] == [(6, "line 6"), (7, "line 7")]
    assert held[-1].index == 1005
    assert held[-1] == dataclasses.replace(entries[-1], index=1005)
    assert await journal.append_logs("a", []) == 5
    await journal.seal("a")
    assert await journal.append_logs("a", entries[:1]) == 6
    assert await journal.logs("b") == ([], 0)


async def test_timelines_are_capped_and_forgotten_with_the_operation(
    store: OperationStore,
) -> None:
    journal = store.journal
    entries = [
        TimelineEntry(TimelineType.STAGE_STARTED, float(i), i, f"s{i}", "") for i in range(502)
    ]
    await journal.append_timeline("a", entries)
    held, dropped = await journal.timeline("a")
    assert (held, dropped) == (entries[2:], 2)
    await store.create(new_op("a"))
    await journal.append_logs("a", [LogEntry(LogLevel.ERROR, "bad")])
    await store.delete("a")
    await journal.forget("a")
    assert await journal.timeline("a") == ([], 0)
    assert await journal.logs("a") == ([], 0)


async def test_active_operations_are_counted_by_project(store: OperationStore) -> None:
    assert await store.active_in("acme") == 0
    await store.create(new_op("a", project="acme"))
    await store.create(new_op("b", project="acme"))
    await store.create(new_op("c", project="beta"))
    assert (await store.active_in("acme"), await store.active_in("beta")) == (2, 1)
    await bump(store, "a", state=State.RUNNING)
    await bump(store, "a", state=State.PAUSED)
    assert await store.active_in("acme") == 2
    await bump(store, "a", state=State.SUCCEEDED, finished_at=1.0)
    await bump(store, "a", error_count=1)  # still finished
    assert await store.active_in("acme") == 1
    await store.delete("b")
    await store.delete("a")
    assert (await store.active_in("acme"), await store.active_in("beta")) == (0, 1)
    c = await store.get("c")
    assert c is not None
    outcomes = await store.replace_many([(dataclasses.replace(c, state=State.FAILED), c.revision)])
    assert isinstance(outcomes[0], Operation)
    assert await store.active_in("beta") == 0
