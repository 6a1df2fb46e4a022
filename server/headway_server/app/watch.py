"""Watch streams as state sync: snapshot, SYNCED, then the latest state of what changed.

A watcher keeps no queue of events: it holds the latest change of each
operation it has not sent yet (a dict by operation id), so a slow watcher skips
superseded states and its memory is bounded by the number of operations, never
by the update rate.

One pump per hub reads the store's change log once per round and routes each
change only to the watchers whose filter can match it, through indexes by
operation id, project and parent (the rest, filters on kind, labels or states
only, sit in one bucket checked per change), as Kubernetes' watch cache does
with its indexed triggers: a change costs in proportion to the watchers it
concerns, and a watcher nothing touched costs nothing per round. Bookmarks
and pacing run on shared timers, not on the pump's rounds.

Revisions count within one epoch of the store (OperationStore.epoch): SYNCED,
BOOKMARK and RESET carry it, and so does the first event of a single-operation
stream, so that a client can say which epoch its resume position belongs to.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from headway_server.domain.errors import HistoryCompacted, NotFound, StoreUnavailable
from headway_server.domain.model import Change, Operation, OperationFilter
from headway_server.store.base import OperationStore

log = logging.getLogger("headway.watch")

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
# After a failed read of the store, the pump tries again this much later.
PUMP_RETRY = 0.1
# Pacing: a watcher gets at most one change message per interval (tqdm's
# `mininterval` is 0.1 s too): fresh at the pace people read a dashboard, and a
# watcher that reads slowly is never more than about a message behind, because
# what changes meanwhile goes out in its next message as the latest state of
# each operation. Without it, grpc's client library accepts megabytes on a slow
# reader's behalf and the server never sees it as behind.
DEFAULT_MIN_INTERVAL = 0.1
MAX_MIN_INTERVAL = 60.0
# Watchers due within the same few milliseconds share one timer.
_TIMER_SLOT = 0.005


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
    # The store's epoch on SYNCED, BOOKMARK, RESET and a WatchOperation
    # stream's first event; "" on the rest.
    epoch: str = ""


class ShuttingDown(Exception):
    """The stream must end (the server is stopping, or its store is out of
    reach); the watcher should resume from `revision`, here or elsewhere."""

    def __init__(self, revision: int, reason: str = "server shutting down") -> None:
        super().__init__(f"{reason}; resume from revision {revision}")
        self.revision = revision


class _Watcher:
    """One open stream, as the pump sees it: what it watches, what is pending."""

    __slots__ = (
        "alarms",
        "failed",
        "key",
        "pending",
        "reset",
        "snoozing",
        "wake",
        "wakeups",
        "where",
    )

    def __init__(self, where: OperationFilter | None, key: tuple[str, str]) -> None:
        # None for a single-operation watch (key names the operation).
        self.where = where
        self.key = key
        # The latest change of each operation routed here and not yet sent.
        self.pending: dict[str, Change] = {}
        self.wake = asyncio.Event()
        # Timer slots armed for this watcher (see WatchHub._alarm).
        self.alarms: set[int] = set()
        # Times the pump woke it with a change (timers not counted).
        self.wakeups = 0
        # The pump lost the change history: the stream must start over.
        self.reset = False
        # The store is out of reach (its error): the stream must end.
        self.failed = ""
        # Waiting out its pacing interval with changes pending: its alarm wakes
        # it, so changes routed meanwhile only join what is pending.
        self.snoozing = False


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
        self.open_watchers = 0
        # Every change up to this revision has been routed to the watchers.
        self.dispatched = 0
        # Watchers by what their filter pins down: ("operation", id),
        # ("project", name), ("parent", id); the rest under ("", "").
        # Each bucket is a dict used as an ordered set: a round wakes watchers
        # in the order they started watching, as one shared event's waiters
        # were woken, rather than in an arbitrary hash order.
        self._index: dict[tuple[str, str], dict[_Watcher, None]] = {}
        # Timer slots (loop time / _TIMER_SLOT, rounded up) -> watchers to wake:
        # one call_at per slot however many watchers are due in it.
        self._slots: dict[int, list[_Watcher]] = {}
        self._stopping = False
        self._pump: asyncio.Task[None] | None = None
        # The store's epoch, read by the first stream and again only when the
        # store reports lost history (see epoch()).
        self._epoch: str | None = None
        # After each round of routing the pump leaves the event loop to
        # producers for `yield_ratio` times as long as the round took (at most
        # `max_pause`). A round that wakes a few watchers takes microseconds, so
        # they see every state; one that wakes thousands takes tens of
        # milliseconds, and then watchers are behind by design: their next
        # message carries every operation changed meanwhile, and producers keep
        # their share of the CPU instead of waiting behind every watcher's send.
        self.yield_ratio = yield_ratio
        self.max_pause = max_pause

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Ends every watch stream with ShuttingDown at its next wait."""
        self._stopping = True
        for watchers in self._index.values():
            for watcher in watchers:
                watcher.wake.set()
        self._slots.clear()
        if self._pump is not None:
            self._pump.cancel()

    def pacing(self, requested: float | None) -> float:
        """The interval a stream is paced by: its own request, or the server's."""
        return self.min_interval if requested is None else requested

    def _bookmark_every(self, asked: float | None) -> float:
        return self.bookmark_interval if asked is None else min(asked, self.bookmark_interval)

    async def epoch(self) -> str:
        """The store's epoch, cached: a hub serves one store, and a memory store
        keeps one epoch for its life. A shared store gets a new one when its
        keyspace is flushed, and then reports lost history (HistoryCompacted)
        for the revisions before: that is when the hub reads it again."""
        if self._epoch is None:
            self._epoch = await self.store.epoch()
        return self._epoch

    async def _reread_epoch(self) -> str:
        self._epoch = await self.store.epoch()
        return self._epoch

    # --- routing ------------------------------------------------------------------------

    async def _add(self, where: OperationFilter | None, operation_id: str = "") -> _Watcher:
        """Registers a watcher: every change after `dispatched` is routed to it."""
        if where is None:
            key = ("operation", operation_id)
        elif where.project:
            key = ("project", where.project)
        elif where.parent_id:
            key = ("parent", where.parent_id)
        else:
            key = ("", "")
        watcher = _Watcher(where, key)
        self._index.setdefault(key, {})[watcher] = None
        if self._pump is None:
            # From the revision read now, not whenever the task first runs: a
            # change in between would otherwise reach nobody.
            start = await self.store.revision()
            if self._pump is None:  # no other watcher started it meanwhile
                self.dispatched = start
                self._pump = asyncio.create_task(self._pump_changes(), name="headway-watch-pump")
        return watcher

    def _remove(self, watcher: _Watcher) -> None:
        watchers = self._index.get(watcher.key)
        if watchers is not None:
            watchers.pop(watcher, None)
            if not watchers:
                del self._index[watcher.key]

    async def _pump_changes(self) -> None:
        while not self._stopping:
            try:
                await self._pump_round()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                # Watchers cannot be told what changes meanwhile: end their
                # streams UNAVAILABLE with where to resume (on another replica,
                # or here once the store is back).
                if self.open_watchers:
                    log.warning(
                        "watch pump lost the store; ending streams",
                        extra={"detail": str(exc), "watchers": self.open_watchers},
                    )
                for watchers in self._index.values():
                    for watcher in watchers:
                        watcher.failed = str(exc)
                        watcher.wake.set()
                await asyncio.sleep(PUMP_RETRY)
            except Exception:
                # A store that failed a read must not leave every watcher
                # waiting forever: try again shortly.
                log.exception("watch pump failed; retrying")
                await asyncio.sleep(PUMP_RETRY)

    async def _pump_round(self) -> None:
        """One round: read what changed since `dispatched` and route it."""
        if await self.store.revision() <= self.dispatched:
            await self.store.wait_for_change(self.dispatched)
        started = time.perf_counter()
        try:
            if self._epoch is not None and await self.store.epoch() != self._epoch:
                # A shared store's keyspace was replaced (flushed): its
                # revisions count from 0 again, and may already have passed
                # `dispatched`, so they must not be read as a continuation.
                raise HistoryCompacted("the store's epoch changed")
            changes = await self.store.changes(self.dispatched, limit=CHANGES_PER_ROUND)
        except HistoryCompacted:
            # More deletions in one round than the store keeps tombstones
            # for (or a new keyspace): nobody can be told what they missed,
            # so all start over, in the store's epoch as it is now.
            await self._reread_epoch()
            self.dispatched = await self.store.revision()
            for watchers in self._index.values():
                for watcher in watchers:
                    watcher.reset = True
                    watcher.wake.set()
            return
        for change in changes.changes:
            self._route(change)
        self.dispatched = changes.revision
        # The watchers just woken were scheduled first: this resumes after
        # each has built and handed its message to grpc.
        await asyncio.sleep(0)
        pause = min(self.max_pause, (time.perf_counter() - started) * self.yield_ratio)
        if pause >= MIN_PAUSE:
            await asyncio.sleep(pause)

    def _route(self, change: Change) -> None:
        op = change.operation
        spec = op.spec
        index = self._index
        concerned: Iterable[_Watcher] = itertools.chain(
            index.get(("operation", op.id), ()),
            index.get(("project", spec.project), ()) if spec.project else (),
            index.get(("parent", spec.parent_id), ()) if spec.parent_id else (),
            index.get(("", ""), ()),
        )
        for watcher in concerned:
            # Spec fields never change: an operation whose spec does not match
            # can never match, so the watcher need not hear of it.
            if watcher.where is not None and not watcher.where.matches_spec(spec):
                continue
            watcher.pending[op.id] = change
            if not watcher.snoozing and not watcher.wake.is_set():
                watcher.wakeups += 1
                watcher.wake.set()

    def wakeups(self) -> int:
        """Times the pump has woken the open watchers with a change (for tests)."""
        return sum(w.wakeups for watchers in self._index.values() for w in watchers)

    # --- waiting ------------------------------------------------------------------------

    def _alarm(self, watcher: _Watcher, at: float) -> None:
        """Wakes `watcher` at loop time `at` (rounded up to the timer slot)."""
        slot = math.ceil(at / _TIMER_SLOT)
        if any(armed <= slot for armed in watcher.alarms):
            return  # an alarm no later is armed; the watcher re-arms when it rings
        watcher.alarms.add(slot)
        due = self._slots.get(slot)
        if due is None:
            due = self._slots[slot] = []
            asyncio.get_running_loop().call_at(slot * _TIMER_SLOT, self._ring, slot)
        due.append(watcher)

    def _ring(self, slot: int) -> None:
        for watcher in self._slots.pop(slot, ()):
            watcher.alarms.discard(slot)
            watcher.wake.set()

    async def _sleep(self, watcher: _Watcher, until: float, resume_at: int) -> None:
        """Waits for a change routed to `watcher` or loop time `until` (or
        shutdown: ShuttingDown(resume_at))."""
        if self._stopping:
            raise ShuttingDown(resume_at)
        if not watcher.wake.is_set():
            self._alarm(watcher, until)
            # Changes are pending and only the interval holds them back: what
            # the pump routes meanwhile need not wake this watcher early.
            watcher.snoozing = bool(watcher.pending)
            try:
                await watcher.wake.wait()
            finally:
                watcher.snoozing = False
        # Cleared before the caller looks at what is pending: a change routed
        # after this sets it again, so none is missed.
        watcher.wake.clear()
        if self._stopping:
            raise ShuttingDown(resume_at)
        if watcher.failed:
            raise ShuttingDown(resume_at, watcher.failed)

    async def _snapshot(self, where: OperationFilter) -> tuple[list[WatchEvent], int, set[str]]:
        snap = await self.store.snapshot(where)
        events = [WatchEvent(EventType.SNAPSHOT, c.revision, c.operation) for c in snap.changes]
        return events, snap.revision, {c.operation.id for c in snap.changes}

    # --- streams ------------------------------------------------------------------------

    async def watch_operations(
        self,
        where: OperationFilter,
        from_revision: int,
        *,
        from_epoch: str = "",
        min_interval: float | None = None,
        bookmark_interval: float | None = None,
    ) -> AsyncIterator[list[WatchEvent]]:
        """Yields batches of events for every operation matching `where`.

        Changes go out at most once per `min_interval` (None: the hub's
        default), each batch with the latest state of everything changed since
        the one before; the snapshot, SYNCED, RESET, bookmarks and a resume's
        catch-up are not delayed. A resume (`from_revision` > 0) whose
        `from_epoch` is given and is not the store's starts with RESET and a
        fresh snapshot; an empty `from_epoch` trusts the revision. A quiet
        stream gets a BOOKMARK every `bookmark_interval` (None: the hub's; a
        stream may ask for them more often, not less).
        """
        interval = self.pacing(min_interval)
        every = self._bookmark_every(bookmark_interval)
        loop = asyncio.get_running_loop()
        # Registered before the first read, so that whatever that read misses is routed.
        watcher = await self._add(where)
        # Counted here, not in a wrapper generator: a layer per message costs.
        self.open_watchers += 1
        try:
            epoch = await self.epoch()
            # Operations this stream has delivered and the client may hold. An
            # operation that stops matching (e.g. finishes under active_only) is
            # delivered once more so the client sees how it ended.
            known: set[str] = set()
            # After a resume the client may hold any operation that matched by
            # identity and existed at from_revision; we cannot know which.
            resumed_at = from_revision
            released: set[str] = set()
            last = from_revision
            # A revision from another epoch of the store says nothing about
            # what the client holds, even when it is not ahead of this one.
            restart = from_revision > 0 and from_epoch != "" and from_epoch != epoch
            if from_revision > 0 and not restart:
                # The catch-up, read from the store in pages up to where the
                # store was when it began; later changes are routed here.
                read_at = await self.store.revision()
                while True:
                    try:
                        changes = await self.store.changes(last, limit=CHANGES_PER_ROUND)
                    except HistoryCompacted:
                        restart = True
                        epoch = await self._reread_epoch()
                        break
                    batch = [
                        e
                        for c in changes.changes
                        if (e := _select(c, where, known, resumed_at, released))
                    ]
                    last = changes.revision
                    if last >= read_at:
                        yield [*batch, WatchEvent(EventType.SYNCED, last, epoch=epoch)]
                        break
                    if batch:
                        yield batch
            if restart:
                yield [WatchEvent(EventType.RESET, await self.store.revision(), epoch=epoch)]
            if from_revision == 0 or restart:
                events, last, known = await self._snapshot(where)
                resumed_at = 0
                if events:
                    yield events
                yield [WatchEvent(EventType.SYNCED, last, epoch=epoch)]
            sent_at = loop.time()
            paced_until = sent_at + interval
            while True:
                if watcher.reset:
                    watcher.reset = False
                    watcher.pending.clear()
                    epoch = await self.epoch()  # the pump read it again
                    events, last, known = await self._snapshot(where)
                    resumed_at = 0
                    synced = WatchEvent(EventType.SYNCED, last, epoch=epoch)
                    yield [WatchEvent(EventType.RESET, last, epoch=epoch), *events, synced]
                    sent_at = loop.time()
                    paced_until = sent_at + interval
                    continue
                now = loop.time()
                if watcher.pending and now >= paced_until:
                    pending, watcher.pending = watcher.pending, {}
                    # Everything routed up to here is in `pending` (or did not
                    # concern this stream).
                    caught_up = self.dispatched
                    fresh = sorted(
                        (c for c in pending.values() if c.revision > last),
                        key=_by_revision,
                    )
                    batch = [
                        e for c in fresh if (e := _select(c, where, known, resumed_at, released))
                    ]
                    last = max(last, caught_up)
                    if batch:
                        yield batch
                        # From when grpc took the message: a send that waited on
                        # flow control does not eat into the reader's interval.
                        sent_at = loop.time()
                        paced_until = sent_at + interval
                    continue
                if now >= sent_at + every:
                    if not watcher.pending:
                        last = max(last, self.dispatched)
                    yield [WatchEvent(EventType.BOOKMARK, last, epoch=epoch)]
                    sent_at = loop.time()
                    continue
                wake_at = sent_at + every
                if watcher.pending:
                    wake_at = min(wake_at, paced_until)
                await self._sleep(watcher, wake_at, last)
        finally:
            self._remove(watcher)
            self.open_watchers -= 1

    async def watch_operation(
        self,
        operation_id: str,
        from_revision: int,
        *,
        from_epoch: str = "",
        min_interval: float | None = None,
        bookmark_interval: float | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Yields the events of one operation; ends after its terminal state or deletion.

        Changes are paced as in watch_operations: at most one per `min_interval`,
        always the latest state. The first event carries the store's epoch (the
        stream has no SYNCED): a resume with nothing new since `from_revision`
        starts with a BOOKMARK at it. A resume from another epoch, or from a
        revision ahead of the store, starts with RESET and a SNAPSHOT.
        Bookmarks as in watch_operations.
        """
        interval = self.pacing(min_interval)
        every = self._bookmark_every(bookmark_interval)
        loop = asyncio.get_running_loop()
        watcher = await self._add(None, operation_id)
        # Counted here, not in a wrapper generator: a layer per message costs.
        self.open_watchers += 1
        try:
            epoch = await self.epoch()
            op = await self.store.get(operation_id)
            current_revision = await self.store.revision()
            # The client's revision is from another epoch of the store: a
            # different one it named, or (clients that name none) one ahead of
            # this store's, as after a restart of a memory store.
            reset = from_revision > current_revision or (
                from_revision > 0 and from_epoch != "" and from_epoch != epoch
            )
            if reset:
                yield WatchEvent(EventType.RESET, current_revision, epoch=epoch)
                from_revision = 0
            if op is None:
                tomb = await self.store.tombstone(operation_id) if from_revision else None
                if tomb is None or tomb.revision <= from_revision:
                    raise NotFound(f"operation {operation_id!r} not found")
                yield WatchEvent(EventType.DELETED, tomb.revision, tomb.operation, epoch)
                return
            last = from_revision
            if op.revision > from_revision:
                kind = EventType.SNAPSHOT if from_revision == 0 else EventType.CHANGED
                # After a RESET the client has the epoch already.
                yield WatchEvent(kind, op.revision, op, "" if reset else epoch)
                last = op.revision
            else:
                # A resume with nothing new: caught up to from_revision, in this epoch.
                yield WatchEvent(EventType.BOOKMARK, last, epoch=epoch)
            sent_at = loop.time()
            paced_until = sent_at + interval
            while not op.state.terminal:
                if watcher.reset:
                    # The pump lost history: read the operation itself.
                    watcher.reset = False
                    current = await self.store.get(operation_id)
                    if (fresh := await self.epoch()) != epoch:
                        # A new keyspace: the client's revisions mean nothing
                        # now, so the stream starts over as a new one would.
                        epoch = fresh
                        watcher.pending.pop(operation_id, None)
                        yield WatchEvent(EventType.RESET, await self.store.revision(), epoch=epoch)
                        if current is None:
                            raise NotFound(f"operation {operation_id!r} not found")
                        op = current
                        yield WatchEvent(EventType.SNAPSHOT, op.revision, op)
                        last = op.revision
                        sent_at = loop.time()
                        paced_until = sent_at + interval
                        continue
                    tomb = None if current else await self.store.tombstone(operation_id)
                    watcher.pending[operation_id] = (
                        Change(current.revision, current)
                        if current
                        else Change(
                            tomb.revision if tomb else await self.store.revision(), op, True
                        )
                    )
                now = loop.time()
                change = watcher.pending.get(operation_id)
                if change is not None and now >= paced_until:
                    del watcher.pending[operation_id]
                    if change.revision <= last:
                        continue
                    if change.deleted:
                        yield WatchEvent(EventType.DELETED, change.revision, op)
                        return
                    op = change.operation
                    yield WatchEvent(EventType.CHANGED, op.revision, op)
                    last = op.revision
                    sent_at = loop.time()
                    paced_until = sent_at + interval
                    continue
                if now >= sent_at + every:
                    mark = last if change is not None else max(last, self.dispatched)
                    yield WatchEvent(EventType.BOOKMARK, mark, epoch=epoch)
                    sent_at = loop.time()
                    continue
                wake_at = sent_at + every
                if change is not None:
                    wake_at = min(wake_at, paced_until)
                await self._sleep(watcher, wake_at, last)
        finally:
            self._remove(watcher)
            self.open_watchers -= 1


def _by_revision(change: Change) -> int:
    return change.revision


def _select(
    change: Change,
    where: OperationFilter,
    known: set[str],
    resumed_at: int,
    released: set[str],
) -> WatchEvent | None:
    """The event this change makes on a stream watching `where`, if any.

    `released`: operations a resumed stream has since told the client to drop
    (delivered once more as no longer matching, or deleted), which it no longer
    holds whatever it held at `resumed_at`.
    """
    op = change.operation
    held = op.id in known or (
        resumed_at > 0
        and op.created_revision <= resumed_at
        and op.id not in released
        and where.matches_spec(op.spec)
    )
    if change.deleted:
        known.discard(op.id)
        if resumed_at > 0:
            released.add(op.id)
        return WatchEvent(EventType.DELETED, change.revision, op) if held else None
    if where.matches(op):
        known.add(op.id)
    elif held:
        known.discard(op.id)
        if resumed_at > 0:
            released.add(op.id)
    else:
        return None
    return WatchEvent(EventType.CHANGED, change.revision, op)
