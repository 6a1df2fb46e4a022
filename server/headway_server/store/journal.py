"""Per-operation logs and timelines: bounded buffers beside the operation store.

They are kept apart from the Operation value because they are appended to, not
replaced, and would make every revision of an operation as large as its log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from headway_server.domain.model import LogEntry, TimelineEntry
from headway_server.store.packing import (
    Unpackable,
    pack_logs,
    pack_timeline,
    unpack_logs,
    unpack_timeline,
)

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
        """The operation ended: its log and timeline will rarely grow again, so
        they may be held compactly (appending stays allowed)."""
        ...

    async def forget(self, operation_id: str) -> None:
        """Drops everything about a deleted operation."""
        ...


Pack = Callable[[list[Any], int, int], bytes]
Unpack = Callable[[bytes], tuple[list[Any], int, int]]


class _Buffers:
    """One kind of entry (logs or timelines) for every operation; an ended
    operation's held as bytes (store.packing) until something is appended."""

    def __init__(self, limit: int, pack: Pack, unpack: Unpack) -> None:
        self._limit = limit
        self._pack = pack
        self._unpack = unpack
        self._held: dict[str, _Buffer | bytes] = {}

    def open(self, operation_id: str) -> _Buffer:
        """The operation's buffer, to append to (created, or unpacked if sealed)."""
        held = self._held.get(operation_id)
        if held is None:
            held = self._held[operation_id] = _Buffer()
        elif isinstance(held, bytes):
            entries, dropped, appended = self._unpack(held)
            held = self._held[operation_id] = _Buffer(entries, dropped, appended)
        return held

    def append(self, buffer: _Buffer, entries: Iterable[object]) -> None:
        before = len(buffer.entries)
        buffer.entries.extend(entries)
        buffer.appended += len(buffer.entries) - before
        excess = len(buffer.entries) - self._limit
        if excess > 0:
            del buffer.entries[:excess]
            buffer.dropped += excess

    def read(self, operation_id: str) -> tuple[list[Any], int]:
        held = self._held.get(operation_id) or _Buffer()
        if isinstance(held, bytes):
            entries, dropped, _ = self._unpack(held)
            return entries, dropped
        return list(held.entries), held.dropped

    def seal(self, operation_id: str) -> None:
        held = self._held.get(operation_id)
        if isinstance(held, _Buffer):
            try:
                self._held[operation_id] = self._pack(held.entries, held.dropped, held.appended)
            except Unpackable:
                pass  # kept as objects: correct, only larger

    def forget(self, operation_id: str) -> None:
        self._held.pop(operation_id, None)


class MemoryJournal:
    def __init__(
        self, *, max_logs: int = MAX_LOG_ENTRIES, max_timeline: int = MAX_TIMELINE_ENTRIES
    ) -> None:
        self._logs = _Buffers(max_logs, pack_logs, unpack_logs)
        self._timelines = _Buffers(max_timeline, pack_timeline, unpack_timeline)

    async def append_logs(self, operation_id: str, entries: Iterable[LogEntry]) -> int:
        buffer = self._logs.open(operation_id)
        numbered = [
            dataclasses.replace(e, index=buffer.appended + i + 1) for i, e in enumerate(entries)
        ]
        self._logs.append(buffer, numbered)
        return buffer.dropped

    async def logs(self, operation_id: str) -> tuple[list[LogEntry], int]:
        return self._logs.read(operation_id)

    async def append_timeline(self, operation_id: str, entries: Iterable[TimelineEntry]) -> None:
        self._timelines.append(self._timelines.open(operation_id), entries)

    async def timeline(self, operation_id: str) -> tuple[list[TimelineEntry], int]:
        return self._timelines.read(operation_id)

    async def seal(self, operation_id: str) -> None:
        # Retained finished operations are most of what a server holds; as
        # objects a timeline was ~0.6 KB of each (bench: retained memory), and
        # a log entry ~0.3 KB, up to MAX_LOG_ENTRIES of them.
        self._logs.seal(operation_id)
        self._timelines.seal(operation_id)

    async def forget(self, operation_id: str) -> None:
        self._logs.forget(operation_id)
        self._timelines.forget(operation_id)
