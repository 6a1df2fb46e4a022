"""In-memory store: the default, and the reference for the store contract."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict

from sortedcontainers import SortedDict

from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    HistoryCompacted,
    NotFound,
    ResourceExhausted,
)
from headway_server.domain.model import Change, Operation, OperationFilter, evolve
from headway_server.store.base import Changes, Page


class MemoryStore:
    """Holds operations in a dict and their latest changes ordered by revision.

    All methods run on one event loop and never await between reading and
    writing, so each call is atomic without a lock.
    """

    def __init__(self, *, max_operations: int = 100_000, history_size: int = 10_000) -> None:
        self._max_operations = max_operations
        self._history_size = history_size
        self._revision = 0
        self._operations: dict[str, Operation] = {}
        # revision -> Change; each live operation appears once, at its latest
        # revision, so "changes after N" is a range read that skips superseded
        # states by construction.
        self._log: SortedDict = SortedDict()
        # Tombstones in deletion order (id -> revision), oldest dropped first.
        self._tombstones: OrderedDict[str, int] = OrderedDict()
        # Highest revision whose tombstone was dropped: resuming below it would miss a delete.
        self._compacted = 0
        self._changed = asyncio.Event()
        # parent id -> child ids (dict as an ordered set), for roll-ups.
        self._children: dict[str, dict[str, None]] = {}

    @property
    def revision(self) -> int:
        return self._revision

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    def _notify(self) -> None:
        # Wake every waiter once; new waiters wait on a fresh event.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _record(self, operation: Operation, previous_revision: int | None) -> None:
        if previous_revision is not None:
            del self._log[previous_revision]
        self._log[operation.revision] = Change(operation.revision, operation)
        self._notify()

    async def get(self, operation_id: str) -> Operation | None:
        return self._operations.get(operation_id)

    async def create(self, operation: Operation) -> Operation:
        if operation.id in self._operations:
            raise AlreadyExists(f"operation {operation.id!r} already exists")
        if len(self._operations) >= self._max_operations:
            raise ResourceExhausted(
                f"the store holds its maximum of {self._max_operations} operations"
            )
        revision = self._next()
        stored = evolve(operation, revision=revision, created_revision=revision)
        self._operations[stored.id] = stored
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
        self._operations[stored.id] = stored
        self._record(stored, current.revision)
        return stored

    async def delete(self, operation_id: str) -> int:
        current = self._operations.pop(operation_id, None)
        if current is None:
            raise NotFound(f"operation {operation_id!r} not found")
        revision = self._next()
        siblings = self._children.get(current.parent_id)
        if siblings is not None:
            siblings.pop(operation_id, None)
            if not siblings:
                del self._children[current.parent_id]
        del self._log[current.revision]
        self._log[revision] = Change(revision, current, deleted=True)
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
        operations = list(itertools.islice(matching, limit + 1))
        more = len(operations) > limit
        del operations[limit:]
        next_after = operations[-1].created_revision if more else None
        return Page(operations, next_after, self._revision)

    async def snapshot(self, where: OperationFilter) -> Changes:
        matching = [c for c in self._log.values() if not c.deleted and where.matches(c.operation)]
        return Changes(matching, self._revision)

    async def tombstone(self, operation_id: str) -> Change | None:
        revision = self._tombstones.get(operation_id)
        return None if revision is None else self._log[revision]

    async def changes(self, after: int, *, limit: int) -> Changes:
        if after > self._revision or after < self._compacted:
            raise HistoryCompacted(
                f"revision {after} is outside the history held "
                f"({self._compacted}..{self._revision})"
            )
        keys = list(itertools.islice(self._log.irange(minimum=after + 1), limit + 1))
        if len(keys) > limit:
            del keys[limit:]
            upto = keys[-1] if keys else after
        else:
            upto = self._revision
        return Changes([self._log[k] for k in keys], upto)

    async def wait_for_change(self, after: int) -> int:
        while self._revision <= after:
            await self._changed.wait()
        return self._revision

    async def children(self, parent_id: str) -> list[Operation]:
        ids = self._children.get(parent_id, {})
        return [self._operations[i] for i in ids if i in self._operations]

    async def scan(self) -> list[Operation]:
        return list(self._operations.values())
