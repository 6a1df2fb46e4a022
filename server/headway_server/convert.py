"""Translation between generated protobuf messages and domain values.

Protobuf stops here: the domain and the store never see generated classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format, struct_pb2
from headway.v1 import progress_pb2 as pb

from headway_server.app.watch import WatchEvent
from headway_server.domain.errors import InvalidArgument
from headway_server.domain.model import (
    Aggregation,
    Alert,
    AlertRule,
    JsonObject,
    LogEntry,
    LogLevel,
    MeasureSpec,
    Operation,
    OperationError,
    OperationFilter,
    Stage,
    StageSpec,
    StartSpec,
    State,
    TimelineEntry,
    Update,
)
from headway_server.domain.stats import KindStats, MeasureStats, Percentiles, Stats

# Serialized operation states kept for watch fan-out (about 600 B each): the
# states being fanned out right now, not every operation the server holds.
_CACHE_LIMIT = 4096


def struct_to_dict(message: struct_pb2.Struct, field: str) -> JsonObject:
    try:
        return json_format.MessageToDict(message)
    except ValueError as exc:  # NaN and infinities have no JSON form
        raise InvalidArgument(field, "must not contain NaN or infinite numbers") from exc


def _fill_struct(target: struct_pb2.Struct, value: JsonObject | None) -> None:
    if value is not None:
        target.update(value)


def _stamp(target: Any, seconds: float | None) -> None:
    if seconds is not None:
        target.FromNanoseconds(int(seconds * 1e9))


def start_spec(request: pb.StartOperationRequest) -> StartSpec:
    return StartSpec(
        kind=request.kind,
        project=request.project,
        dataset=request.dataset,
        labels=dict(request.labels),
        total=request.total,
        unit=request.unit,
        stages=tuple(StageSpec(s.name, s.weight) for s in request.stages),
        heartbeat_timeout=request.heartbeat_timeout.ToNanoseconds() / 1e9,
        parent_id=request.parent_id,
        measures=tuple(_measure_spec(m, f"measures[{i}]") for i, m in enumerate(request.measures)),
        alert_rules=tuple(
            AlertRule(
                measure=r.measure,
                below=r.below if r.HasField("below") else None,
                above=r.above if r.HasField("above") else None,
            )
            for r in request.alert_rules
        ),
    )


def _measure_spec(message: pb.MeasureSpec, field: str) -> MeasureSpec:
    try:
        rule = Aggregation(message.aggregation or Aggregation.LAST)
    except ValueError:
        raise InvalidArgument(
            f"{field}.aggregation", f"{message.aggregation} is not an aggregation"
        ) from None
    return MeasureSpec(message.name, rule)


# UpdateOperationRequest's fields, to look up in ListFields() by descriptor. Held
# here, so each is the one object protobuf hands out for its field (upb caches
# descriptor objects while they are alive; descriptors hash by identity).
_UPDATE_FIELD = pb.UpdateOperationRequest.DESCRIPTOR.fields_by_name
_STAGE = _UPDATE_FIELD["stage"]
_STAGE_COMPLETED = _UPDATE_FIELD["stage_completed"]
_STAGE_TOTAL = _UPDATE_FIELD["stage_total"]
_COMPLETED = _UPDATE_FIELD["completed"]
_TOTAL = _UPDATE_FIELD["total"]
_PERCENT = _UPDATE_FIELD["percent"]
_MESSAGE = _UPDATE_FIELD["message"]
_DETAILS = _UPDATE_FIELD["details"]
_COUNTERS = _UPDATE_FIELD["counters"]
_CHECKPOINT = _UPDATE_FIELD["checkpoint"]
_PAUSED = _UPDATE_FIELD["paused"]
_MEASURES = _UPDATE_FIELD["measures"]


def update(request: pb.UpdateOperationRequest) -> Update:
    # The fields set, in one call (on the path of every report): a HasField per
    # optional field costs more. Optional fields have presence, so an explicit
    # 0 or "" is listed.
    given: dict[Any, Any] = dict(request.ListFields())
    details = given.get(_DETAILS)
    # A map listed only when not empty; read key by key (dict() of a protobuf
    # map goes through the Mapping ABC's Python-level views).
    counters = given.get(_COUNTERS)
    measures = given.get(_MEASURES)
    return Update(
        sequence=request.sequence,
        stage=given.get(_STAGE),
        stage_completed=given.get(_STAGE_COMPLETED),
        stage_total=given.get(_STAGE_TOTAL),
        completed=given.get(_COMPLETED),
        total=given.get(_TOTAL),
        percent=given.get(_PERCENT),
        message=given.get(_MESSAGE),
        details=None if details is None else struct_to_dict(details, "details"),
        counters={} if counters is None else {key: counters[key] for key in counters},
        checkpoint=given.get(_CHECKPOINT),
        paused=given.get(_PAUSED),
        pause_reason=request.pause_reason,
        measures=None if measures is None else {key: measures[key] for key in measures},
    )


def update_response(
    message: pb.UpdateOperationResponse, op: Operation, applied: bool
) -> pb.UpdateOperationResponse:
    """Fills a report's response (or an ack's result) in place, and returns it."""
    message.revision = op.revision
    message.percent = op.percent
    message.cancel_requested = op.cancel_requested
    message.applied = applied
    message.state = int(op.state)  # type: ignore[assignment]
    return message


def operation_error(message: pb.OperationError) -> OperationError:
    return OperationError(
        code=message.code,
        message=message.message,
        stage=message.stage,
        item=message.item,
        recoverable=message.recoverable,
        details=(
            struct_to_dict(message.details, "error.details")
            if message.HasField("details")
            else None
        ),
    )


def operation_filter(message: pb.OperationFilter) -> OperationFilter:
    states = set()
    for i, value in enumerate(message.states):
        try:
            states.add(State(value))
        except ValueError:
            raise InvalidArgument(f"filter.states[{i}]", f"{value} is not a state") from None
    return OperationFilter(
        project=message.project,
        dataset=message.dataset,
        kind=message.kind,
        states=frozenset(states),
        labels=dict(message.labels),
        parent_id=message.parent_id,
        active_only=message.active_only,
    )


def _stage(stage: Stage, now: float) -> pb.Stage:
    message = pb.Stage(
        name=stage.name,
        weight=stage.weight,
        state=int(stage.state),  # type: ignore[arg-type]
        completed=stage.completed,
        total=stage.total,
    )
    _stamp(message.started_at, stage.started_at)
    _stamp(message.finished_at, stage.finished_at)
    if stage.started_at is not None:
        # A running stage's duration so far is measured to the operation's last change.
        duration = max(0.0, (stage.finished_at or now) - stage.started_at)
        message.duration.FromNanoseconds(int(duration * 1e9))
        if duration > 0 and stage.completed:
            message.rate = stage.completed / duration
    return message


def _alert(alert: Alert) -> pb.Alert:
    message = pb.Alert(type=int(alert.type), message=alert.message)  # type: ignore[arg-type]
    _stamp(message.since, alert.since)
    if alert.measure:
        message.measure = alert.measure
        message.value = alert.value
    return message


def _alert_rule(rule: AlertRule) -> pb.AlertRule:
    message = pb.AlertRule(measure=rule.measure)
    if rule.below is not None:
        message.below = rule.below
    if rule.above is not None:
        message.above = rule.above
    return message


def _error(error: OperationError) -> pb.OperationError:
    message = pb.OperationError(
        code=error.code,
        message=error.message,
        stage=error.stage,
        item=error.item,
        recoverable=error.recoverable,
    )
    _fill_struct(message.details, error.details)
    return message


# Watchers of a busy project receive the same operation state many times over;
# serializing it (and each event carrying it) once instead of once per watcher
# is the cheap win. Keyed by the stored value itself (held in the entry, so its
# id() cannot be reused while cached): ids and revisions alone can repeat
# across two servers in one process. Entry: None -> the operation's bytes;
# (type, revision, framed, epoch) -> an event's bytes, framed as a
# WatchOperationsResponse.events field or not. The epoch is in the key because
# it is in the bytes: a WatchOperation stream's first event carries it, the
# same change sent on as CHANGED does not.
# (event type, revision, framed, epoch); None: the operation alone; "json":
# the operation as proto3 JSON; other tuples: see cached().
_EventKey = tuple[object, ...] | str | None
_cache: dict[int, tuple[Operation, dict[_EventKey, bytes]]] = {}


def _serialized(op: Operation) -> dict[_EventKey, bytes]:
    cached = _cache.get(id(op))
    if cached is not None and cached[0] is op:
        return cached[1]
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    entry: dict[_EventKey, bytes] = {None: operation(op).SerializeToString()}
    _cache[id(op)] = (op, entry)
    return entry


def cached(op: Operation, key: tuple[object, ...], make: Callable[[], bytes]) -> bytes:
    """Bytes made from one stored state of an operation, made once however many
    streams send them (kept with its serialized forms, and dropped with them)."""
    entry = _serialized(op)
    made = entry.get(key)
    if made is None:
        made = entry[key] = make()
    return made


def operation_json(op: Operation) -> bytes:
    """The operation as compact proto3 JSON, made once per stored state however
    many SSE streams send it."""
    entry = _serialized(op)
    cached = entry.get("json")
    if cached is None:
        message = pb.Operation.FromString(entry[None])
        cached = json.dumps(
            json_format.MessageToDict(message), separators=(",", ":"), ensure_ascii=False
        ).encode()
        entry["json"] = cached
    return cached


def operation(op: Operation) -> pb.Operation:
    message = pb.Operation(
        id=op.id,
        kind=op.kind,
        project=op.project,
        dataset=op.dataset,
        labels=op.labels,
        parent_id=op.parent_id,
        state=int(op.state),  # type: ignore[arg-type]
        stalled=op.stalled,
        cancel_requested=op.cancel_requested,
        cancel_reason=op.cancel_reason,
        percent=op.percent,
        completed=op.completed,
        total=op.total,
        unit=op.unit,
        stage=op.stage,
        stages=[_stage(s, op.updated_at) for s in op.stages],
        message=op.message,
        counters=op.counters,
        checkpoint=op.checkpoint,
        pause_reason=op.pause_reason,
        revision=op.revision,
        created_revision=op.created_revision,
        last_sequence=op.last_sequence,
        error_count=op.error_count,
        warning_count=op.warning_count,
        alerts=[_alert(a) for a in op.alerts],
    )
    estimate = op.estimate
    if estimate.throughput:
        message.throughput = estimate.throughput
        message.throughput_unit = "%" if estimate.per_percent else (op.unit or "units")
    if estimate.eta is not None:
        message.eta.FromNanoseconds(int(estimate.eta * 1e9))
        _stamp(message.estimated_completion_time, estimate.at + estimate.eta)
        message.eta_confidence = estimate.confidence
    if op.children:
        message.children.total = sum(op.children.values())
        message.children.by_state.update(op.children)
    if op.measures or op.children_measures:
        message.measures.update(op.combined_measures)
    spec = op.spec
    if spec.measures:
        message.measure_specs.extend(
            pb.MeasureSpec(name=m.name, aggregation=int(m.aggregation))  # type: ignore[arg-type]
            for m in spec.measures
        )
    if spec.alert_rules:
        message.alert_rules.extend(_alert_rule(r) for r in spec.alert_rules)
    _fill_struct(message.details, op.details)
    _fill_struct(message.result, op.result)
    if op.error is not None:
        message.error.CopyFrom(_error(op.error))
    if op.heartbeat_timeout:
        message.heartbeat_timeout.FromNanoseconds(int(op.heartbeat_timeout * 1e9))
    _stamp(message.created_at, op.created_at)
    _stamp(message.started_at, op.started_at)
    _stamp(message.updated_at, op.updated_at)
    _stamp(message.finished_at, op.finished_at)
    return message


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Tags of the length-delimited fields spliced in below: (field number << 3) | 2.
_EVENT_OPERATION_TAG = b"\x1a"  # OperationEvent.operation = 3
_EVENTS_TAG = b"\x0a"  # WatchOperationsResponse.events = 1


def event_bytes(watch_event: WatchEvent, *, framed: bool = False) -> bytes:
    """The serialized pb.OperationEvent, cached with the operation it carries;
    `framed`, as a WatchOperationsResponse.events field (a response is just a
    concatenation of those).

    Protobuf's wire format is a concatenation of fields, so the event is its
    small header followed by the operation's cached bytes as field 3: no copy
    or re-serialization of the operation per event, nor of an event per watcher.
    """
    if watch_event.operation is None:
        event = _event_head(watch_event)
        return _frame(event) if framed else event
    entry = _serialized(watch_event.operation)
    key = (int(watch_event.type), watch_event.revision, framed, watch_event.epoch)
    cached = entry.get(key)
    if cached is None:
        if framed:
            cached = _frame(event_bytes(watch_event))
        else:
            body = entry[None]
            head = _event_head(watch_event)
            cached = b"".join((head, _EVENT_OPERATION_TAG, _varint(len(body)), body))
        entry[key] = cached
    return cached


def _frame(event: bytes) -> bytes:
    return b"".join((_EVENTS_TAG, _varint(len(event)), event))


def _event_head(watch_event: WatchEvent) -> bytes:
    return pb.OperationEvent(
        revision=watch_event.revision,
        type=int(watch_event.type),  # type: ignore[arg-type]
        epoch=watch_event.epoch,
    ).SerializeToString()


def log_entry(message: pb.LogEntry, field: str) -> LogEntry:
    level = LogLevel.INFO
    if message.level:
        try:
            level = LogLevel(message.level)
        except ValueError:
            raise InvalidArgument(f"{field}.level", f"{message.level} is not a level") from None
    return LogEntry(
        level=level,
        message=message.message,
        stage=message.stage,
        item=message.item,
        code=message.code,
        recoverable=message.recoverable,
        details=(
            struct_to_dict(message.details, f"{field}.details")
            if message.HasField("details")
            else None
        ),
        time=message.time.ToNanoseconds() / 1e9 if message.HasField("time") else 0.0,
    )


def log_entry_message(entry: LogEntry) -> pb.LogEntry:
    message = pb.LogEntry(
        level=int(entry.level),  # type: ignore[arg-type]
        message=entry.message,
        stage=entry.stage,
        item=entry.item,
        code=entry.code,
        recoverable=entry.recoverable,
        index=entry.index,
    )
    _fill_struct(message.details, entry.details)
    _stamp(message.time, entry.time)
    return message


def timeline_entry(entry: TimelineEntry) -> pb.TimelineEntry:
    message = pb.TimelineEntry(
        type=int(entry.type),  # type: ignore[arg-type]
        revision=entry.revision,
        stage=entry.stage,
        message=entry.message,
    )
    _stamp(message.time, entry.time)
    return message


def _percentiles(p: Percentiles) -> pb.Percentiles:
    return pb.Percentiles(count=p.count, p50=p.p50, p90=p.p90, p99=p.p99)


def _measure_stats(measure: MeasureStats) -> pb.MeasureStats:
    return pb.MeasureStats(
        name=measure.name,
        aggregation=int(measure.aggregation),  # type: ignore[arg-type]
        values=_percentiles(measure.values),
        total=measure.total,
    )


def _kind_stats(kind: KindStats) -> pb.KindStats:
    return pb.KindStats(
        kind=kind.kind,
        finished=kind.finished,
        succeeded=kind.succeeded,
        success_rate=kind.success_rate,
        duration=_percentiles(kind.duration),
        throughput=_percentiles(kind.throughput),
        stages=[
            pb.StageStats(
                name=stage.name,
                duration=_percentiles(stage.duration),
                throughput=_percentiles(stage.throughput),
            )
            for stage in kind.stages
        ],
        measures=[_measure_stats(m) for m in kind.measures],
    )


def stats(found: Stats) -> pb.GetStatsResponse:
    return pb.GetStatsResponse(
        counts_by_state=found.counts_by_state,
        success_rate=found.success_rate,
        active=found.active,
        stalled=found.stalled,
        paused=found.paused,
        finished=found.finished,
        kinds=[_kind_stats(k) for k in found.kinds],
    )
