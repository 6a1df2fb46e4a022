"""What the memory store does beyond the store contract: finished operations packed,
timelines sealed. The contract itself is tested in test_store_contract.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from headway_server.domain.model import (
    Change,
    FinishedOperation,
    LogEntry,
    LogLevel,
    Operation,
    StartSpec,
    State,
    TimelineEntry,
    TimelineType,
)
from headway_server.store.journal import MemoryJournal
from headway_server.store.memory import UNPACKED_CACHE_SIZE, MemoryStore


async def finish(store: MemoryStore, op_id: str, **changes: Any) -> Operation:
    created = await store.create(Operation(id=op_id, spec=StartSpec(kind="k")))
    done = dataclasses.replace(
        created, state=State.SUCCEEDED, finished_at=1795445899.0, result={"n": 1.0}, **changes
    )
    return await store.replace(done, expected_revision=created.revision)


async def test_finished_operations_are_held_packed_and_running_ones_whole() -> None:
    store = MemoryStore()
    await store.create(Operation(id="running", spec=StartSpec(kind="k")))
    await finish(store, "done")
    held = {op.id: op for op in await store.scan()}
    assert isinstance(held["running"], Operation)
    assert isinstance(held["done"], FinishedOperation)


async def test_reads_of_a_just_finished_operation_share_one_value() -> None:
    # Watchers of a finish all read it; convert.py caches its wire bytes per value.
    store = MemoryStore()
    done = await finish(store, "a")
    assert await store.get("a") is done
    assert (await store.changes(0, limit=1)).changes[0].operation is done


async def test_operations_out_of_the_unpacked_cache_unpack_equal() -> None:
    store = MemoryStore()
    first = await finish(store, "op-0")
    for i in range(1, UNPACKED_CACHE_SIZE + 2):
        await finish(store, f"op-{i}")
    again = await store.get("op-0")
    assert again == first
    assert again is not first
    assert await store.get("op-0") is again


async def test_a_value_that_cannot_be_packed_is_held_whole() -> None:
    store = MemoryStore()
    odd = await finish(store, "a", details={"odd": object()})
    assert [type(op) for op in await store.scan()] == [Operation]
    assert await store.get("a") == odd


async def test_a_sealed_timeline_reads_back_and_still_takes_entries() -> None:
    journal = MemoryJournal(max_timeline=3)
    entries = [TimelineEntry(TimelineType.STAGE_STARTED, float(i), i, f"s{i}") for i in range(4)]
    await journal.append_timeline("a", entries)
    await journal.seal("a")
    assert await journal.timeline("a") == (entries[1:], 1)
    ended = TimelineEntry(TimelineType.SUCCEEDED, 9.0, 9)
    await journal.append_timeline("a", [ended])
    assert await journal.timeline("a") == ([*entries[2:], ended], 2)
    await journal.seal("a")
    await journal.forget("a")
    assert await journal.timeline("a") == ([], 0)


async def test_a_sealed_log_reads_back_and_numbering_goes_on_after_it() -> None:
    journal = MemoryJournal(max_logs=3)
    entries = [
        LogEntry(LogLevel.ERROR, f"failed {i}", "index", f"f{i}", "E", True, {"n": float(i)})
        for i in range(4)
    ]
    assert await journal.append_logs("a", entries) == 1
    held, dropped = await journal.logs("a")
    await journal.seal("a")
    assert await journal.logs("a") == (held, dropped)
    assert [e.index for e in held] == [2, 3, 4]
    assert await journal.append_logs("a", [LogEntry(LogLevel.INFO, "late")]) == 2
    after, _ = await journal.logs("a")
    assert [(e.index, e.message) for e in after] == [(3, "failed 2"), (4, "failed 3"), (5, "late")]


async def test_a_log_that_cannot_be_packed_stays_readable() -> None:
    journal = MemoryJournal()
    odd = LogEntry(LogLevel.INFO, "odd", details={"value": object()})
    await journal.append_logs("a", [odd])
    await journal.seal("a")
    (entry,), dropped = await journal.logs("a")
    assert (entry.message, entry.details, dropped) == ("odd", odd.details, 0)


async def test_the_change_history_reads_the_same_across_its_compactions() -> None:
    # Thousands of writes to a few operations (a hot producer): superseded states
    # are dropped from the history in bulk, which must not change what it answers.
    store = MemoryStore(history_size=3)
    latest = {
        op_id: await store.create(Operation(id=op_id, spec=StartSpec(kind="k")))
        for op_id in ("a", "b", "c", "gone")
    }
    del latest["gone"]
    deleted_at = await store.delete("gone")

    def expected(after: int) -> list[tuple[int, str, bool]]:
        held = [(op.revision, op.id, False) for op in latest.values()]
        return sorted(e for e in [*held, (deleted_at, "gone", True)] if e[0] > after)

    def seen(changes: list[Change]) -> list[tuple[int, str, bool]]:
        return [(c.revision, c.operation.id, c.deleted) for c in changes]

    for i in range(5000):
        current = latest["abc"[i % 3]]
        latest[current.id] = await store.replace(
            dataclasses.replace(current, completed=i), expected_revision=current.revision
        )
        if i % 997 == 0:
            assert seen((await store.changes(0, limit=10)).changes) == expected(0)
    for after in (0, deleted_at, latest["b"].revision - 1, (await store.revision())):
        found = await store.changes(after, limit=10)
        assert seen(found.changes) == expected(after)
        assert found.revision == (await store.revision())
    assert [c.operation for c in (await store.changes(0, limit=10)).changes[1:]] == sorted(
        latest.values(), key=lambda op: op.revision
    )
    page = await store.changes(0, limit=2)
    assert seen(page.changes) == expected(0)[:2]
    assert page.revision == page.changes[-1].revision
    tomb = await store.tombstone("gone")
    assert tomb is not None and (tomb.revision, tomb.deleted) == (deleted_at, True)
