"""Watch streams as state sync: snapshot, SYNCED, then the latest state of what changed.

A watcher keeps no queue. It remembers the revision it has sent up to and asks
the store for what changed after it; the store keeps only each operation's
latest change, so a slow watcher skips superseded states and its memory is
bounded by the number of operations, never by the update rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from headway_server.domain.errors import HistoryCompacted, NotFound
from headway_server.domain.model import Change, Operation, OperationFilter
from headway_server.store.base import OperationStore

# Changes read from the store per round; a watcher that is further behind
# catches up over several rounds, each one message or a few.
CHANGES_PER_ROUND = 1000
# How long the pump yields to producers after a round of wake-ups, relative to
# the round (see WatchHub); shorter pauses are not worth a timer.
# 0.5, measured in bench/ (README, Performance): with 1.0, flat-out producers of
# one operation watched 1,000 times got ~18x the bare run's reports in and its
# watchers 0.54-0.67x the bare delivery; with 0.5, ~4.7x and 0.99x, and a
# project's watchers the same batching at a lower p99; 0.25 cut producers to ~1.4x.
DEFAULT_YIELD_RATIO = 0.5
MAX_PAUSE = 0.1
MIN_PAUSE = 0.001
# Pacing: a watcher gets at most one change message per interval (tqdm's
# `mininterval` is 0.1 s too): fresh at the pace people read a dashboard, and a
# watcher that reads slowly is never more than about a message behind, because
# what changes meanwhile goes out in its next message as the latest state of
# each operation. Without it, grpc's client library accepts megabytes on a slow
# reader's behalf and the server never sees it as behind.
DEFAULT_MIN_INTERVAL = 0.1
MAX_MIN_INTERVAL = 60.0
# Watchers due within the same few milliseconds share one timer.
_PACING_SLOT = 0.005


class EventType(enum.IntEnum):
    """Numbers are the proto's OperationEvent.Type."""

    SNAPSHOT = 1
    SYNCED = 2
    CHANGED = 3
    DELETED = 4
    BOOKMARK = 5
    RESET = 6


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    revision: int
    operation: Operation | None = None


class ShuttingDown(Exception):
    """The server is stopping; the watcher should resume from `revision`."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"server shutting down; resume from revision {revision}")
        self.revision = revision


class WatchHub:
    """Runs watch streams against a store; one per server."""

    def __init__(
        self,
        store: OperationStore,
        *,
        bookmark_interval: float,
        yield_ratio: float = DEFAULT_YIELD_RATIO,
        max_pause: float = MAX_PAUSE,
        min_interval: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        self.store = store
        self.bookmark_interval = bookmark_interval
        # The pacing of streams that do not ask for their own.
        self.min_interval = min_interval
        # Pacing timers by slot (loop time // _PACING_SLOT): one call_at per
        # slot however many watchers are due in it.
        self._timers: dict[int, asyncio.Event] = {}
        self.open_watchers = 0
        self._stopping = False
        # One task waits on the store for every watcher and wakes them all by
        # setting (and replacing) one event: a per-watcher wait task, timer and
        # cancel on every change cost ~18 % of fan-out time.
        self._tick = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        # After each round of wake-ups the pump leaves the event loop to
        # producers for `yield_ratio` times as long as the round took (at most
        # `max_pause`). A round of a few watchers takes microseconds, so they
        # see every state; a round of thousands takes tens of milliseconds, and
        # then watchers are behind by design: their next round carries every
        # operation changed meanwhile in one message, and producers keep their
        # share of the CPU instead of waiting behind every watcher's send.
        self.yield_ratio = yield_ratio
        self.max_pause = max_pause

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ends every watch stream with ShuttingDown at its next wait."""
        self._stopping = True
        self._tick.set()
        for due in self._timers.values():
            due.set()
        self._timers.clear()
        if self._pump is not None:
            self._pump.cancel()

    async def _pump_changes(self, seen: int) -> None:
        while not self._stopping:
            # A quiet store still gets a round every half bookmark interval, so
            # that watchers can send their bookmarks without a timer each.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.bookmark_interval / 2):
                    await self.store.wait_for_change(seen)
            seen = self.store.revision
            tick, self._tick = self._tick, asyncio.Event()
            started = time.perf_counter()
            tick.set()
            # The watchers just woken were scheduled first: this resumes after
            # each has built and handed its message to grpc.
            await asyncio.sleep(0)
            pause = min(self.max_pause, (time.perf_counter() - started) * self.yield_ratio)
            if pause >= MIN_PAUSE:
                await asyncio.sleep(pause)

    def _round(self) -> asyncio.Event:
        """The tick to wait on for changes after a read of the store made now.

        The pump sets the current tick at its next round once the store's
        revision has moved past the one it last saw, so every change after the
        read sets this tick (or it has been set already): no wake-up is lost.
        """
        if self._pump is None:
            # Started from the revision read now, not whenever the task first
            # runs: a change in between would otherwise wake nobody.
            self._pump = asyncio.create_task(
                self._pump_changes(self.store.revision), name="headway-watch-pump"
            )
        return self._tick

    async def _wait(self, tick: asyncio.Event, resume_at: int) -> None:
        """Waits for `tick` (or shutdown: ShuttingDown(resume_at)).

        No timer per wait: the pump has a round at least every half bookmark
        interval, after which the watcher checks its own bookmark deadline. A
        timer created and cancelled per watcher per round cost ~10 % of fan-out.
        """
        if self._stopping:
            raise ShuttingDown(resume_at)
        if not tick.is_set():
            await tick.wait()
        if self._stopping:
            raise ShuttingDown(resume_at)

    def pacing(self, requested: float | None) -> float:
        """The interval a stream is paced by: its own request, or the server's."""
        return self.min_interval if requested is None else requested

    async def _pace(self, until: float, resume_at: int) -> None:
        """Waits until loop time `until` (or shutdown: ShuttingDown(resume_at))."""
        loop = asyncio.get_running_loop()
        if loop.time() >= until:
            return
        slot = math.ceil(until / _PACING_SLOT)
        due = self._timers.get(slot)
        if due is None:
            due = self._timers[slot] = asyncio.Event()
            loop.call_at(slot * _PACING_SLOT, self._fire, slot)
        await due.wait()
        if self._stopping:
            raise ShuttingDown(resume_at)

    def _fire(self, slot: int) -> None:
        due = self._timers.pop(slot, None)
        if due is not None:
            due.set()

    async def _snapshot(self, where: OperationFilter) -> tuple[list[WatchEvent], int, set[str]]:
        snap = await self.store.snapshot(where)
        events = [WatchEvent(EventType.SNAPSHOT, c.revision, c.operation) for c in snap.changes]
        return events, snap.revision, {c.operation.id for c in snap.changes}

    async def watch_operations(
        self, where: OperationFilter, from_revision: int, *, min_interval: float | None = None
    ) -> AsyncIterator[list[WatchEvent]]:
        """Yields batches of events for every operation matching `where`.

        Changes go out at most once per `min_interval` (None: the hub's
        default), each batch with the latest state of everything changed since
        the one before; the snapshot, SYNCED, RESET and bookmarks are not delayed.
        """
        interval = self.pacing(min_interval)
        loop = asyncio.get_running_loop()
        # Counted here, not in a wrapper generator: a layer per message costs.
        self.open_watchers += 1
        try:
            # Operations this stream has delivered and the client may hold. An
            # operation that stops matching (e.g. finishes under active_only) is
            # delivered once more so the client sees how it ended.
            known: set[str] = set()
            # After a resume the client may hold any operation that matched by
            # identity and existed at from_revision; we cannot know which.
            resumed_at = from_revision
            last = from_revision
            if from_revision > 0:
                try:
                    await self.store.changes(from_revision, limit=0)
                except HistoryCompacted:
                    yield [WatchEvent(EventType.RESET, self.store.revision)]
                    from_revision = resumed_at = 0
            if from_revision == 0:
                events, last, known = await self._snapshot(where)
                if events:
                    yield events
                yield [WatchEvent(EventType.SYNCED, last)]
            synced = from_revision == 0
            sent_at = time.monotonic()
            # Loop time before which this stream sends no further changes; the
            # catch-up of a resume is part of getting in sync, as a snapshot is.
            paced_until = loop.time() + interval if synced else 0.0
            while True:
                await self._pace(paced_until, last)
                tick = self._round()
                read_at = self.store.revision
                try:
                    changes = await self.store.changes(last, limit=CHANGES_PER_ROUND)
                except HistoryCompacted:
                    # Fell behind the tombstone window while catching up.
                    events, last, known = await self._snapshot(where)
                    resumed_at = 0
                    synced_event = WatchEvent(EventType.SYNCED, last)
                    yield [WatchEvent(EventType.RESET, last), *events, synced_event]
                    sent_at = time.monotonic()
                    continue
                batch = [e for c in changes.changes if (e := _select(c, where, known, resumed_at))]
                last = changes.revision
                if not synced and last >= read_at:
                    batch.append(WatchEvent(EventType.SYNCED, last))
                    synced = True
                if batch:
                    yield batch
                    sent_at = time.monotonic()
                    if synced and last >= read_at:
                        # From when grpc took the message: a send that waited on
                        # flow control does not eat into the reader's interval.
                        paced_until = loop.time() + interval
                if last < read_at:
                    # The read stopped at CHANGES_PER_ROUND: read on without waiting.
                    continue
                if not batch and time.monotonic() >= sent_at + self.bookmark_interval:
                    yield [WatchEvent(EventType.BOOKMARK, last)]
                    sent_at = time.monotonic()
                    continue
                # At most one send per round of the pump: what changes meanwhile
                # waits for the next round and then goes in one batch.
                # ...and at most one per interval (at the top of the loop):
                # changes made meanwhile go out together, each operation's
                # latest state once.
                await self._wait(tick, last)
        finally:
            self.open_watchers -= 1

    async def watch_operation(
        self, operation_id: str, from_revision: int, *, min_interval: float | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Yields the events of one operation; ends after its terminal state or deletion.

        Changes are paced as in watch_operations: at most one per `min_interval`,
        always the latest state.
        """
        interval = self.pacing(min_interval)
        loop = asyncio.get_running_loop()
        # Counted here, not in a wrapper generator: a layer per message costs.
        self.open_watchers += 1
        try:
            tick = self._round()
            op = await self.store.get(operation_id)
            if from_revision > self.store.revision:
                # The client's revision is from before a restart of this store.
                yield WatchEvent(EventType.RESET, self.store.revision)
                from_revision = 0
            if op is None:
                tomb = await self.store.tombstone(operation_id) if from_revision else None
                if tomb is None or tomb.revision <= from_revision:
                    raise NotFound(f"operation {operation_id!r} not found")
                yield WatchEvent(EventType.DELETED, tomb.revision, tomb.operation)
                return
            last = from_revision
            if op.revision > from_revision:
                kind = EventType.SNAPSHOT if from_revision == 0 else EventType.CHANGED
                yield WatchEvent(kind, op.revision, op)
                last = op.revision
            sent_at = time.monotonic()
            paced_until = loop.time() + interval
            while not op.state.terminal:
                deadline = sent_at + self.bookmark_interval
                if time.monotonic() >= deadline:
                    # Straight after a read: nothing for this stream up to here.
                    yield WatchEvent(EventType.BOOKMARK, max(last, self.store.revision))
                    sent_at = time.monotonic()
                    continue
                # Returns at once if the pump has had a round since the last read.
                await self._wait(tick, last)
                await self._pace(paced_until, last)
                tick = self._round()
                current = await self.store.get(operation_id)
                if current is None:
                    tomb = await self.store.tombstone(operation_id)
                    revision = tomb.revision if tomb else self.store.revision
                    yield WatchEvent(EventType.DELETED, revision, op)
                    return
                op = current
                if op.revision > last:
                    yield WatchEvent(EventType.CHANGED, op.revision, op)
                    last = op.revision
                    sent_at = time.monotonic()
                    paced_until = loop.time() + interval
        finally:
            self.open_watchers -= 1


def _select(
    change: Change, where: OperationFilter, known: set[str], resumed_at: int
) -> WatchEvent | None:
    """The event this change makes on a stream watching `where`, if any."""
    op = change.operation
    held = op.id in known or (
        resumed_at > 0 and op.created_revision <= resumed_at and where.matches_spec(op.spec)
    )
    if change.deleted:
        known.discard(op.id)
        return WatchEvent(EventType.DELETED, change.revision, op) if held else None
    if where.matches(op):
        known.add(op.id)
    elif held:
        known.discard(op.id)
    else:
        return None
    return WatchEvent(EventType.CHANGED, change.revision, op)
