"""Coalescing of a producer's reports into few UpdateOperationRequests.

Absolute values (completed, stage_completed, message, measures, ...) keep only
their latest value; counter deltas add up. A stage change starts a new request so the
server sees every stage entered, with the progress reported within it (up to
MAX_SEGMENTS stages a round: beyond that the oldest merge, so a producer that is
offline for long holds a bounded amount, never a queue of every report).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2
from headway.v1 import progress_pb2 as pb

_ABSOLUTE = (
    "stage_completed",
    "stage_total",
    "completed",
    "total",
    "percent",
    "message",
    "checkpoint",
    "paused",
    "pause_reason",
)
# Values that belong to the stage they were reported in.
_OF_STAGE = ("stage_completed", "stage_total")
# Segments (stages entered) held before the oldest two merge.
MAX_SEGMENTS = 64


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    message = struct_pb2.Struct()
    message.update(value)
    return message


class PendingReports:
    """Reports not yet sent; the caller serialises access (a lock or one event loop).

    Requests sent but not acknowledged (the call failed: the server may or may
    not have applied them) are held as they were, sequence and all, and sent
    again before anything newer, so the server applies each once.
    """

    def __init__(self, operation_id: str, *, first_sequence: int = 1) -> None:
        self.operation_id = operation_id
        self._next_sequence = first_sequence
        self._segments: list[dict[str, Any]] = []
        self._unacked: list[pb.UpdateOperationRequest] = []

    def __bool__(self) -> bool:
        return bool(self._segments or self._unacked)

    def requeue(self, requests: list[pb.UpdateOperationRequest]) -> None:
        """Holds requests whose call failed, to be sent again unchanged first."""
        self._unacked[:0] = requests

    def reset(self, reports: list[dict[str, Any]]) -> None:
        """Drops everything held and holds `reports` instead (a full state)."""
        self._segments, self._unacked = [], []
        for fields in reports:
            self.add(**fields)

    def skip_to(self, sequence: int) -> None:
        """Numbers the next request at least `sequence` (the server has seen those below)."""
        self._next_sequence = max(self._next_sequence, sequence)

    def add(
        self,
        *,
        stage: str | None = None,
        counters: Mapping[str, int] | None = None,
        details: Mapping[str, Any] | None = None,
        measures: Mapping[str, float] | None = None,
        **fields: Any,
    ) -> None:
        unknown = set(fields) - set(_ABSOLUTE)
        if unknown:
            raise TypeError(f"unknown report fields: {', '.join(sorted(unknown))}")
        if not self._segments or (stage is not None and self._segments[-1]):
            if len(self._segments) >= MAX_SEGMENTS:
                self._segments[:2] = [_merged(*self._segments[:2])]
            self._segments.append({})
        segment = self._segments[-1]
        if stage is not None:
            segment["stage"] = stage
        for name, value in fields.items():
            if value is not None:
                segment[name] = value
        if details is not None:
            segment["details"] = dict(details)
        if counters:
            merged = segment.setdefault("counters", {})
            for key, delta in counters.items():
                merged[key] = merged.get(key, 0) + delta
        if measures:
            # Absolute values: the latest of each wins.
            segment.setdefault("measures", {}).update(measures)

    def take(self) -> list[pb.UpdateOperationRequest]:
        """The requests to send: those held unacknowledged if any (alone, so what
        is held stays bounded while calls fail), else everything pending, as
        requests with increasing sequence numbers."""
        if self._unacked:
            unacked, self._unacked = self._unacked, []
            return unacked
        requests = []
        for segment in self._segments:
            details = struct(segment.pop("details", None))
            request = pb.UpdateOperationRequest(
                operation_id=self.operation_id, sequence=self._next_sequence, **segment
            )
            if details is not None:
                request.details.CopyFrom(details)
            self._next_sequence += 1
            requests.append(request)
        self._segments = []
        return requests


def _merged(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """One segment for two: the newer values win, counter deltas add up."""
    merged = dict(older)
    if "stage" in newer and newer["stage"] != older.get("stage"):
        for name in _OF_STAGE:
            merged.pop(name, None)
    counters = dict(older.get("counters", {}))
    for key, delta in newer.get("counters", {}).items():
        counters[key] = counters.get(key, 0) + delta
    measures = {**older.get("measures", {}), **newer.get("measures", {})}
    merged.update(newer)
    if counters:
        merged["counters"] = counters
    if measures:
        merged["measures"] = measures
    return merged
