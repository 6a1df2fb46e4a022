"""Finished operations and their timelines packed into a few hundred bytes.

A server keeps every finished operation for its retention (an hour by default),
which makes finished operations most of what it holds: as Python objects one
with a typical payload took ~6 KB (bench: retained memory). A finished operation
no longer changes, and is read rarely next to the reports and watch deliveries
of running ones, so the memory store keeps it as bytes and unpacks it on read:
its fields as a tuple of plain values (marshal: ~2 µs to load, exact for floats),
deflated with a preset dictionary that already holds a typical operation, so that
what repeats between operations (field layout, stage names, counters, JSON keys)
costs almost nothing.
"""

from __future__ import annotations

import marshal
import time
import zlib
from dataclasses import fields
from typing import Any

from headway_server.domain.model import (
    Alert,
    AlertType,
    Estimate,
    LogEntry,
    LogLevel,
    Operation,
    OperationError,
    Stage,
    StageState,
    StartSpec,
    State,
    TimelineEntry,
    TimelineType,
)

# Raw deflate (no header) with a 2 KiB window: the preset dictionary and one
# packed operation fit in it, and compressors this small are cheap to create.
_WBITS = -11
_LEVEL = 9
_MEM_LEVEL = 2
# Version 2 writes a repeated value again rather than a back-reference to it,
# which deflate then finds: 20 % smaller packed than the default (version 4).
_MARSHAL_VERSION = 2

# Every Operation field but the two the store keeps beside the bytes (id, spec),
# in the order `_row` writes them. Checked against the dataclass below, so a new
# field cannot be silently dropped from finished operations.
_PACKED_FIELDS = (
    "state",
    "stalled",
    "cancel_requested",
    "cancel_reason",
    "percent",
    "completed",
    "total",
    "stage",
    "stages",
    "message",
    "details",
    "counters",
    "checkpoint",
    "error",
    "result",
    "pause_reason",
    "created_at",
    "started_at",
    "updated_at",
    "finished_at",
    "revision",
    "created_revision",
    "last_sequence",
    "explicit_percent",
    "finished_by",
    "last_report_at",
    "error_count",
    "warning_count",
    "alerts",
    "children",
    "children_percent",
    "depth",
    "estimate",
    "eta_state",
    "peak_throughput",
    "eta_baseline",
    "measures",
    "children_measures",
)
_missing = {f.name for f in fields(Operation)} - {"id", "spec"} - set(_PACKED_FIELDS)
assert not _missing, f"packing.py does not pack Operation fields {_missing}"


class Unpackable(ValueError):
    """The operation holds a value marshal cannot write; the store keeps it as is."""


def _row(op: Operation) -> tuple[Any, ...]:
    error = op.error
    est = op.estimate
    if op.eta_state is not None:
        # Only finished operations are packed, and they have dropped it.
        raise Unpackable("the ETA estimator's state is not packed")
    return (
        int(op.state),
        op.stalled,
        op.cancel_requested,
        op.cancel_reason,
        op.percent,
        op.completed,
        op.total,
        op.stage,
        tuple(
            (s.name, s.weight, int(s.state), s.completed, s.total, s.started_at, s.finished_at)
            for s in op.stages
        ),
        op.message,
        op.details,
        dict(op.counters),
        op.checkpoint,
        None
        if error is None
        else (
            error.code,
            error.message,
            error.stage,
            error.item,
            error.recoverable,
            error.details,
        ),
        op.result,
        op.pause_reason,
        op.created_at,
        op.started_at,
        op.updated_at,
        op.finished_at,
        op.revision,
        op.created_revision,
        op.last_sequence,
        op.explicit_percent,
        op.finished_by,
        op.last_report_at,
        op.error_count,
        op.warning_count,
        tuple((int(a.type), a.message, a.since, a.measure, a.value) for a in op.alerts),
        dict(op.children),
        op.children_percent,
        op.depth,
        (est.throughput, est.per_percent, est.eta, est.confidence, est.at),
        None,
        op.peak_throughput,
        op.eta_baseline,
        dict(op.measures),
        dict(op.children_measures),
    )


def _operation(op_id: str, spec: StartSpec, row: tuple[Any, ...]) -> Operation:
    values = dict(zip(_PACKED_FIELDS, row, strict=True))
    values["state"] = State(values["state"])
    values["stages"] = tuple(
        Stage(name, weight, StageState(state), completed, total, started, finished)
        for name, weight, state, completed, total, started, finished in values["stages"]
    )
    if values["error"] is not None:
        values["error"] = OperationError(*values["error"])
    values["alerts"] = tuple(
        Alert(AlertType(kind), message, since, measure, value)
        for kind, message, since, measure, value in values["alerts"]
    )
    values["estimate"] = Estimate(*values["estimate"])
    return Operation(id=op_id, spec=spec, **values)


def _dictionary() -> bytes:
    """What deflate may refer back to: the packed form of a typical finished operation.

    Its times are this process's start: the memory store's bytes live no longer
    than the process, and times of the same days share their leading bytes.
    """
    now = time.time()
    stages = tuple(
        Stage(name, 1.0, StageState.DONE, 1000, 1000, now + i, now + i + 1)
        for i, name in enumerate(("clone", "fetch", "index", "embed", "upload"))
    )
    typical = Operation(
        id="",
        spec=StartSpec(),
        state=State.SUCCEEDED,
        percent=100.0,
        completed=1000,
        total=1000,
        stage="index",
        stages=stages,
        message="done",
        details={"repository": "", "branch": "main", "files": 0.0},
        counters={"files": 1000, "errors": 0, "bytes": 0},
        checkpoint="",
        result={"files": 1000.0, "items": 0.0},
        created_at=now,
        started_at=now + 0.1,
        updated_at=now + 10,
        finished_at=now + 10,
        revision=100_000,
        created_revision=100_000,
        last_sequence=10,
        finished_by=("CompleteOperation", ""),
        last_report_at=now + 9,
        estimate=Estimate(100.0, False, 0.0, 1.0, now + 10),
        peak_throughput=100.0,
    )
    return marshal.dumps(_row(typical), _MARSHAL_VERSION)


_DICTIONARY = _dictionary()


def _deflate(raw: bytes) -> bytes:
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zdict=_DICTIONARY)
    return compressor.compress(raw) + compressor.flush()


def _pack(value: tuple[Any, ...]) -> bytes:
    try:
        raw = marshal.dumps(value, _MARSHAL_VERSION)
    except ValueError as exc:
        raise Unpackable(str(exc)) from exc
    return _deflate(raw)


def _inflate(data: bytes) -> bytes:
    return zlib.decompressobj(_WBITS, zdict=_DICTIONARY).decompress(data)


def pack_operation(op: Operation) -> bytes:
    """Everything of `op` but its id and spec, as bytes.

    Raises:
        Unpackable: a JSON field holds a value marshal cannot write (the
            service only stores plain JSON, so this is a defect elsewhere).
    """
    return _pack(_row(op))


def unpack_operation(op_id: str, spec: StartSpec, data: bytes) -> Operation:
    """The operation `pack_operation` packed, equal to it field for field."""
    return _operation(op_id, spec, marshal.loads(_inflate(data)))


def pack_timeline(entries: list[TimelineEntry], dropped: int, appended: int) -> bytes:
    """A timeline and its counts (entries dropped, entries appended) as bytes."""
    rows = tuple((int(e.type), e.time, e.revision, e.stage, e.message) for e in entries)
    return _pack((dropped, appended, rows))


def unpack_timeline(data: bytes) -> tuple[list[TimelineEntry], int, int]:
    dropped, appended, rows = marshal.loads(_inflate(data))
    entries = [
        TimelineEntry(TimelineType(kind), at, revision, stage, message)
        for kind, at, revision, stage, message in rows
    ]
    return entries, dropped, appended


def pack_logs(entries: list[LogEntry], dropped: int, appended: int) -> bytes:
    """Log entries and their counts as bytes.

    Raises:
        Unpackable: an entry's details hold a value marshal cannot write.
    """
    rows = tuple(
        (
            int(e.level),
            e.message,
            e.stage,
            e.item,
            e.code,
            e.recoverable,
            e.details,
            e.time,
            e.index,
        )
        for e in entries
    )
    return _pack((dropped, appended, rows))


def unpack_logs(data: bytes) -> tuple[list[LogEntry], int, int]:
    dropped, appended, rows = marshal.loads(_inflate(data))
    entries = [
        LogEntry(LogLevel(level), message, stage, item, code, recoverable, details, at, index)
        for level, message, stage, item, code, recoverable, details, at, index in rows
    ]
    return entries, dropped, appended
