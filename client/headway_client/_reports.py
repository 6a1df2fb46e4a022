"""Coalescing of a producer's reports into few UpdateOperationRequests.

Absolute values (completed, stage_completed, message, ...) keep only their
latest value; counter deltas add up. A stage change starts a new request so the
server sees every stage entered, with the progress reported within it.
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


def struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    message = struct_pb2.Struct()
    message.update(value)
    return message


class PendingReports:
    """Reports not yet sent; the caller serialises access (a lock or one event loop)."""

    def __init__(self, operation_id: str, *, first_sequence: int = 1) -> None:
        self.operation_id = operation_id
        self._next_sequence = first_sequence
        self._segments: list[dict[str, Any]] = []

    def __bool__(self) -> bool:
        return bool(self._segments)

    def add(
        self,
        *,
        stage: str | None = None,
        counters: Mapping[str, int] | None = None,
        details: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        unknown = set(fields) - set(_ABSOLUTE)
        if unknown:
            raise TypeError(f"unknown report fields: {', '.join(sorted(unknown))}")
        if not self._segments or (stage is not None and self._segments[-1]):
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

    def take(self) -> list[pb.UpdateOperationRequest]:
        """Everything pending, as requests with increasing sequence numbers."""
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
