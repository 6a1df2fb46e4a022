"""Pure state transitions and input validation (README guarantees 1-4, 7, 9)."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest
from headway_server.domain import lifecycle
from headway_server.domain import validation as v
from headway_server.domain.errors import FailedPrecondition, InvalidArgument
from headway_server.domain.model import (
    Operation,
    OperationError,
    StageSpec,
    StageState,
    StartSpec,
    State,
    Update,
)

T0 = 1000.0


def make_op(spec: StartSpec | None = None, op_id: str = "op-1", now: float = T0) -> Operation:
    spec = lifecycle.validate_start(spec or StartSpec(), op_id, "")
    return lifecycle.new_operation(op_id, spec, now)


def planned(*stages: tuple[str, float], total: int = 0) -> Operation:
    return make_op(StartSpec(stages=tuple(StageSpec(n, w) for n, w in stages), total=total))


def make_update(**fields: Any) -> Update:
    return Update(**fields)


def make_spec(**fields: Any) -> StartSpec:
    return StartSpec(**fields)


def apply(op: Operation, now: float = T0 + 1, **fields: Any) -> Operation:
    update = Update(**fields)
    lifecycle.validate_update(update)
    return lifecycle.apply_update(op, update, now)


def invalid(field: str) -> Any:
    """pytest.raises for InvalidArgument; check `.value.field` afterwards."""
    return pytest.raises(InvalidArgument, match=f"^{re.escape(field)}: ")


def stage_states(op: Operation) -> dict[str, StageState]:
    return {s.name: s.state for s in op.stages}


# --- percent ----------------------------------------------------------------------------


def test_percent_readme_walkthrough() -> None:
    op = planned(("clone", 1), ("index", 4), total=120)
    op = apply(op, sequence=1, stage="clone", stage_completed=1, stage_total=1)
    assert op.state is State.RUNNING
    assert op.percent == pytest.approx(20.0)
    op = apply(op, sequence=2, stage="index", stage_completed=30, stage_total=120)
    assert stage_states(op) == {"clone": StageState.DONE, "index": StageState.RUNNING}
    assert op.percent == pytest.approx(40.0)


def test_percent_skipped_stages_count_as_finished() -> None:
    op = planned(("a", 1), ("b", 2), ("c", 3), ("d", 4))
    op = apply(op, stage="c", stage_completed=1, stage_total=2)
    assert stage_states(op) == {
        "a": StageState.SKIPPED,
        "b": StageState.SKIPPED,
        "c": StageState.RUNNING,
        "d": StageState.PENDING,
    }
    # (1 + 2 + 3 * 0.5) / 10
    assert op.percent == pytest.approx(45.0)


def test_percent_plan_wins_over_units_and_explicit_percent() -> None:
    op = planned(("a", 1), ("b", 1), total=10)
    op = apply(op, stage="a", stage_completed=1, stage_total=4, completed=9, percent=99.0)
    assert op.percent == pytest.approx(12.5)


def test_percent_stage_without_total_contributes_nothing() -> None:
    op = planned(("a", 1), ("b", 1))
    op = apply(op, stage="a", stage_completed=7)
    assert op.percent == 0.0
    op = apply(op, stage="b")
    assert op.percent == pytest.approx(50.0)


def test_zero_stage_weight_defaults_to_one() -> None:
    op = planned(("a", 0), ("b", 3))
    assert [s.weight for s in op.stages] == [1.0, 3.0]
    op = apply(op, stage="b")
    assert op.percent == pytest.approx(25.0)


def test_percent_from_units() -> None:
    op = make_op(StartSpec(total=8))
    op = apply(op, completed=2)
    assert op.percent == pytest.approx(25.0)
    op = apply(op, total=4)
    assert op.percent == pytest.approx(50.0)


def test_percent_units_win_over_explicit_percent() -> None:
    op = make_op(StartSpec(total=10))
    op = apply(op, completed=1, percent=90.0)
    assert op.percent == pytest.approx(10.0)


def test_percent_explicit_when_no_units_and_no_plan() -> None:
    op = make_op()
    op = apply(op, percent=33.5)
    assert op.percent == pytest.approx(33.5)
    # Kept across reports that do not set it.
    op = apply(op, message="still going")
    assert op.percent == pytest.approx(33.5)
    assert op.explicit_percent == pytest.approx(33.5)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"completed": 150, "total": 100}, 100.0),
        ({"explicit_percent": 250.0}, 100.0),
        ({"explicit_percent": -5.0}, 0.0),
        ({"explicit_percent": math.nan}, 0.0),
        ({"explicit_percent": math.inf}, 0.0),
    ],
)
def test_percent_is_clamped(fields: dict[str, Any], expected: float) -> None:
    op = dataclasses.replace(make_op(), state=State.RUNNING, **fields)
    assert lifecycle.compute_percent(op) == expected


def test_percent_clamped_with_plan() -> None:
    op = planned(("a", 1))
    op = apply(op, stage="a", stage_completed=1, stage_total=2)
    broken = dataclasses.replace(
        op, stages=(dataclasses.replace(op.stages[0], completed=5, total=2),)
    )
    assert lifecycle.compute_percent(broken) == 100.0


def test_succeeded_is_100_whatever_the_progress() -> None:
    for op in (make_op(), make_op(StartSpec(total=10)), planned(("a", 1), ("b", 1))):
        done = lifecycle.finish(
            op, State.SUCCEEDED, T0 + 5, call="CompleteOperation", request_id=""
        )
        assert done.percent == 100.0


def test_succeeded_marks_running_done_and_pending_skipped() -> None:
    op = apply(planned(("a", 1), ("b", 1), ("c", 1)), stage="b")
    done = lifecycle.finish(op, State.SUCCEEDED, T0 + 5, call="CompleteOperation", request_id="")
    assert stage_states(done) == {
        "a": StageState.SKIPPED,
        "b": StageState.DONE,
        "c": StageState.SKIPPED,
    }
    assert done.stages[1].finished_at == T0 + 5


def test_failure_interrupts_running_stage_and_keeps_pending() -> None:
    op = apply(planned(("a", 1), ("b", 1), ("c", 1)), stage="b")
    failed = lifecycle.finish(op, State.FAILED, T0 + 5, call="FailOperation", request_id="")
    assert stage_states(failed) == {
        "a": StageState.SKIPPED,
        "b": StageState.INTERRUPTED,
        "c": StageState.PENDING,
    }


def test_percent_of_failed_operation_is_where_it_stopped() -> None:
    # Guarantee 3: (finished stages + current stage's weight x its fraction) / weights.
    # Failing must not drop the current stage's share: a watcher would see the
    # bar jump back from 60 % to 20 % at the moment the operation fails.
    op = planned(("clone", 1), ("index", 4))
    op = apply(op, sequence=1, stage="clone", stage_completed=1, stage_total=1)
    op = apply(op, sequence=2, stage="index", stage_completed=60, stage_total=120)
    assert op.percent == pytest.approx(60.0)
    failed = lifecycle.finish(
        op,
        State.FAILED,
        T0 + 5,
        call="FailOperation",
        request_id="",
        error=OperationError(code="BOOM"),
    )
    assert failed.percent == pytest.approx(60.0)


# --- stage entry ------------------------------------------------------------------------


def test_stage_not_in_plan_is_rejected() -> None:
    op = planned(("a", 1), ("b", 1))
    with invalid("stage") as exc:
        apply(op, stage="zzz")
    assert exc.value.field == "stage"


def test_stage_before_current_is_rejected() -> None:
    op = apply(planned(("a", 1), ("b", 1)), stage="b")
    with invalid("stage") as exc:
        apply(op, stage="a")
    assert exc.value.field == "stage"


def test_same_stage_again_is_not_reentered() -> None:
    op = apply(planned(("a", 1), ("b", 1)), now=T0 + 1, stage="a", stage_completed=1)
    again = apply(op, now=T0 + 2, stage="a", stage_completed=2)
    assert again.stages[0].started_at == T0 + 1
    assert again.stages[0].completed == 2


def test_empty_stage_name_is_rejected() -> None:
    with invalid("stage") as exc:
        lifecycle.validate_update(Update(stage=""))
    assert exc.value.field == "stage"


@pytest.mark.parametrize("name", ["stage_completed", "stage_total"])
def test_stage_counts_without_a_stage_are_rejected(name: str) -> None:
    op = planned(("a", 1))
    with invalid(name) as exc:
        apply(op, **{name: 1})
    assert exc.value.field == name


def test_stage_completed_above_stage_total_is_rejected() -> None:
    op = planned(("a", 1))
    with invalid("stage_completed") as exc:
        apply(op, stage="a", stage_completed=5, stage_total=4)
    assert exc.value.field == "stage_completed"
    op = apply(op, stage="a", stage_completed=3, stage_total=4)
    with invalid("stage_completed") as exc:
        apply(op, stage_completed=5)
    assert exc.value.field == "stage_completed"


def test_stage_total_below_stage_completed_names_stage_total() -> None:
    # Same rule as completed/total, where the field that was set is the one named.
    op = apply(planned(("a", 1)), sequence=1, stage="a", stage_completed=3, stage_total=4)
    with pytest.raises(InvalidArgument) as exc:
        apply(op, sequence=2, stage_total=2)
    assert exc.value.field == "stage_total"


def test_stage_completed_monotonic_without_sequence() -> None:
    op = apply(planned(("a", 1)), stage="a", stage_completed=5, stage_total=10)
    op = apply(op, stage_completed=3)
    assert op.stages[0].completed == 5
    op = apply(op, sequence=7, stage_completed=3)
    assert op.stages[0].completed == 3


def test_entering_a_stage_takes_its_stage_completed_as_given() -> None:
    op = apply(planned(("a", 1), ("b", 1)), stage="a", stage_completed=5, stage_total=10)
    op = apply(op, stage="b", stage_completed=1, stage_total=10)
    assert op.stages[1].completed == 1
    assert op.stage == "b"


def test_unplanned_stages_are_recorded_in_order() -> None:
    op = apply(make_op(StartSpec(total=10)), stage="download", completed=2)
    op = apply(op, stage="parse")
    assert [(s.name, s.state) for s in op.stages] == [
        ("download", StageState.DONE),
        ("parse", StageState.RUNNING),
    ]
    assert op.percent == pytest.approx(20.0)
    with invalid("stage"):
        apply(op, stage="download")


# --- completed / total ------------------------------------------------------------------


def test_completed_never_moves_backwards_without_sequence() -> None:
    op = apply(make_op(StartSpec(total=10)), completed=5)
    op = apply(op, completed=3)
    assert op.completed == 5


def test_completed_can_be_set_back_with_sequence() -> None:
    op = apply(make_op(StartSpec(total=10)), sequence=1, completed=5)
    op = apply(op, sequence=2, completed=3)
    assert op.completed == 3
    assert op.last_sequence == 2


def test_completed_above_total_is_rejected() -> None:
    op = make_op(StartSpec(total=10))
    with invalid("completed") as exc:
        apply(op, completed=11)
    assert exc.value.field == "completed"


def test_total_below_completed_is_rejected_naming_total() -> None:
    op = apply(make_op(StartSpec(total=10)), completed=8)
    with invalid("total") as exc:
        apply(op, total=5)
    assert exc.value.field == "total"


def test_completed_without_total_is_allowed() -> None:
    op = apply(make_op(), completed=1_000)
    assert op.completed == 1_000
    assert op.percent == 0.0


@pytest.mark.parametrize("name", ["completed", "total", "stage_completed", "stage_total"])
def test_negative_counts_are_rejected(name: str) -> None:
    with invalid(name) as exc:
        lifecycle.validate_update(make_update(**{name: -1}))
    assert exc.value.field == name


# --- counters ---------------------------------------------------------------------------


def test_counters_are_deltas_and_merge() -> None:
    op = apply(make_op(), counters={"issues": 5, "files": 1})
    op = apply(op, counters={"issues": 2, "prs": 3})
    assert dict(op.counters) == {"issues": 7, "files": 1, "prs": 3}
    op = apply(op, message="no counters")
    assert dict(op.counters) == {"issues": 7, "files": 1, "prs": 3}


def test_negative_counter_delta_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as exc:
        lifecycle.validate_update(Update(counters={"x": -1}))
    assert exc.value.field.startswith("counters[")
    assert "'x'" in exc.value.field


@pytest.mark.parametrize("name", ["", "k" * 64])
def test_bad_counter_name_is_rejected(name: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        lifecycle.validate_update(Update(counters={name: 1}))
    assert exc.value.field.startswith("counters[")


def test_counter_name_limit_counts_merged_names() -> None:
    op = apply(make_op(), counters={f"c{i}": 1 for i in range(v.MAX_COUNTERS)})
    assert len(op.counters) == v.MAX_COUNTERS
    # Existing names can still grow.
    op = apply(op, counters={"c0": 1})
    assert op.counters["c0"] == 2
    with invalid("counters") as exc:
        apply(op, counters={"one-more": 1})
    assert exc.value.field == "counters"
    with invalid("counters"):
        apply(make_op(), counters={f"c{i}": 1 for i in range(v.MAX_COUNTERS + 1)})


def test_rejected_update_leaves_operation_unchanged() -> None:
    op = apply(make_op(StartSpec(total=10)), counters={"a": 1}, completed=2)
    before = op
    with invalid("completed"):
        apply(op, counters={"a": 5}, completed=50)
    assert op == before
    assert dict(op.counters) == {"a": 1}


# --- states -----------------------------------------------------------------------------


def test_first_report_moves_queued_to_running() -> None:
    op = make_op()
    assert op.state is State.QUEUED
    assert op.started_at is None
    op = apply(op, now=T0 + 3)
    assert op.state is State.RUNNING
    assert op.started_at == T0 + 3
    assert op.updated_at == T0 + 3
    assert op.last_report_at == T0 + 3


def test_pause_and_resume() -> None:
    op = apply(make_op(), message="working")
    op = apply(op, paused=True, pause_reason="rate limited")
    assert op.state is State.PAUSED
    assert op.pause_reason == "rate limited"
    # A report that does not say otherwise keeps it paused.
    op = apply(op, message="waiting")
    assert op.state is State.PAUSED
    assert op.pause_reason == "rate limited"
    op = apply(op, paused=False)
    assert op.state is State.RUNNING
    assert op.pause_reason == ""


def test_is_duplicate() -> None:
    op = apply(make_op(), sequence=5)
    assert lifecycle.is_duplicate(op, Update(sequence=5))
    assert lifecycle.is_duplicate(op, Update(sequence=4))
    assert not lifecycle.is_duplicate(op, Update(sequence=6))
    assert not lifecycle.is_duplicate(op, Update(sequence=0))


def test_unsequenced_report_keeps_last_sequence() -> None:
    op = apply(make_op(), sequence=5)
    op = apply(op, message="no sequence")
    assert op.last_sequence == 5


def test_finish_records_call_and_result() -> None:
    op = apply(make_op(), message="working")
    done = lifecycle.finish(
        op,
        State.SUCCEEDED,
        T0 + 9,
        call="CompleteOperation",
        request_id="r1",
        message="all done",
        result={"files": 3},
    )
    assert done.state is State.SUCCEEDED
    assert done.finished_at == T0 + 9
    assert done.finished_by == ("CompleteOperation", "r1")
    assert done.message == "all done"
    assert done.result == {"files": 3}
    assert lifecycle.repeat_of_finish(done, "CompleteOperation", "r1")
    assert not lifecycle.repeat_of_finish(done, "CompleteOperation", "r2")
    assert not lifecycle.repeat_of_finish(done, "FailOperation", "r1")


def test_repeat_of_finish_needs_a_request_id() -> None:
    done = lifecycle.finish(make_op(), State.SUCCEEDED, T0, call="CompleteOperation", request_id="")
    assert not lifecycle.repeat_of_finish(done, "CompleteOperation", "")


def test_finish_from_queued_sets_started_at() -> None:
    done = lifecycle.finish(
        make_op(), State.SUCCEEDED, T0 + 2, call="CompleteOperation", request_id=""
    )
    assert done.started_at == T0 + 2


def test_finish_clears_stalled_and_pause() -> None:
    op = apply(make_op(), paused=True, pause_reason="x")
    op = dataclasses.replace(op, stalled=True)
    done = lifecycle.finish(op, State.FAILED, T0 + 2, call="FailOperation", request_id="")
    assert not done.stalled
    assert done.pause_reason == ""


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.FAILED, State.CANCELLED])
def test_terminal_states_are_final(state: State) -> None:
    done = lifecycle.finish(apply(make_op()), state, T0 + 2, call="FailOperation", request_id="")
    with pytest.raises(FailedPrecondition):
        lifecycle.apply_update(done, Update(message="late"), T0 + 3)
    with pytest.raises(FailedPrecondition):
        lifecycle.finish(done, State.SUCCEEDED, T0 + 3, call="CompleteOperation", request_id="")
    with pytest.raises(FailedPrecondition):
        lifecycle.finish(done, State.FAILED, T0 + 3, call="FailOperation", request_id="")


def test_fail_state() -> None:
    assert lifecycle.fail_state(OperationError(code="CANCELLED")) is State.CANCELLED
    assert lifecycle.fail_state(OperationError(code="IO_ERROR")) is State.FAILED
    assert lifecycle.fail_state(OperationError()) is State.FAILED
    assert lifecycle.fail_state(OperationError(code="cancelled")) is State.FAILED


# --- cancel -----------------------------------------------------------------------------


def test_cancel_queued_ends_it_at_once() -> None:
    cancelled = lifecycle.request_cancel(make_op(), "not needed", T0 + 4)
    assert cancelled is not None
    assert cancelled.state is State.CANCELLED
    assert cancelled.cancel_requested
    assert cancelled.cancel_reason == "not needed"
    assert cancelled.finished_at == T0 + 4
    assert cancelled.error is not None
    assert cancelled.error.code == "CANCELLED"


@pytest.mark.parametrize("paused", [False, True])
def test_cancel_running_or_paused_requests_it(paused: bool) -> None:
    op = apply(make_op(), paused=paused)
    requested = lifecycle.request_cancel(op, "user asked", T0 + 4)
    assert requested is not None
    assert requested.state is op.state
    assert requested.cancel_requested
    assert requested.cancel_reason == "user asked"
    assert requested.updated_at == T0 + 4
    # Again: a no-op.
    assert lifecycle.request_cancel(requested, "again", T0 + 5) is None


def test_cancel_acknowledged_by_producer() -> None:
    op = lifecycle.request_cancel(apply(make_op()), "stop", T0 + 4)
    assert op is not None
    # The producer still sees progress applied until it acknowledges.
    op = apply(op, now=T0 + 5, message="stopping")
    assert op.cancel_requested
    ended = lifecycle.finish(
        op,
        lifecycle.fail_state(OperationError(code="CANCELLED")),
        T0 + 6,
        call="FailOperation",
        request_id="ack",
        error=OperationError(code="CANCELLED"),
    )
    assert ended.state is State.CANCELLED
    assert lifecycle.request_cancel(ended, "again", T0 + 7) is None


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.FAILED])
def test_cancel_after_success_or_failure_is_failed_precondition(state: State) -> None:
    done = lifecycle.finish(apply(make_op()), state, T0 + 2, call="x", request_id="")
    with pytest.raises(FailedPrecondition):
        lifecycle.request_cancel(done, "", T0 + 3)


def test_cancel_reason_limit() -> None:
    with invalid("reason") as exc:
        lifecycle.request_cancel(make_op(), "x" * (v.MAX_MESSAGE_BYTES + 1), T0)
    assert exc.value.field == "reason"


# --- heartbeat lease --------------------------------------------------------------------


def leased(timeout: float = 30.0) -> Operation:
    return apply(make_op(StartSpec(heartbeat_timeout=timeout)), now=T0)


def test_mark_stalled_after_timeout() -> None:
    op = leased(30.0)
    assert lifecycle.mark_stalled(op, T0 + 29.9) is None
    stalled = lifecycle.mark_stalled(op, T0 + 30.0)
    assert stalled is not None
    assert stalled.stalled
    assert stalled.state is State.RUNNING
    assert stalled.updated_at == T0 + 30.0
    # Already stalled: nothing more to do.
    assert lifecycle.mark_stalled(stalled, T0 + 100) is None
    # The next applied report clears it and restarts the lease.
    resumed = apply(stalled, now=T0 + 101, message="back")
    assert not resumed.stalled
    assert lifecycle.mark_stalled(resumed, T0 + 130) is None
    assert lifecycle.mark_stalled(resumed, T0 + 131) is not None


def test_queued_paused_and_terminal_do_not_stall() -> None:
    spec = StartSpec(heartbeat_timeout=1.0)
    queued = make_op(spec)
    paused = apply(make_op(spec), now=T0, paused=True)
    done = lifecycle.finish(leased(1.0), State.SUCCEEDED, T0, call="c", request_id="")
    for op in (queued, paused, done):
        assert lifecycle.mark_stalled(op, T0 + 1_000) is None, op.state


def test_no_heartbeat_timeout_never_stalls() -> None:
    assert lifecycle.mark_stalled(apply(make_op(), now=T0), T0 + 1e9) is None


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "A1", "0op", "a.b_c:d-e", "x" * 128])
def test_valid_ids(value: str) -> None:
    v.check_id("operation_id", value)
    lifecycle.validate_start(StartSpec(parent_id=value), value, "")


@pytest.mark.parametrize("value", ["x" * 129, "-abc", ".abc", "_a", "a b", "a/b", "é", "a\n"])
@pytest.mark.parametrize("field", ["operation_id", "parent_id"])
def test_invalid_ids(field: str, value: str) -> None:
    op_id = value if field == "operation_id" else "op"
    parent = value if field == "parent_id" else ""
    with invalid(field) as exc:
        lifecycle.validate_start(StartSpec(parent_id=parent), op_id, "")
    assert exc.value.field == field


def test_empty_id_only_when_not_required() -> None:
    v.check_id("parent_id", "", required=False)
    with invalid("operation_id") as exc:
        v.check_id("operation_id", "")
    assert exc.value.field == "operation_id"


@pytest.mark.parametrize("name", ["kind", "project", "dataset", "unit"])
def test_start_name_limits(name: str) -> None:
    lifecycle.validate_start(make_spec(**{name: "n" * 128}), "", "")
    with invalid(name) as exc:
        lifecycle.validate_start(make_spec(**{name: "n" * 129}), "", "")
    assert exc.value.field == name


def test_request_id_limit() -> None:
    with invalid("request_id") as exc:
        lifecycle.validate_start(StartSpec(), "", "r" * 129)
    assert exc.value.field == "request_id"


def test_labels_limits() -> None:
    ok = {f"k{i}": "v" * 256 for i in range(v.MAX_LABELS)}
    lifecycle.validate_start(StartSpec(labels=ok), "", "")
    with invalid("labels") as exc:
        lifecycle.validate_start(StartSpec(labels={**ok, "extra": "v"}), "", "")
    assert exc.value.field == "labels"
    for labels in ({"k" * 64: "v"}, {"": "v"}, {"k": "v" * 257}):
        with pytest.raises(InvalidArgument) as exc2:
            lifecycle.validate_start(StartSpec(labels=labels), "", "")
        assert exc2.value.field.startswith("labels[")


def test_negative_total_at_start() -> None:
    with invalid("total") as exc:
        lifecycle.validate_start(StartSpec(total=-1), "", "")
    assert exc.value.field == "total"


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, -1.0, v.MAX_HEARTBEAT_TIMEOUT + 1]
)
def test_heartbeat_timeout_limits(value: float) -> None:
    with invalid("heartbeat_timeout") as exc:
        lifecycle.validate_start(StartSpec(heartbeat_timeout=value), "", "")
    assert exc.value.field == "heartbeat_timeout"


def test_stage_plan_limits() -> None:
    many = tuple(StageSpec(f"s{i}", 1) for i in range(v.MAX_STAGES))
    lifecycle.validate_start(StartSpec(stages=many), "", "")
    with invalid("stages") as exc:
        lifecycle.validate_start(StartSpec(stages=(*many, StageSpec("x", 1))), "", "")
    assert exc.value.field == "stages"
    cases = [
        ((StageSpec("", 1),), "stages[0].name"),
        ((StageSpec("a", 1), StageSpec("s" * 64, 1)), "stages[1].name"),
        ((StageSpec("a", 1), StageSpec("a", 2)), "stages[1].name"),
        ((StageSpec("a", math.nan),), "stages[0].weight"),
        ((StageSpec("a", math.inf),), "stages[0].weight"),
        ((StageSpec("a", -1),), "stages[0].weight"),
    ]
    for stages, field in cases:
        with invalid(field) as exc:
            lifecycle.validate_start(StartSpec(stages=stages), "", "")
        assert exc.value.field == field


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.5, 100.5])
def test_percent_must_be_finite_and_within_range(value: float) -> None:
    with invalid("percent") as exc:
        lifecycle.validate_update(Update(percent=value))
    assert exc.value.field == "percent"


@pytest.mark.parametrize("value", [0.0, 100.0])
def test_percent_bounds_are_inclusive(value: float) -> None:
    lifecycle.validate_update(Update(percent=value))


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("message", v.MAX_MESSAGE_BYTES),
        ("checkpoint", v.MAX_CHECKPOINT_BYTES),
        ("pause_reason", v.MAX_MESSAGE_BYTES),
    ],
)
def test_text_limits_are_bytes(name: str, limit: int) -> None:
    lifecycle.validate_update(make_update(**{name: "a" * limit}))
    with invalid(name) as exc:
        lifecycle.validate_update(make_update(**{name: "a" * (limit + 1)}))
    assert exc.value.field == name
    # Counted in UTF-8 bytes, not characters.
    with invalid(name):
        lifecycle.validate_update(make_update(**{name: "é" * (limit // 2 + 1)}))


def test_stage_name_limit_in_update() -> None:
    with invalid("stage"):
        lifecycle.validate_update(Update(stage="s" * 64))


def big_struct(size: int) -> dict[str, Any]:
    # {"k":"..."} serialises to len(value) + 8 bytes.
    return {"k": "x" * (size - 8)}


def test_struct_size_limit() -> None:
    lifecycle.validate_update(Update(details=big_struct(v.MAX_STRUCT_BYTES)))
    with invalid("details") as exc:
        lifecycle.validate_update(Update(details=big_struct(v.MAX_STRUCT_BYTES + 1)))
    assert exc.value.field == "details"
    with invalid("result") as exc:
        lifecycle.validate_complete("", big_struct(v.MAX_STRUCT_BYTES + 1), "")
    assert exc.value.field == "result"
    with invalid("error.details") as exc:
        lifecycle.validate_fail(OperationError(details=big_struct(v.MAX_STRUCT_BYTES + 1)), "")
    assert exc.value.field == "error.details"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_struct_rejects_nan_and_infinity(bad: float) -> None:
    with invalid("details") as exc:
        lifecycle.validate_update(Update(details={"nested": {"x": [1, bad]}}))
    assert exc.value.field == "details"
    with invalid("result"):
        lifecycle.validate_complete("", {"x": bad}, "")
    with invalid("error.details"):
        lifecycle.validate_fail(OperationError(details={"x": bad}), "")


def test_complete_and_fail_text_limits() -> None:
    big = "m" * (v.MAX_MESSAGE_BYTES + 1)
    with invalid("message"):
        lifecycle.validate_complete(big, None, "")
    with invalid("request_id"):
        lifecycle.validate_complete("", None, "r" * 129)
    cases = [
        (OperationError(code="c" * 129), "error.code"),
        (OperationError(message=big), "error.message"),
        (OperationError(stage="s" * 64), "error.stage"),
        (OperationError(item=big), "error.item"),
    ]
    for error, field in cases:
        with invalid(field) as exc:
            lifecycle.validate_fail(error, "")
        assert exc.value.field == field
    with invalid("request_id"):
        lifecycle.validate_fail(OperationError(), "r" * 129)


def test_invalid_argument_message_names_the_field() -> None:
    exc = InvalidArgument("labels['x']", "too long")
    assert str(exc).startswith("labels['x']")
