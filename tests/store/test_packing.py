"""Packing of finished operations and timelines (store/packing.py): exact round trips."""

from __future__ import annotations

import dataclasses
import math

import pytest
from headway_server.domain.model import (
    Alert,
    AlertType,
    Estimate,
    LogEntry,
    LogLevel,
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
from headway_server.store.packing import (
    Unpackable,
    pack_logs,
    pack_operation,
    pack_timeline,
    unpack_logs,
    unpack_operation,
    unpack_timeline,
)

SPEC = StartSpec(
    kind="github-ingest",
    project="acme",
    labels={"team": "search"},
    total=1000,
    unit="files",
    stages=(StageSpec("clone", 1.0), StageSpec("index", 4.0)),
    heartbeat_timeout=30.0,
)


def every_field_set() -> Operation:
    """A finished operation with every field away from its default."""
    return Operation(
        id="op-1",
        spec=SPEC,
        state=State.FAILED,
        stalled=False,
        cancel_requested=True,
        cancel_reason="operator asked",
        percent=42.123456789,
        completed=420,
        total=1000,
        stage="index",
        stages=(
            Stage("clone", 1.0, StageState.DONE, 1, 1, 1795445895.8279321, 1795445895.843689),
            Stage("index", 4.0, StageState.INTERRUPTED, 420, 1000, 1795445895.843689, None),
        ),
        message="indexing",
        details={"repository": "acme/search", "nested": {"list": [1.0, "two", None, True]}},
        counters={"files": 420, "errors": 3},
        checkpoint="src/file-0420.py",
        error=OperationError("E_DISK", "disk full", "index", "src/a.py", True, {"free": 0.0}),
        result={"partial": True},
        pause_reason="",
        created_at=1795445895.1,
        started_at=1795445895.2,
        updated_at=1795445899.3,
        finished_at=1795445899.3,
        revision=9001,
        created_revision=17,
        last_sequence=12,
        explicit_percent=41.5,
        finished_by=("FailOperation", "req-9"),
        last_report_at=1795445899.0,
        error_count=3,
        warning_count=7,
        alerts=(
            Alert(AlertType.HIGH_ERROR_RATE, "3 errors in 420 items", 1795445898.5),
            Alert(
                AlertType.MEASURE_THRESHOLD, "quality 0.5 below 0.8", 1795445898.6, "quality", 0.5
            ),
        ),
        children={"SUCCEEDED": 2, "FAILED": 1},
        children_percent=66.6,
        depth=2,
        estimate=Estimate(12.5, True, None, 0.25, 1795445899.3),
        eta_state=None,
        peak_throughput=99.9,
        eta_baseline=(1795445890.0, 1795445999.0),
        measures={"quality": 0.93, "cost_usd": 1.27},
        children_measures={"cost_usd": 10.5, "tokens": 48210.0},
    )


def test_every_field_round_trips_exactly() -> None:
    op = every_field_set()
    defaults = Operation(id="op-1", spec=SPEC)
    unset = [
        f.name
        for f in dataclasses.fields(Operation)
        if getattr(op, f.name) == getattr(defaults, f.name)
        and f.name not in {"id", "spec", "stalled", "pause_reason", "eta_state"}
    ]
    assert unset == [], "set these fields in every_field_set() so the round trip covers them"
    unpacked = unpack_operation(op.id, op.spec, pack_operation(op))
    assert unpacked == op
    # Enums come back as enums, not ints (convert.py and the domain compare them).
    assert unpacked.state is State.FAILED
    assert unpacked.stages[1].state is StageState.INTERRUPTED
    assert unpacked.alerts[0].type is AlertType.HIGH_ERROR_RATE
    assert unpacked.alerts[1].measure == "quality"


def test_a_typical_finished_operation_packs_small() -> None:
    op = dataclasses.replace(every_field_set(), alerts=(), error=None, state=State.SUCCEEDED)
    # As objects such a value is several KB (bench: retained memory).
    assert len(pack_operation(op)) < 400


def test_values_marshal_cannot_write_are_refused_not_mangled() -> None:
    op = dataclasses.replace(every_field_set(), result={"odd": object()})
    with pytest.raises(Unpackable):
        pack_operation(op)


def test_estimator_state_is_not_packed() -> None:
    with pytest.raises(Unpackable):
        pack_operation(dataclasses.replace(every_field_set(), eta_state=object()))


def test_floats_round_trip_bit_for_bit() -> None:
    tiny = dataclasses.replace(every_field_set(), percent=math.nextafter(0.0, 1.0))
    assert unpack_operation(tiny.id, SPEC, pack_operation(tiny)).percent == tiny.percent


def test_timeline_round_trips_with_its_counts() -> None:
    entries = [
        TimelineEntry(TimelineType.STARTED, 1795445895.1, 3, "", "github-ingest"),
        TimelineEntry(TimelineType.STAGE_STARTED, 1795445895.2, 4, "clone", "clone"),
        TimelineEntry(TimelineType.FAILED, 1795445899.3, 9, "clone", "E_DISK: disk full"),
    ]
    unpacked, dropped, appended = unpack_timeline(pack_timeline(entries, 2, 5))
    assert (unpacked, dropped, appended) == (entries, 2, 5)
    assert unpacked[2].type is TimelineType.FAILED


def test_logs_round_trip_with_their_counts() -> None:
    entries = [
        LogEntry(LogLevel.WARNING, "slow disk", "index", "src/a.py", "W_SLOW", True, None, 5.5, 7),
        LogEntry(
            LogLevel.ERROR, "bad file", "", "src/b.py", "E_PARSE", False, {"line": 3.0}, 6.0, 8
        ),
    ]
    unpacked, dropped, appended = unpack_logs(pack_logs(entries, 6, 8))
    assert (unpacked, dropped, appended) == (entries, 6, 8)
    assert unpacked[1].level is LogLevel.ERROR


# --- records: whole operations for the Redis store ---------------------------------------


def test_a_record_round_trips_a_whole_operation_running_or_finished() -> None:
    from headway_server.domain.eta import EtaState
    from headway_server.domain.model import AlertRule, MeasureSpec
    from headway_server.store.packing import pack_record, unpack_record

    finished = dataclasses.replace(
        every_field_set(),
        id="op-record",
        spec=dataclasses.replace(
            SPEC,
            parent_id="op-parent",
            measures=(MeasureSpec("cost_usd"),),
            alert_rules=(AlertRule("cost_usd", above=50.0),),
        ),
    )
    running = dataclasses.replace(
        finished,
        state=State.RUNNING,
        finished_at=None,
        eta_state=EtaState(last_at=1795445899.0, observations=7, drift=0.25, stages_seen=1),
    )
    for op in (finished, running):
        assert unpack_record(pack_record(op)) == op
    # Finished ones are held for the retention: deflated; running ones are not.
    assert len(pack_record(finished)) < len(pack_record(running)) / 2


def test_a_record_this_version_cannot_read_is_refused() -> None:
    from headway_server.store.packing import unpack_record

    for data in (b"", b"\x07abc", b"\x01not deflate", b"\x02not marshal"):
        with pytest.raises(ValueError):
            unpack_record(data)
