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
import operator
import time
import zlib
from dataclasses import fields
from typing import Any

from headway_server.domain.eta import EtaState
from headway_server.domain.model import (
    Aggregation,
    Alert,
    AlertRule,
    AlertType,
    Estimate,
    LogEntry,
    LogLevel,
    MeasureSpec,
    Operation,
    OperationError,
    Stage,
    StageSpec,
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
_ETA_FIELDS = tuple(f.name for f in fields(EtaState))
# The ETA's state as a tuple of its fields, in that order (one C call).
_eta_values = operator.attrgetter(*_ETA_FIELDS)
_missing = {f.name for f in fields(Operation)} - {"id", "spec"} - set(_PACKED_FIELDS)
assert not _missing, f"packing.py does not pack Operation fields {_missing}"


class Unpackable(ValueError):
    """The operation holds a value marshal cannot write; the store keeps it as is."""


def _row(op: Operation, *, whole: bool = False) -> tuple[Any, ...]:
    error = op.error
    est = op.estimate
    eta_state: tuple[Any, ...] | None = None
    if op.eta_state is not None:
        if not whole:
            # Only finished operations are packed here, and they have dropped it.
            raise Unpackable("the ETA estimator's state is not packed")
        eta_state = _eta_values(op.eta_state)
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
        eta_state,
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
    if values["eta_state"] is not None:
        values["eta_state"] = EtaState(*values["eta_state"])
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


# --- records: whole operations for a store that outlives the process ---------------------

# The first byte of every record: its layout and encoding. A later layout gets
# new numbers, and readers refuse numbers they do not know rather than misread them.
_DEFLATED_RECORD = b"\x01"
_PLAIN_RECORD = b"\x02"
# A dictionary fixed for all time (unlike _DICTIONARY, made from this process's
# start): records are read back by other processes and after restarts.
_RECORD_DICTIONARY_TIME = 1_800_000_000.0


def _record_dictionary() -> bytes:
    t = _RECORD_DICTIONARY_TIME
    typical = Operation(
        id="op-0123456789abcdef0123456789abcdef",
        spec=StartSpec(kind="ingest", project="default", unit="files", total=1000),
        state=State.RUNNING,
        percent=50.0,
        completed=500,
        total=1000,
        stage="index",
        message="indexing",
        counters={"files": 500, "errors": 0, "bytes": 0},
        created_at=t,
        started_at=t + 0.1,
        updated_at=t + 10,
        revision=100_000,
        created_revision=100_000,
        last_sequence=10,
        last_report_at=t + 9,
        estimate=Estimate(100.0, False, 5.0, 1.0, t + 10),
        eta_state=EtaState(last_at=t + 9, observations=10, active=9.0, fraction=0.5, units=500),
        peak_throughput=100.0,
    )
    return marshal.dumps(_record_row(typical), _MARSHAL_VERSION)


def _spec_row(spec: StartSpec) -> tuple[Any, ...]:
    return (
        spec.kind,
        spec.project,
        spec.dataset,
        dict(spec.labels),
        spec.total,
        spec.unit,
        tuple((s.name, s.weight) for s in spec.stages),
        spec.heartbeat_timeout,
        spec.parent_id,
        tuple((m.name, int(m.aggregation)) for m in spec.measures),
        tuple((r.measure, r.below, r.above) for r in spec.alert_rules),
    )


def _spec(row: tuple[Any, ...]) -> StartSpec:
    kind, project, dataset, labels, total, unit, stages, timeout, parent, measures, rules = row
    return StartSpec(
        kind=kind,
        project=project,
        dataset=dataset,
        labels=labels,
        total=total,
        unit=unit,
        stages=tuple(StageSpec(name, weight) for name, weight in stages),
        heartbeat_timeout=timeout,
        parent_id=parent,
        measures=tuple(MeasureSpec(name, Aggregation(agg)) for name, agg in measures),
        alert_rules=tuple(AlertRule(measure, below, above) for measure, below, above in rules),
    )


# Spec rows by the spec's id(), with the spec (so the id is not reused while
# held): a running operation's record is packed on every report, and its spec
# never changes (the service shares one StartSpec between equal ones).
_SPEC_ROWS: dict[int, tuple[StartSpec, tuple[Any, ...]]] = {}
_SPEC_ROWS_HELD = 4096


def _record_row(op: Operation) -> tuple[Any, ...]:
    spec = op.spec
    held = _SPEC_ROWS.get(id(spec))
    if held is not None and held[0] is spec:
        spec_row = held[1]
    else:
        spec_row = _spec_row(spec)
        if len(_SPEC_ROWS) >= _SPEC_ROWS_HELD:
            _SPEC_ROWS.clear()
        _SPEC_ROWS[id(spec)] = (spec, spec_row)
    return (op.id, spec_row, _row(op, whole=True))


_RECORD_DICTIONARY = _record_dictionary()


def pack_record(op: Operation) -> bytes:
    """The whole operation (id, spec and the ETA's state included) as bytes that
    any process of any later version reads back with unpack_record.

    Raises:
        Unpackable: a JSON field holds a value marshal cannot write.
    """
    try:
        raw = marshal.dumps(_record_row(op), _MARSHAL_VERSION)
    except ValueError as exc:
        raise Unpackable(str(exc)) from exc
    if not op.state.terminal:
        # Written on every report, and soon replaced: not worth deflating
        # (10-25 µs a report; bench: Redis store, CPU per report). A finished
        # operation is written once and held for the retention.
        return _PLAIN_RECORD + raw
    compressor = zlib.compressobj(
        _LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zdict=_RECORD_DICTIONARY
    )
    return _DEFLATED_RECORD + compressor.compress(raw) + compressor.flush()


def unpack_record(data: bytes) -> Operation:
    """The operation pack_record packed, equal to it field for field.

    Raises:
        ValueError: the bytes are not a record this version can read.
    """
    head = data[:1]
    if head not in (_DEFLATED_RECORD, _PLAIN_RECORD):
        raise ValueError("not an operation record this version can read")
    try:
        raw = (
            zlib.decompressobj(_WBITS, zdict=_RECORD_DICTIONARY).decompress(data[1:])
            if head == _DEFLATED_RECORD
            else data[1:]
        )
        op_id, spec, row = marshal.loads(raw)
    except (zlib.error, EOFError, TypeError) as exc:
        raise ValueError(f"corrupt operation record: {exc}") from exc
    return _operation(op_id, _spec(spec), row)


def pack_entry(entry: LogEntry | TimelineEntry) -> bytes:
    """One log or timeline entry (a log entry without its index, which the
    store gives by position) as marshal bytes."""
    if isinstance(entry, LogEntry):
        row: tuple[Any, ...] = (
            int(entry.level),
            entry.message,
            entry.stage,
            entry.item,
            entry.code,
            entry.recoverable,
            entry.details,
            entry.time,
        )
    else:
        row = (int(entry.type), entry.time, entry.revision, entry.stage, entry.message)
    try:
        return marshal.dumps(row, _MARSHAL_VERSION)
    except ValueError as exc:
        raise Unpackable(str(exc)) from exc


def unpack_log_entry(data: bytes, index: int) -> LogEntry:
    level, message, stage, item, code, recoverable, details, at = marshal.loads(data)
    return LogEntry(LogLevel(level), message, stage, item, code, recoverable, details, at, index)


def unpack_timeline_entry(data: bytes) -> TimelineEntry:
    kind, at, revision, stage, message = marshal.loads(data)
    return TimelineEntry(TimelineType(kind), at, revision, stage, message)
