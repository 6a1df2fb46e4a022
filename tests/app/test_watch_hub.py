"""WatchHub over MemoryStore: state-sync watch streams (README guarantees 5, 6, 10)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
from headway_server.app.watch import (
    DEFAULT_YIELD_RATIO,
    EventType,
    ShuttingDown,
    WatchEvent,
    WatchHub,
)
from headway_server.domain.errors import HistoryCompacted, NotFound, StoreUnavailable
from headway_server.domain.model import Operation, OperationFilter, StartSpec, State
from headway_server.store.memory import MemoryStore

T = TypeVar("T")

BOOKMARK = 0.05
TIMEOUT = 2.0


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def hub(store: MemoryStore) -> AsyncIterator[WatchHub]:
    # Unpaced: these tests are about rounds and batching; pacing has its own.
    hub = WatchHub(store, bookmark_interval=BOOKMARK, min_interval=0)
    yield hub
    hub.stop()


@pytest.fixture
async def streams() -> AsyncIterator[list[AsyncIterator[Any]]]:
    """Streams opened by a test, closed at teardown."""
    opened: list[AsyncIterator[Any]] = []
    yield opened
    for stream in opened:
        await asyncio.wait_for(stream.aclose(), TIMEOUT)  # type: ignore[attr-defined]


async def nxt(stream: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(anext(stream), TIMEOUT)


def kinds(batch: list[WatchEvent]) -> list[tuple[EventType, int, str]]:
    return [(e.type, e.revision, e.operation.id if e.operation else "") for e in batch]


async def create(store: MemoryStore, op_id: str, **spec: Any) -> Operation:
    return await store.create(Operation(id=op_id, spec=StartSpec(**spec)))


async def change(store: MemoryStore, op_id: str, **changes: Any) -> Operation:
    current = await store.get(op_id)
    assert current is not None
    new = dataclasses.replace(current, **changes)
    return await store.replace(new, expected_revision=current.revision)


def watch(
    hub: WatchHub,
    streams: list[AsyncIterator[Any]],
    where: OperationFilter | None = None,
    from_revision: int = 0,
    *,
    from_epoch: str = "",
) -> AsyncIterator[list[WatchEvent]]:
    stream = hub.watch_operations(where or OperationFilter(), from_revision, from_epoch=from_epoch)
    streams.append(stream)
    return stream


async def next_non_bookmark(stream: AsyncIterator[list[WatchEvent]]) -> list[WatchEvent]:
    while True:
        batch = await nxt(stream)
        if [e.type for e in batch] != [EventType.BOOKMARK]:
            return batch


# --- watch_operations -------------------------------------------------------------------


async def test_snapshot_then_synced(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a", project="p")  # 1
    await create(store, "b", project="q")  # 2
    await create(store, "c", project="p")  # 3
    await change(store, "a", message="x")  # 4
    stream = watch(hub, streams, OperationFilter(project="p"))
    snapshot = await nxt(stream)
    assert kinds(snapshot) == [(EventType.SNAPSHOT, 3, "c"), (EventType.SNAPSHOT, 4, "a")]
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 4, "")]
    assert hub.open_watchers == 1


async def test_empty_store_sends_only_synced(hub: WatchHub, streams: Any) -> None:
    stream = watch(hub, streams)
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 0, "")]


async def test_changes_after_sync(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    stream = watch(hub, streams)
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 0, "")]
    pending = asyncio.ensure_future(next_non_bookmark(stream))
    await asyncio.sleep(0.01)
    await create(store, "a")
    batch = await asyncio.wait_for(pending, TIMEOUT)
    assert kinds(batch) == [(EventType.CHANGED, 1, "a")]
    await store.delete("a")
    batch = await next_non_bookmark(stream)
    assert kinds(batch) == [(EventType.DELETED, 2, "a")]


async def test_changes_are_batched(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    stream = watch(hub, streams)
    await nxt(stream)  # SYNCED
    await create(store, "a")
    await create(store, "b")
    await create(store, "c")
    batch = await next_non_bookmark(stream)
    assert kinds(batch) == [
        (EventType.CHANGED, 1, "a"),
        (EventType.CHANGED, 2, "b"),
        (EventType.CHANGED, 3, "c"),
    ]


async def test_slow_watcher_skips_superseded_states(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    await create(store, "b")
    stream = watch(hub, streams)
    await nxt(stream)  # snapshot
    await nxt(stream)  # SYNCED at 2
    for i in range(10):
        await change(store, "a", completed=i)  # 3..12
    await change(store, "b", state=State.RUNNING)  # 13
    await change(store, "a", state=State.SUCCEEDED, completed=10)  # 14
    batch = await next_non_bookmark(stream)
    assert kinds(batch) == [(EventType.CHANGED, 13, "b"), (EventType.CHANGED, 14, "a")]
    last = batch[-1].operation
    assert last is not None
    assert last.state is State.SUCCEEDED
    assert last.completed == 10


async def test_light_load_delivers_every_state(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    stream = watch(hub, streams)
    await nxt(stream)  # snapshot
    await nxt(stream)  # SYNCED
    received: list[int] = []

    async def follow() -> None:
        while len(received) < 30:
            received.extend(e.revision for e in await next_non_bookmark(stream))

    follower = asyncio.create_task(follow())
    for i in range(30):
        await change(store, "a", completed=i)
        await asyncio.sleep(0.002)  # a producer's report every few milliseconds
    await asyncio.wait_for(follower, TIMEOUT)
    # One watcher's round takes microseconds: no pause, nothing coalesced.
    assert received == list(range(2, 32))


@pytest.mark.parametrize(
    ("yield_ratio", "batched"), [(0.0, False), (DEFAULT_YIELD_RATIO, True), (1.0, True)]
)
async def test_busy_rounds_yield_to_producers_and_batch_their_changes(
    store: MemoryStore, streams: Any, yield_ratio: float, batched: bool
) -> None:
    """Rounds of slow sends (a blocking 2 ms each, as thousands of grpc writes
    would be) leave producers time; each watcher then gets many operations per
    batch. The control without the pause shows the test can fail."""
    hub = WatchHub(store, bookmark_interval=10.0, yield_ratio=yield_ratio, min_interval=0)
    ops = [f"op{i}" for i in range(40)]
    for op_id in ops:
        await create(store, op_id)
    sizes: list[int] = []
    stop = asyncio.Event()

    async def watcher() -> None:
        # Read as grpc drives a stream: directly, a send in the same step.
        async for batch in watch(hub, streams):
            if stop.is_set():
                return
            if batch[0].type is EventType.CHANGED:
                sizes.append(len(batch))
                time.sleep(0.002)  # noqa: ASYNC251  # on purpose: a send that holds the loop

    async def producer() -> None:
        for step in itertools.count():
            if stop.is_set():
                return
            await change(store, ops[step % len(ops)], completed=step)
            await asyncio.sleep(0)

    watchers = [asyncio.create_task(watcher()) for _ in range(10)]
    await asyncio.sleep(0.05)
    producing = asyncio.create_task(producer())
    await asyncio.sleep(0.6)
    stop.set()
    await asyncio.wait_for(producing, TIMEOUT)
    await store.create(Operation(id="last", spec=StartSpec()))  # wakes the watchers to stop
    await asyncio.wait_for(asyncio.gather(*watchers), TIMEOUT)
    hub.stop()
    mean = sum(sizes) / len(sizes)
    assert (mean >= 5) is batched, f"mean batch {mean:.1f} over {len(sizes)} batches"


async def test_watcher_filters_and_delivers_how_it_ended(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a", project="p")
    stream = watch(hub, streams, OperationFilter(project="p", active_only=True))
    assert kinds(await nxt(stream)) == [(EventType.SNAPSHOT, 1, "a")]
    await nxt(stream)  # SYNCED
    await create(store, "other", project="q")  # 2: not for us
    await change(store, "a", state=State.SUCCEEDED)  # 3: stops matching, delivered once
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 3, "a")]
    await change(store, "a", message="after the end")  # 4: no longer held
    await create(store, "b", project="p")  # 5
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 5, "b")]


async def test_revisions_strictly_increase_and_bookmarks_do_not_go_back(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    stream = watch(hub, streams)
    seen: list[WatchEvent] = []
    seen += await nxt(stream)
    seen += await nxt(stream)
    for i in range(3):
        await change(store, "a", completed=i)
        await create(store, f"n{i}")
        seen += await next_non_bookmark(stream)
    seen += await nxt(stream)  # a quiet stream: BOOKMARK
    assert seen[-1].type is EventType.BOOKMARK
    with_op = [e.revision for e in seen if e.operation is not None]
    assert with_op == sorted(set(with_op))
    caught_up = [e.revision for e in seen if e.operation is None]
    assert caught_up == sorted(caught_up)
    assert seen[-1].revision == (await store.revision()) == 7


async def test_quiet_stream_gets_bookmarks(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a")
    stream = watch(hub, streams)
    await nxt(stream)
    await nxt(stream)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(2):
        assert kinds(await nxt(stream)) == [(EventType.BOOKMARK, 1, "")]
    assert loop.time() - start >= BOOKMARK * 1.5


async def test_resume_from_revision(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a", project="p")  # 1
    await create(store, "b", project="p")  # 2
    await create(store, "c", project="p")  # 3
    await create(store, "x", project="q")  # 4
    resume_at = await store.revision()
    await change(store, "b", message="b2")  # 5
    await change(store, "x", message="x2")  # 6: other project
    await store.delete("c")  # 7
    await create(store, "d", project="p")  # 8
    await change(store, "b", message="b3")  # 9
    stream = watch(hub, streams, OperationFilter(project="p"), from_revision=resume_at)
    batch = await nxt(stream)
    assert kinds(batch) == [
        (EventType.DELETED, 7, "c"),
        (EventType.CHANGED, 8, "d"),
        (EventType.CHANGED, 9, "b"),
        (EventType.SYNCED, 9, ""),
    ]
    # Nothing sent again; then live changes.
    await change(store, "a", message="a2")  # 10
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 10, "a")]


async def test_resume_at_head_sends_synced(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a")
    stream = watch(hub, streams, from_revision=1)
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 1, "")]


async def test_resume_ahead_of_store_resets(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    await create(store, "b")
    stream = watch(hub, streams, from_revision=50)
    assert kinds(await nxt(stream)) == [(EventType.RESET, 2, "")]
    assert kinds(await nxt(stream)) == [(EventType.SNAPSHOT, 1, "a"), (EventType.SNAPSHOT, 2, "b")]
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 2, "")]
    await change(store, "a", message="x")
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 3, "a")]


async def test_resume_below_compacted_history_resets(streams: Any) -> None:
    store = MemoryStore(history_size=1)
    hub = WatchHub(store, bookmark_interval=BOOKMARK)
    try:
        for op_id in "abc":
            await create(store, op_id)  # 1..3
        await store.delete("a")  # 4
        await store.delete("b")  # 5: a's tombstone dropped
        stream = watch(hub, streams, from_revision=2)
        assert kinds(await nxt(stream)) == [(EventType.RESET, 5, "")]
        assert kinds(await nxt(stream)) == [(EventType.SNAPSHOT, 3, "c")]
        assert kinds(await nxt(stream)) == [(EventType.SYNCED, 5, "")]
    finally:
        hub.stop()


async def test_stop_ends_stream_with_shutting_down(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    await create(store, "b")
    stream = watch(hub, streams)
    await nxt(stream)
    await nxt(stream)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not pending.done()
    hub.stop()
    with pytest.raises(ShuttingDown) as exc:
        await asyncio.wait_for(pending, TIMEOUT)
    assert exc.value.revision == 2
    assert hub.open_watchers == 0


async def test_stream_opened_after_stop_shuts_down_once_caught_up(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")
    hub.stop()
    stream = watch(hub, streams)
    await nxt(stream)
    await nxt(stream)
    with pytest.raises(ShuttingDown) as exc:
        await nxt(stream)
    assert exc.value.revision == 1


async def test_closing_a_stream_releases_the_watcher(hub: WatchHub, streams: Any) -> None:
    stream = watch(hub, streams)
    await nxt(stream)
    assert hub.open_watchers == 1
    await asyncio.wait_for(stream.aclose(), TIMEOUT)  # type: ignore[attr-defined]
    assert hub.open_watchers == 0


async def test_watch_does_not_slow_producers(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    # A watcher that never reads costs the store nothing: writes go on.
    await create(store, "a")
    stream = watch(hub, streams)
    await nxt(stream)  # snapshot
    for i in range(500):
        await change(store, "a", completed=i)
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 1, "")]
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 501, "a")]


# --- watch_operation --------------------------------------------------------------------


def watch_one(
    hub: WatchHub,
    streams: list[AsyncIterator[Any]],
    op_id: str,
    from_revision: int = 0,
    *,
    from_epoch: str = "",
) -> AsyncIterator[WatchEvent]:
    stream = hub.watch_operation(op_id, from_revision, from_epoch=from_epoch)
    streams.append(stream)
    return stream


async def next_event(stream: AsyncIterator[WatchEvent]) -> WatchEvent:
    while True:
        event = await nxt(stream)
        if event.type is not EventType.BOOKMARK:
            return event


async def test_watch_one_until_terminal(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a")
    stream = watch_one(hub, streams, "a")
    first = await nxt(stream)
    assert (first.type, first.revision) == (EventType.SNAPSHOT, 1)
    await change(store, "a", completed=1)
    event = await next_event(stream)
    assert (event.type, event.revision) == (EventType.CHANGED, 2)
    await change(store, "a", state=State.FAILED)
    event = await next_event(stream)
    assert (event.type, event.revision) == (EventType.CHANGED, 3)
    with pytest.raises(StopAsyncIteration):
        await nxt(stream)


async def test_watch_one_until_deleted(store: MemoryStore, hub: WatchHub, streams: Any) -> None:
    await create(store, "a")
    stream = watch_one(hub, streams, "a")
    await nxt(stream)
    await store.delete("a")
    event = await next_event(stream)
    assert (event.type, event.revision) == (EventType.DELETED, 2)
    with pytest.raises(StopAsyncIteration):
        await nxt(stream)


async def test_watch_one_unknown_is_not_found(hub: WatchHub, streams: Any) -> None:
    with pytest.raises(NotFound):
        await nxt(watch_one(hub, streams, "nope"))


@pytest.mark.parametrize("single", [True, False], ids=["watch_operation", "watch_operations"])
async def test_change_made_while_a_watcher_sends_reaches_it_promptly(
    store: MemoryStore, streams: Any, single: bool
) -> None:
    """A change the pump has already announced while the watcher was busy
    sending must not wait for a later change (or the bookmark) to be read."""
    hub = WatchHub(store, bookmark_interval=30.0)
    await create(store, "a")
    if single:
        stream: AsyncIterator[Any] = watch_one(hub, streams, "a")
        await nxt(stream)  # snapshot
        await change(store, "a", completed=1)  # 2
        assert (await nxt(stream)).revision == 2
    else:
        stream = watch(hub, streams)
        await nxt(stream)  # snapshot
        await nxt(stream)  # SYNCED
        await change(store, "a", completed=1)  # 2
        assert kinds(await nxt(stream)) == [(EventType.CHANGED, 2, "a")]
    # The stream is suspended at its send; a change now, and the pump's round
    # for it, happen before the watcher asks the store again.
    await change(store, "a", completed=2)  # 3
    for _ in range(5):
        await asyncio.sleep(0)
    received = await asyncio.wait_for(anext(stream), 1.0)
    revision = received.revision if single else received[0].revision
    assert revision == 3
    hub.stop()


# --- pacing -----------------------------------------------------------------------------


async def test_paced_stream_sends_the_latest_states_together_after_the_interval(
    store: MemoryStore, streams: Any
) -> None:
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0.3)
    try:
        await create(store, "a")  # 1
        await create(store, "b")  # 2
        stream = watch(hub, streams)
        assert kinds(await nxt(stream))[-1] == (EventType.SNAPSHOT, 2, "b")
        assert kinds(await nxt(stream)) == [(EventType.SYNCED, 2, "")]
        began = time.monotonic()
        receiving = asyncio.ensure_future(nxt(stream))
        for i in range(5):
            await change(store, "a", message=str(i))  # 3, 5, ..., 11
            await change(store, "b", message=str(i))  # 4, 6, ..., 12
            await asyncio.sleep(0.02)  # the pump routes each; the watcher waits
        batch = await receiving
        # Woken by the first change only: later ones joined what was pending.
        assert hub.wakeups() == 1
        # Not before the interval, and then one message with each operation's latest state.
        assert time.monotonic() - began >= 0.25
        assert kinds(batch) == [(EventType.CHANGED, 11, "a"), (EventType.CHANGED, 12, "b")]
        # The hub's default applies to streams that ask for none; 0 is "every state".
        assert hub.pacing(None) == 0.3 and hub.pacing(0.0) == 0.0
    finally:
        hub.stop()


@pytest.mark.parametrize("single", [True, False], ids=["watch_operation", "watch_operations"])
async def test_shutdown_ends_a_stream_waiting_out_its_interval(
    store: MemoryStore, streams: Any, single: bool
) -> None:
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=50.0)
    await create(store, "a")
    if single:
        stream: AsyncIterator[Any] = watch_one(hub, streams, "a")
        await nxt(stream)  # SNAPSHOT
    else:
        stream = watch(hub, streams)
        await nxt(stream)  # SNAPSHOT
        await nxt(stream)  # SYNCED
    await change(store, "a", message="x")  # the stream now waits for its interval
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    assert not pending.done()
    hub.stop()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(pending, TIMEOUT)


# --- routing: a change wakes only the watchers it concerns -------------------------------


async def test_changes_wake_only_the_watchers_whose_filter_can_match(
    store: MemoryStore, streams: Any
) -> None:
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0)
    try:
        await create(store, "parent", project="p")
        await create(store, "hot", project="p", parent_id="parent", labels={"team": "a"})
        await create(store, "cold", project="q", labels={"team": "b"})
        concerned = {
            "project p": watch(hub, streams, OperationFilter(project="p")),
            "children of parent": watch(hub, streams, OperationFilter(parent_id="parent")),
            "team a (labels only)": watch(hub, streams, OperationFilter(labels={"team": "a"})),
            "everything": watch(hub, streams),
        }
        unconcerned = [
            *(watch(hub, streams, OperationFilter(project=f"other-{i}")) for i in range(50)),
            watch(hub, streams, OperationFilter(labels={"team": "b"})),
            watch(hub, streams, OperationFilter(project="p", kind="elsewhere")),
            watch(hub, streams, OperationFilter(parent_id="someone-else")),
        ]
        for stream in [*concerned.values(), *unconcerned]:
            while (await nxt(stream))[-1].type is not EventType.SYNCED:
                pass
        cold_watcher = watch_one(hub, streams, "cold")
        await nxt(cold_watcher)  # SNAPSHOT
        assert hub.wakeups() == 0

        for i in range(20):
            await change(store, "hot", message=str(i))
            await asyncio.sleep(0.002)  # a producer's report every few milliseconds
        hot = (await store.get("hot")).revision  # type: ignore[union-attr]
        for name, stream in concerned.items():
            batch = await next_non_bookmark(stream)
            while batch[-1].revision < hot:
                batch = await next_non_bookmark(stream)
            assert batch[-1].operation is not None and batch[-1].operation.id == "hot", name
        # Each concerned watcher was woken at most once per change; nobody else ever.
        assert 4 <= hub.wakeups() <= 4 * 20
        by_stream = hub.wakeups()
        await change(store, "cold", message="x")
        assert kinds([await next_event(cold_watcher)]) == [(EventType.CHANGED, hot + 1, "cold")]
        # "cold" concerns only its own watcher and "everything".
        await asyncio.sleep(0.05)
        assert hub.wakeups() <= by_stream + 2
    finally:
        hub.stop()


async def test_a_quiet_watcher_gets_its_bookmarks_while_other_projects_are_busy(
    store: MemoryStore, streams: Any
) -> None:
    hub = WatchHub(store, bookmark_interval=0.1, min_interval=0)
    try:
        await create(store, "busy", project="p")
        quiet = watch(hub, streams, OperationFilter(project="q"))
        assert kinds(await nxt(quiet)) == [(EventType.SYNCED, 1, "")]
        began = time.monotonic()
        bookmarks: list[tuple[float, int]] = []

        async def read() -> None:
            async for batch in quiet:
                assert [e.type for e in batch] == [EventType.BOOKMARK], batch
                bookmarks.append((time.monotonic() - began, batch[0].revision))

        reader = asyncio.create_task(read())
        while time.monotonic() - began < 0.45:
            await change(store, "busy", message=str(time.monotonic()))
            await asyncio.sleep(0.003)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        assert len(bookmarks) >= 3, bookmarks
        # On time (every 0.1 s, not the pump's rounds), caught up, never woken by "busy".
        assert [r for _, r in bookmarks] == sorted(r for _, r in bookmarks)
        assert hub.wakeups() == 0
    finally:
        hub.stop()


async def test_a_failed_store_read_does_not_stop_the_pump(streams: Any) -> None:
    class FlakyStore(MemoryStore):
        failures = 0

        async def changes(self, after: int, *, limit: int) -> Any:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("store unreachable for a moment")
            return await super().changes(after, limit=limit)

    store = FlakyStore()
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0)
    try:
        await create(store, "a")
        stream = watch(hub, streams)
        await nxt(stream)  # SNAPSHOT
        await nxt(stream)  # SYNCED
        store.failures = 2
        await change(store, "a", message="after the blip")
        assert kinds(await nxt(stream)) == [(EventType.CHANGED, 2, "a")]
        assert store.failures == 0
    finally:
        hub.stop()


async def test_a_resumed_stream_releases_a_non_matching_operation_once(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    """After a resume the client may hold any operation that existed then: one
    that does not match is delivered once, so the client drops it, then never
    again (a fresh stream with the same filter gets nothing at all)."""
    await create(store, "a", project="p")  # 1
    await change(store, "a", state=State.RUNNING)  # 2
    stream = watch(hub, streams, OperationFilter(project="p", states=frozenset({State.FAILED})), 2)
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 2, "")]
    await change(store, "a", completed=1)  # 3
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 3, "a")]
    await change(store, "a", completed=2)  # 4
    await change(store, "a", completed=3)  # 5
    await store.delete("a")  # 6
    await create(store, "b", project="p")  # 7: a change the stream does not show
    await change(store, "b", state=State.FAILED)  # 8: one it does
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 8, "b")]


# --- epochs -----------------------------------------------------------------------------


def epochs(batch: list[WatchEvent]) -> list[tuple[EventType, str]]:
    return [(e.type, e.epoch) for e in batch]


async def test_synced_bookmark_and_reset_carry_the_store_epoch(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    epoch = await store.epoch()
    await create(store, "a")  # 1
    stream = watch(hub, streams)
    assert epochs(await nxt(stream)) == [(EventType.SNAPSHOT, "")]
    assert epochs(await nxt(stream)) == [(EventType.SYNCED, epoch)]
    await change(store, "a", message="x")  # 2
    assert epochs(await next_non_bookmark(stream)) == [(EventType.CHANGED, "")]
    assert epochs(await nxt(stream)) == [(EventType.BOOKMARK, epoch)]
    reset = watch(hub, streams, from_revision=50)  # ahead of the store
    assert epochs(await nxt(reset)) == [(EventType.RESET, epoch)]


async def test_resume_in_the_stores_epoch_catches_up_exactly(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a", project="p")  # 1
    await create(store, "b", project="p")  # 2
    resume_at = await store.revision()
    await change(store, "a", message="a2")  # 3
    await store.delete("b")  # 4
    stream = watch(
        hub, streams, OperationFilter(project="p"), resume_at, from_epoch=await store.epoch()
    )
    assert kinds(await nxt(stream)) == [
        (EventType.CHANGED, 3, "a"),
        (EventType.DELETED, 4, "b"),
        (EventType.SYNCED, 4, ""),
    ]
    await change(store, "a", message="a3")  # 5
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 5, "a")]


async def test_resume_from_another_epoch_resets_even_below_the_stores_revision(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    # The store holds revisions 1..3 of its own; the client's 2 is from another
    # keyspace (a store since flushed, a server since restarted), so it names
    # nothing here: what the client holds is unknown and must be replaced.
    await create(store, "a")  # 1
    await create(store, "b")  # 2
    await change(store, "a", message="x")  # 3
    stream = watch(hub, streams, from_revision=2, from_epoch="an-older-epoch")
    epoch = await store.epoch()
    reset = await nxt(stream)
    assert kinds(reset) == [(EventType.RESET, 3, "")]
    assert epochs(reset) == [(EventType.RESET, epoch)]
    assert kinds(await nxt(stream)) == [(EventType.SNAPSHOT, 2, "b"), (EventType.SNAPSHOT, 3, "a")]
    synced = await nxt(stream)
    assert kinds(synced) == [(EventType.SYNCED, 3, "")]
    assert synced[0].epoch == epoch
    await change(store, "b", message="y")  # 4
    assert kinds(await next_non_bookmark(stream)) == [(EventType.CHANGED, 4, "b")]


async def test_resume_without_an_epoch_trusts_the_revision(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")  # 1
    await create(store, "b")  # 2
    await change(store, "a", message="x")  # 3
    stream = watch(hub, streams, from_revision=2, from_epoch="")
    assert kinds(await nxt(stream)) == [(EventType.CHANGED, 3, "a"), (EventType.SYNCED, 3, "")]


async def test_fresh_watch_ignores_from_epoch(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "a")  # 1
    stream = watch(hub, streams, from_revision=0, from_epoch="an-older-epoch")
    assert kinds(await nxt(stream)) == [(EventType.SNAPSHOT, 1, "a")]
    assert kinds(await nxt(stream)) == [(EventType.SYNCED, 1, "")]


async def test_watch_one_tells_the_epoch_in_its_first_event(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    epoch = await store.epoch()
    await create(store, "a")  # 1
    stream = watch_one(hub, streams, "a")
    first = await nxt(stream)
    assert (first.type, first.revision, first.epoch) == (EventType.SNAPSHOT, 1, epoch)
    await change(store, "a", completed=1)  # 2
    event = await next_event(stream)
    assert (event.type, event.revision, event.epoch) == (EventType.CHANGED, 2, "")
    bookmark = await nxt(stream)
    assert (bookmark.type, bookmark.epoch) == (EventType.BOOKMARK, epoch)


async def test_watch_one_resumed_with_nothing_new_starts_with_a_bookmark(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    epoch = await store.epoch()
    await create(store, "a")  # 1
    await create(store, "b")  # 2
    stream = watch_one(hub, streams, "a", 2, from_epoch=epoch)
    first = await nxt(stream)
    assert (first.type, first.revision, first.epoch) == (EventType.BOOKMARK, 2, epoch)
    await change(store, "a", completed=1)  # 3
    event = await next_event(stream)
    assert (event.type, event.revision, event.epoch) == (EventType.CHANGED, 3, "")


async def test_watch_one_resumed_in_the_stores_epoch_gets_the_latest_change(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    epoch = await store.epoch()
    await create(store, "a")  # 1
    await change(store, "a", completed=1)  # 2
    await change(store, "a", completed=2)  # 3
    stream = watch_one(hub, streams, "a", 1, from_epoch=epoch)
    first = await nxt(stream)
    assert (first.type, first.revision, first.epoch) == (EventType.CHANGED, 3, epoch)


async def test_watch_one_resumed_from_another_epoch_resets_then_snapshots(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    epoch = await store.epoch()
    await create(store, "a")  # 1
    await create(store, "b")  # 2
    # Revision 2 exists here, and "a" has not changed since: without the epoch
    # this resume would wait for a change and leave the client's stale state.
    stream = watch_one(hub, streams, "a", 2, from_epoch="an-older-epoch")
    reset = await nxt(stream)
    assert (reset.type, reset.revision, reset.epoch) == (EventType.RESET, 2, epoch)
    snapshot = await nxt(stream)
    assert (snapshot.type, snapshot.revision) == (EventType.SNAPSHOT, 1)
    assert snapshot.operation is not None and snapshot.operation.id == "a"


async def test_watch_one_resumed_from_another_epoch_of_an_unknown_operation_is_not_found(
    store: MemoryStore, hub: WatchHub, streams: Any
) -> None:
    await create(store, "other")  # 1: from_revision is not ahead of the store
    stream = watch_one(hub, streams, "gone", 1, from_epoch="an-older-epoch")
    assert (await nxt(stream)).type is EventType.RESET
    with pytest.raises(NotFound):
        await nxt(stream)


class FlushedStore(MemoryStore):
    """Acts as a shared store whose keyspace gets flushed: the next read of the
    change history fails as the Redis store's does, and the epoch is new."""

    def __init__(self) -> None:
        super().__init__()
        self.new_epoch = ""
        self.flush_at_next_read = False

    async def epoch(self) -> str:
        return self.new_epoch or await super().epoch()

    async def changes(self, after: int, *, limit: int) -> Any:
        if self.flush_at_next_read:
            self.flush_at_next_read = False
            self.new_epoch = "after-the-flush"
            raise HistoryCompacted("the store's epoch changed")
        return await super().changes(after, limit=limit)


async def test_streams_start_over_in_the_new_epoch_when_the_store_gets_one(
    streams: Any,
) -> None:
    store = FlushedStore()
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0)
    try:
        old_epoch = await store.epoch()
        await create(store, "a")  # 1
        many = watch(hub, streams)
        await nxt(many)  # SNAPSHOT
        assert epochs(await nxt(many)) == [(EventType.SYNCED, old_epoch)]
        one = watch_one(hub, streams, "a")
        assert (await nxt(one)).epoch == old_epoch
        store.flush_at_next_read = True
        await change(store, "a", message="x")  # 2
        assert epochs(await nxt(many)) == [
            (EventType.RESET, "after-the-flush"),
            (EventType.SNAPSHOT, ""),
            (EventType.SYNCED, "after-the-flush"),
        ]
        reset = await nxt(one)
        assert (reset.type, reset.epoch) == (EventType.RESET, "after-the-flush")
        snapshot = await nxt(one)
        assert (snapshot.type, snapshot.revision) == (EventType.SNAPSHOT, 2)
        # A client resuming with what it kept from before the flush starts over.
        resumed = watch(hub, streams, from_revision=1, from_epoch=old_epoch)
        assert kinds(await nxt(resumed)) == [(EventType.RESET, 2, "")]
    finally:
        hub.stop()


async def test_a_new_epoch_is_noticed_even_when_the_history_read_succeeds(
    streams: Any,
) -> None:
    # A flushed keyspace whose revisions have passed the pump's position again
    # must not read as a continuation of the old one.
    store = FlushedStore()
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0)
    try:
        await create(store, "a")
        many = watch(hub, streams)
        await nxt(many)  # SNAPSHOT
        await nxt(many)  # SYNCED
        store.new_epoch = "after-the-flush"
        await change(store, "a", message="x")
        assert [e.type for e in await nxt(many)] == [
            EventType.RESET,
            EventType.SNAPSHOT,
            EventType.SYNCED,
        ]
    finally:
        hub.stop()


async def test_a_store_out_of_reach_ends_streams_with_where_to_resume(streams: Any) -> None:
    class DownStore(MemoryStore):
        down = False

        async def changes(self, after: int, *, limit: int) -> Any:
            if self.down:
                raise StoreUnavailable("store redis://db.invalid:7000/0 is unavailable: refused")
            return await super().changes(after, limit=limit)

    store = DownStore()
    hub = WatchHub(store, bookmark_interval=30.0, min_interval=0)
    try:
        await create(store, "a")  # 1
        many = watch(hub, streams)
        await nxt(many)  # SNAPSHOT
        await nxt(many)  # SYNCED at 1
        store.down = True
        await change(store, "a", message="unseen")  # 2: the pump cannot read it
        with pytest.raises(ShuttingDown) as ended:
            await nxt(many)
        assert ended.value.revision == 1
        assert "store redis://db.invalid:7000/0 is unavailable" in str(ended.value)
    finally:
        hub.stop()
