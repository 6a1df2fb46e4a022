"""The store interface: revisioned operations with a change history.

Every write gets the next value of one store-wide revision counter. Watchers
ask for "what changed after revision N" rather than subscribing to an event
queue, so a slow watcher costs the store nothing and a Redis-backed store can
share one ordering between server processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from headway_server.domain.errors import HeadwayError
from headway_server.domain.model import (
    Change,
    ChildProgress,
    HeldOperation,
    Operation,
    OperationFilter,
)
from headway_server.domain.stats import StatsAggregate
from headway_server.store.journal import Journal


def redacted(url: str) -> str:
    """A store's URL for messages and logs: its password (and query) left out."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class Page:
    operations: list[Operation]
    # Creation revision of the last operation returned, when there may be more.
    next_after: int | None
    revision: int


@dataclass(frozen=True, slots=True)
class Changes:
    # Latest state of each operation changed after the asked revision (or its
    # tombstone), in revision order.
    changes: list[Change]
    # Everything up to this revision has been returned (the store revision when
    # there were no more than `limit` changes).
    revision: int


class OperationStore(Protocol):
    """Async store of operations. Implementations: MemoryStore (Redis later)."""

    # Each operation's bounded log and timeline, kept with the store's data.
    journal: Journal
    # Summaries of finished operations (statistics, typical throughput, the
    # ETA's stage history), kept with the store's data.
    stats: StatsAggregate

    async def revision(self) -> int:
        """The store's current revision (0 when empty and new)."""
        ...

    async def secret(self) -> bytes:
        """A random key created with the store's data and kept with it, so that
        ids derived from request ids are the same on every server process
        sharing the store and after a restart."""
        ...

    async def epoch(self) -> str:
        """A random id created with the store's keyspace (at most 64 characters).

        Revisions only mean something within one epoch: a store whose data was
        lost (a memory store's process restarted, a Redis flushed) counts from
        0 again under a new epoch, so a resume position from another epoch
        means nothing here, whatever its revision."""
        ...

    async def get(self, operation_id: str) -> Operation | None:
        """Returns the operation, or None when there is none with that id."""
        ...

    async def get_cached(self, operation_id: str) -> Operation | None:
        """Like get, but may answer from this process's copy, which another
        process may have changed since: only for a read before a compare-and-set
        write (`replace` catches a stale copy as Conflict)."""
        ...

    async def check(self) -> None:
        """Returns when the store can serve calls now; raises StoreUnavailable
        otherwise (the health check reads it)."""
        ...

    async def close(self) -> None:
        """Releases connections and background tasks; the store is not used after."""
        ...

    async def create(self, operation: Operation) -> Operation:
        """Stores a new operation at the next revision and returns it as stored.

        Raises:
            AlreadyExists: an operation with that id exists (the stored one is
                not changed).
            ResourceExhausted: the store holds its maximum number of operations.
        """
        ...

    async def replace(self, operation: Operation, *, expected_revision: int) -> Operation:
        """Stores a new state of an existing operation at the next revision.

        Raises:
            NotFound: the operation no longer exists.
            Conflict: its revision is no longer `expected_revision`.
        """
        ...

    async def replace_many(
        self, writes: Sequence[tuple[Operation, int | None]]
    ) -> list[Operation | HeadwayError]:
        """Stores several new states, in order and each on its own, as `replace`
        would one by one (a shared store does it in one round trip): the stored
        operation for each, or the error `replace` would have raised (NotFound,
        Conflict). An expected revision of None means "whatever the previous
        write of this operation in this call stored" (Conflict if that failed).
        """
        ...

    async def delete(self, operation_id: str) -> int:
        """Removes the operation, keeps a tombstone, and returns the delete's revision.

        Raises:
            NotFound: there is no such operation.
        """
        ...

    async def list_page(self, where: OperationFilter, *, after: int = 0, limit: int = 100) -> Page:
        """Operations matching `where` in creation order, created after revision `after`."""
        ...

    async def snapshot(self, where: OperationFilter) -> Changes:
        """Every operation matching `where`, in revision order, read at one revision."""
        ...

    async def tombstone(self, operation_id: str) -> Change | None:
        """The deletion of `operation_id` if the store still holds its tombstone."""
        ...

    async def changes(self, after: int, *, limit: int) -> Changes:
        """Up to `limit` changes after revision `after`, oldest first.

        Raises:
            HistoryCompacted: tombstones needed to answer were dropped, or `after`
                is ahead of the store (it was reset); the caller must re-list.
        """
        ...

    async def wait_for_change(self, after: int) -> int:
        """Waits until the revision is above `after` and returns it (callers bound the wait)."""
        ...

    async def children(self, parent_id: str) -> list[ChildProgress]:
        """What roll-ups read of the operations started with this parent_id,
        in creation order."""
        ...

    async def scan(self) -> list[HeldOperation]:
        """Every stored operation (for statistics queries, not for sweeps); a
        finished one may come as its FinishedOperation head."""
        ...

    async def lapsed_leases(self, now: float) -> list[str]:
        """Ids of RUNNING, not yet stalled operations with a heartbeat timeout
        whose last applied report is at least that long before `now`, read from
        an index of lease deadlines (not a scan of every operation)."""
        ...

    async def finished_before(self, cutoff: float, *, limit: int) -> list[str]:
        """Ids of up to `limit` terminal operations that finished at or before
        `cutoff`, oldest first, from an index of finish times (retention)."""
        ...

    async def counts(self) -> dict[tuple[str, str], int]:
        """How many operations the store holds, by (state name, kind), kept
        up to date on every write rather than counted by a scan."""
        ...

    async def active_in(self, project: str) -> int:
        """How many active (QUEUED, RUNNING, PAUSED) operations `project` has,
        kept up to date on every write rather than counted by a scan."""
        ...
