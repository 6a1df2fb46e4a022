"""Per-operation logs and timelines: bounded buffers beside the operation store.

They are kept apart from the Operation value because they are appended to, not
replaced, and would make every revision of an operation as large as its log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from headway_server.domain.model import LogEntry, TimelineEntry
from headway_server.store.packing import pack_timeline, unpack_timeline

MAX_LOG_ENTRIES = 1000
MAX_TIMELINE_ENTRIES = 500


@dataclass(slots=True)
class _Buffer:
    # A list, not a deque: an empty deque already takes a 512-byte block, and
    # most operations have a handful of timeline entries (bench: retained memory).
    entries: list[object] = field(default_factory=list)
    dropped: int = 0
    appended: int = 0


class Journal(Protocol):
    """Bounded per-operation logs and timelines."""

    async def append_logs(self, operation_id: str, entries: Iterable[LogEntry]) -> int:
        """Stores entries (numbering them) and returns how many were dropped so far."""
        ...

    async def logs(self, operation_id: str) -> tuple[list[LogEntry], int]:
        """The entries held, oldest first, and how many older ones were dropped."""
        ...

    async def append_timeline(
        self, operation_id: str, entries: Iterable[TimelineEntry]
    ) -> None: ...

    async def timeline(self, operation_id: str) -> tuple[list[TimelineEntry], int]: ...

    async def seal(self, operation_id: str) -> None:
        """The operation ended: its timeline will rarely grow again, so it may be
        held compactly (appending stays allowed)."""
        ...

    async def forget(self, operation_id: str) -> None:
        """Drops everything about a deleted operation."""
        ...


class MemoryJournal:
    def __init__(
        self, *, max_logs: int = MAX_LOG_ENTRIES, max_timeline: int = MAX_TIMELINE_ENTRIES
    ) -> None:
        self._max_logs = max_logs
        self._max_timeline = max_timeline
        self._logs: dict[str, _Buffer] = {}
        # A sealed timeline is held as bytes (store.packing) until appended to.
        self._timelines: dict[str, _Buffer | bytes] = {}

    @staticmethod
    def _append(buffer: _Buffer, entries: Iterable[object], limit: int) -> None:
        before = len(buffer.entries)
        buffer.entries.extend(entries)
        buffer.appended += len(buffer.entries) - before
        excess = len(buffer.entries) - limit
        if excess > 0:
            del buffer.entries[:excess]
            buffer.dropped += excess

    async def append_logs(self, operation_id: str, entries: Iterable[LogEntry]) -> int:
        buffer = self._logs.setdefault(operation_id, _Buffer())
        numbered = [
            dataclasses.replace(e, index=buffer.appended + i + 1) for i, e in enumerate(entries)
        ]
        self._append(buffer, numbered, self._max_logs)
        return buffer.dropped

    async def logs(self, operation_id: str) -> tuple[list[LogEntry], int]:
        buffer = self._logs.get(operation_id, _Buffer())
        return list(buffer.entries), buffer.dropped  # type: ignore[arg-type]

    def _timeline(self, operation_id: str) -> _Buffer:
        held = self._timelines.get(operation_id)
        if held is None:
            held = self._timelines[operation_id] = _Buffer()
        elif isinstance(held, bytes):
            entries, dropped, appended = unpack_timeline(held)
            held = self._timelines[operation_id] = _Buffer(list(entries), dropped, appended)
        return held

    async def append_timeline(self, operation_id: str, entries: Iterable[TimelineEntry]) -> None:
        self._append(self._timeline(operation_id), entries, self._max_timeline)

    async def timeline(self, operation_id: str) -> tuple[list[TimelineEntry], int]:
        held = self._timelines.get(operation_id) or _Buffer()
        if isinstance(held, bytes):
            entries, dropped, _ = unpack_timeline(held)
            return entries, dropped
        return list(held.entries), held.dropped  # type: ignore[arg-type]

    async def seal(self, operation_id: str) -> None:
        # Retained finished operations are most of what a server holds, and a
        # timeline as objects was ~0.6 KB of each (bench: retained memory).
        held = self._timelines.get(operation_id)
        if isinstance(held, _Buffer):
            entries: list[TimelineEntry] = held.entries  # type: ignore[assignment]
            self._timelines[operation_id] = pack_timeline(entries, held.dropped, held.appended)

    async def forget(self, operation_id: str) -> None:
        self._logs.pop(operation_id, None)
        self._timelines.pop(operation_id, None)
