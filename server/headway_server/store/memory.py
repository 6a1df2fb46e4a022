"""In-memory store: the default, and the reference for the store contract."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import secrets
from bisect import bisect_left, bisect_right
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    HeadwayError,
    HistoryCompacted,
    NotFound,
    ResourceExhausted,
)
from headway_server.domain.model import (
    Change,
    ChildProgress,
    FinishedOperation,
    HeldOperation,
    Operation,
    OperationFilter,
    State,
    evolve,
)
from headway_server.domain.stats import StatsAggregate
from headway_server.store.base import Changes, Page
from headway_server.store.journal import Journal, MemoryJournal
from headway_server.store.packing import Unpackable, pack_operation, unpack_operation

# Finished operations kept unpacked after their last read or write: a finish is
# read by every watcher of it right away, and each should get the same value
# (the wire cache in convert.py is keyed by it) without unpacking it again.
UNPACKED_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class _Deleted:
    """A tombstone of a finished operation, still packed."""

    revision: int
    held: FinishedOperation


# What the change history holds at a revision.
_Entry = Change | FinishedOperation | _Deleted

# Superseded entries the history keeps blanked before it compacts (and never
# more than it has live entries).
_MIN_BLANKS_TO_COMPACT = 1024


class _History:
    """Entries in revision order, each live operation once, at its latest revision.

    Every write supersedes its operation's previous entry, so this is on the
    path of every report (bench: UpdateOperation calls/s, BatchUpdateOperations).
    Revisions only grow, so entries are appended to two parallel lists; a
    superseded one is found by bisection and blanked in place, and the lists are
    compacted once blanks outnumber live entries: a list append and a bisection
    per write instead of a sorted map's removal and insertion.
    """

    def __init__(self) -> None:
        self._revisions: list[int] = []
        self._entries: list[_Entry | None] = []
        self._blanks = 0

    def append(self, revision: int, entry: _Entry) -> None:
        self._revisions.append(revision)
        self._entries.append(entry)

    def _index(self, revision: int) -> int:
        i = bisect_left(self._revisions, revision)
        if i == len(self._revisions) or self._revisions[i] != revision or self._entries[i] is None:
            raise KeyError(revision)
        return i

    def __getitem__(self, revision: int) -> _Entry:
        entry = self._entries[self._index(revision)]
        assert entry is not None  # _index checked it
        return entry

    def __delitem__(self, revision: int) -> None:
        self._entries[self._index(revision)] = None
        self._blanks += 1
        if self._blanks >= _MIN_BLANKS_TO_COMPACT and 2 * self._blanks > len(self._entries):
            live = [
                (r, e) for r, e in zip(self._revisions, self._entries, strict=True) if e is not None
            ]
            self._revisions = [r for r, _ in live]
            self._entries = [e for _, e in live]
            self._blanks = 0

    def after(self, revision: int) -> Iterator[tuple[int, _Entry]]:
        """(revision, entry) above `revision`, oldest first; consume before writing."""
        revisions, entries = self._revisions, self._entries
        for i in range(bisect_right(revisions, revision), len(entries)):
            entry = entries[i]
            if entry is not None:
                yield revisions[i], entry

    def values(self) -> Iterator[_Entry]:
        return (entry for entry in self._entries if entry is not None)


class MemoryStore:
    """Holds operations in a dict and their latest changes ordered by revision.

    Finished operations are held packed (store.packing) with the fields that
    filters, sweeps and roll-ups read beside the bytes, and unpacked by the
    reads that return whole operations.

    All methods run on one event loop and never await between reading and
    writing, so each call is atomic without a lock.
    """

    def __init__(
        self,
        *,
        max_operations: int = 100_000,
        history_size: int = 10_000,
        pack_finished: bool = True,
    ) -> None:
        self._max_operations = max_operations
        self._history_size = history_size
        self._pack_finished = pack_finished
        self._revision = 0
        # Running operations whole; finished ones packed (store.packing).
        self._operations: dict[str, HeldOperation] = {}
        # revision -> _Entry; each live operation appears once, at its latest
        # revision, so "changes after N" is a range read that skips superseded
        # states by construction.
        self._log = _History()
        self._unpacked: OrderedDict[str, Operation] = OrderedDict()
        # Tombstones in deletion order (id -> revision), oldest dropped first.
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        # Highest revision whose tombstone was dropped: resuming below it would miss a delete.
        self._compacted = 0
        self._changed = asyncio.Event()
        # Whether anyone waits on _changed (so a write with nobody waiting, such
        # as all but the first of a batch, makes no new event).
        self._waited = False
        # parent id -> child ids (dict as an ordered set), for roll-ups.
        self._children: dict[str, dict[str, None]] = {}
        self._secret = secrets.token_bytes(32)
        self._epoch = secrets.token_hex(8)
        self.journal: Journal = MemoryJournal()
        self.stats = StatsAggregate()
        # id -> what children() last answered for it (see _child).
        self._child_views: dict[str, ChildProgress] = {}
        # Indexes for sweeps and counts (see _index): lease deadline by id of
        # the operations that can stall; finish time by id of the terminal
        # ones, with a heap in finish order (entries of operations deleted or
        # finished again since are skipped when they come up); counts.
        self._leases: dict[str, tuple[float, float]] = {}
        self._finish_times: dict[str, float] = {}
        self._finish_heap: list[tuple[float, str]] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._active: Counter[str] = Counter()  # active operations by project

    async def revision(self) -> int:
        return self._revision

    async def secret(self) -> bytes:
        # This store's data lives and dies with the process, and so does its key.
        return self._secret

    async def epoch(self) -> str:
        # A new process is a new keyspace: revisions start again from 0.
        return self._epoch

    def _index(self, previous: HeldOperation | None, stored: HeldOperation | None) -> None:
        """Keeps the lease, finish-time and count indexes in step with a write."""
        if previous is not None:
            self._counts[previous.state.name, previous.kind] -= 1
            if previous.state.active:
                self._active[previous.spec.project] -= 1
            if previous.state.terminal and (stored is None or not stored.state.terminal):
                self._finish_times.pop(previous.id, None)
                # Its heap entry is now stale; rebuild when stale ones dominate,
                # so the heap follows what is held, not every finish ever made.
                if len(self._finish_heap) > 2 * len(self._finish_times) + 1024:
                    self._finish_heap = [(t, i) for i, t in self._finish_times.items()]
                    heapq.heapify(self._finish_heap)
        if stored is None:
            if previous is not None:
                self._leases.pop(previous.id, None)
            return
        self._counts[stored.state.name, stored.kind] += 1
        if stored.state.active:
            self._active[stored.spec.project] += 1
        if isinstance(stored, Operation):
            if (
                stored.state is State.RUNNING
                and not stored.stalled
                and stored.heartbeat_timeout > 0
            ):
                self._leases[stored.id] = (stored.last_report_at, stored.heartbeat_timeout)
            else:
                self._leases.pop(stored.id, None)
        else:
            self._leases.pop(stored.id, None)
        if stored.state.terminal and stored.finished_at is not None:
            if stored.id not in self._finish_times:
                self._finish_times[stored.id] = stored.finished_at
                heapq.heappush(self._finish_heap, (stored.finished_at, stored.id))

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    def _notify(self) -> None:
        # Wake every waiter once; new waiters wait on a fresh event.
        if self._waited:
            event, self._changed = self._changed, asyncio.Event()
            self._waited = False
            event.set()

    def _hold(self, op: Operation) -> HeldOperation:
        """What the store keeps of a value it stores: a finished one packed."""
        if not (self._pack_finished and op.state.terminal) or op.stalled:
            return op
        try:
            packed = pack_operation(op)
        except Unpackable:
            return op  # kept whole: correct, only larger
        self._remember(op)
        return FinishedOperation(
            op.id,
            op.spec,
            op.state,
            op.revision,
            op.created_revision,
            op.finished_at,
            op.total,
            op.percent,
            packed,
            op.combined_measures,
        )

    def _remember(self, op: Operation) -> None:
        self._unpacked[op.id] = op
        self._unpacked.move_to_end(op.id)
        if len(self._unpacked) > UNPACKED_CACHE_SIZE:
            self._unpacked.popitem(last=False)

    def _whole(self, held: HeldOperation) -> Operation:
        if isinstance(held, Operation):
            return held
        cached = self._unpacked.get(held.id)
        # Revisions are unique store-wide, so (id, revision) names one value.
        if cached is not None and cached.revision == held.revision:
            self._unpacked.move_to_end(held.id)
            return cached
        op = unpack_operation(held.id, held.spec, held.packed)
        self._remember(op)
        return op

    def _change(self, entry: _Entry) -> Change:
        if isinstance(entry, Change):
            return entry
        if isinstance(entry, FinishedOperation):
            return Change(entry.revision, self._whole(entry))
        return Change(entry.revision, self._whole(entry.held), deleted=True)

    def _record(self, stored: Operation, previous_revision: int | None) -> None:
        if previous_revision is not None:
            del self._log[previous_revision]
        held = self._hold(stored)
        previous = self._operations.get(stored.id)
        if stored.state.terminal and (previous is None or not previous.state.terminal):
            self.stats.record_finished(stored)
        self._index(previous, held)
        self._operations[stored.id] = held
        self._log.append(
            stored.revision,
            Change(stored.revision, stored) if isinstance(held, Operation) else held,
        )
        self._notify()

    async def get(self, operation_id: str) -> Operation | None:
        held = self._operations.get(operation_id)
        return None if held is None else self._whole(held)

    async def get_cached(self, operation_id: str) -> Operation | None:
        return await self.get(operation_id)  # one process: never stale

    async def check(self) -> None:
        pass  # in this process: available while the process is

    async def close(self) -> None:
        pass

    async def create(self, operation: Operation) -> Operation:
        if operation.id in self._operations:
            raise AlreadyExists(f"operation {operation.id!r} already exists")
        if len(self._operations) >= self._max_operations:
            raise ResourceExhausted(
                f"the store holds its maximum of {self._max_operations} operations"
            )
        revision = self._next()
        stored = evolve(operation, revision=revision, created_revision=revision)
        # An id deleted earlier and created again is live, not a tombstone.
        old = self._tombstones.pop(stored.id, None)
        if old is not None:
            del self._log[old]
        if stored.parent_id:
            self._children.setdefault(stored.parent_id, {})[stored.id] = None
        self._record(stored, None)
        return stored

    async def replace(self, operation: Operation, *, expected_revision: int) -> Operation:
        current = self._operations.get(operation.id)
        if current is None:
            raise NotFound(f"operation {operation.id!r} not found")
        if current.revision != expected_revision:
            raise Conflict(f"operation {operation.id!r} changed concurrently")
        stored = evolve(operation, revision=self._next())
        self._record(stored, current.revision)
        return stored

    async def replace_many(
        self, writes: Sequence[tuple[Operation, int | None]]
    ) -> list[Operation | HeadwayError]:
        outcomes: list[Operation | HeadwayError] = []
        stored: dict[str, int | None] = {}
        for op, expected in writes:
            if expected is None:
                expected = stored.get(op.id)
            try:
                if expected is None:
                    raise Conflict(f"operation {op.id!r} changed concurrently")
                new = await self.replace(op, expected_revision=expected)
            except (NotFound, Conflict) as exc:
                stored[op.id] = None
                outcomes.append(exc)
            else:
                stored[op.id] = new.revision
                outcomes.append(new)
        return outcomes

    async def delete(self, operation_id: str) -> int:
        current = self._operations.pop(operation_id, None)
        if current is None:
            raise NotFound(f"operation {operation_id!r} not found")
        revision = self._next()
        self._index(current, None)
        self._child_views.pop(operation_id, None)
        siblings = self._children.get(current.parent_id)
        if siblings is not None:
            siblings.pop(operation_id, None)
            if not siblings:
                del self._children[current.parent_id]
        del self._log[current.revision]
        self._log.append(
            revision,
            Change(revision, current, deleted=True)
            if isinstance(current, Operation)
            else _Deleted(revision, current),
        )
        self._tombstones[operation_id] = revision
        while len(self._tombstones) > self._history_size:
            _, dropped = self._tombstones.popitem(last=False)
            del self._log[dropped]
            self._compacted = max(self._compacted, dropped)
        self._notify()
        return revision

    async def list_page(self, where: OperationFilter, *, after: int = 0, limit: int = 100) -> Page:
        # Dict order is creation order: operations are never re-inserted.
        matching = (
            op
            for op in self._operations.values()
            if op.created_revision > after and where.matches(op)
        )
        operations = [self._whole(op) for op in itertools.islice(matching, limit + 1)]
        more = len(operations) > limit
        del operations[limit:]
        next_after = operations[-1].created_revision if more else None
        return Page(operations, next_after, self._revision)

    async def snapshot(self, where: OperationFilter) -> Changes:
        matching = [
            self._change(entry)
            for entry in self._log.values()
            if (
                where.matches(entry)
                if isinstance(entry, FinishedOperation)
                else isinstance(entry, Change)
                and not entry.deleted
                and where.matches(entry.operation)
            )
        ]
        return Changes(matching, self._revision)

    async def tombstone(self, operation_id: str) -> Change | None:
        revision = self._tombstones.get(operation_id)
        return None if revision is None else self._change(self._log[revision])

    async def changes(self, after: int, *, limit: int) -> Changes:
        if after > self._revision or after < self._compacted:
            raise HistoryCompacted(
                f"revision {after} is outside the history held "
                f"({self._compacted}..{self._revision})"
            )
        found = list(itertools.islice(self._log.after(after), limit + 1))
        if len(found) > limit:
            del found[limit:]
            upto = found[-1][0] if found else after
        else:
            upto = self._revision
        return Changes([self._change(entry) for _, entry in found], upto)

    async def wait_for_change(self, after: int) -> int:
        while self._revision <= after:
            self._waited = True
            await self._changed.wait()
        return self._revision

    async def children(self, parent_id: str) -> list[ChildProgress]:
        ids = self._children.get(parent_id, {})
        return [self._child(self._operations[i]) for i in ids if i in self._operations]

    def _child(self, held: HeldOperation) -> ChildProgress:
        # Cached per child until it changes: a roll-up reads every child of a
        # parent (up to 10,000) on each child's change.
        view = self._child_views.get(held.id)
        if view is not None and view.revision == held.revision:
            return view
        if isinstance(held, Operation):
            view = ChildProgress.of(held)
        else:
            view = ChildProgress(
                held.id,
                held.spec,
                held.state,
                held.revision,
                held.total,
                held.percent,
                None,
                False,
                held.measures,
                held.finished_at or 0.0,
            )
        self._child_views[held.id] = view
        return view

    async def scan(self) -> list[HeldOperation]:
        return list(self._operations.values())

    async def lapsed_leases(self, now: float) -> list[str]:
        # The same comparison as lifecycle.mark_stalled, rounding included.
        return [op_id for op_id, (last, timeout) in self._leases.items() if now - last >= timeout]

    async def finished_before(self, cutoff: float, *, limit: int) -> list[str]:
        found: list[str] = []
        due: list[tuple[float, str]] = []
        heap = self._finish_heap
        while heap and heap[0][0] <= cutoff and len(found) < limit:
            entry = heapq.heappop(heap)
            if self._finish_times.get(entry[1]) == entry[0]:
                found.append(entry[1])
                due.append(entry)
            # else: deleted since (or created again under its id): drop it
        for entry in due:
            # Kept until the operation is deleted: if that fails, the next
            # sweep finds it again; once deleted the entry is dropped as stale.
            heapq.heappush(heap, entry)
        return found

    async def counts(self) -> dict[tuple[str, str], int]:
        return {key: n for key, n in self._counts.items() if n > 0}

    async def active_in(self, project: str) -> int:
        return self._active[project]
