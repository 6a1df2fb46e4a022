"""Pure state transitions: (operation, request, now) -> new operation.

No I/O and no revisions here: the service reads from the store, calls one of
these, and writes the result back with compare-and-set. Every check runs before
anything is built, so a rejected request cannot leave a half-applied change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from headway_server.domain import measures as m
from headway_server.domain import validation as v
from headway_server.domain.errors import FailedPrecondition, InvalidArgument
from headway_server.domain.model import (
    JsonObject,
    Operation,
    OperationError,
    Stage,
    StageSpec,
    StageState,
    StartSpec,
    State,
    Update,
    amend,
    evolve,
)

CANCELLED_CODE = "CANCELLED"
# Stages that count in percent by their completed/total: an interrupted stage
# keeps the share it reached, so a failed job's bar does not jump back.
_PARTIAL = (StageState.RUNNING, StageState.INTERRUPTED)


def validate_start(spec: StartSpec, operation_id: str, request_id: str) -> StartSpec:
    """Checks a start request and returns the spec with stage weights normalised."""
    v.check_id("operation_id", operation_id, required=False)
    v.check_id("parent_id", spec.parent_id, required=False)
    v.check_name("request_id", request_id)
    for name in ("kind", "project", "dataset", "unit"):
        v.check_name(name, getattr(spec, name))
    v.check_labels("labels", spec.labels)
    v.check_count("total", spec.total)
    v.check_number("heartbeat_timeout", spec.heartbeat_timeout, low=0, high=v.MAX_HEARTBEAT_TIMEOUT)
    if len(spec.stages) > v.MAX_STAGES:
        raise InvalidArgument("stages", f"has more than {v.MAX_STAGES} entries")
    seen: set[str] = set()
    stages = []
    for i, stage in enumerate(spec.stages):
        field = f"stages[{i}]"
        if not stage.name or len(stage.name) > v.MAX_KEY_LENGTH:
            raise InvalidArgument(f"{field}.name", f"must be 1-{v.MAX_KEY_LENGTH} characters")
        if stage.name in seen:
            raise InvalidArgument(f"{field}.name", f"repeats stage {stage.name!r}")
        seen.add(stage.name)
        v.check_number(f"{field}.weight", stage.weight, low=0, high=1e9)
        stages.append(StageSpec(stage.name, stage.weight or 1.0))
    m.validate_spec(spec)
    return evolve(spec, stages=tuple(stages))


def new_operation(operation_id: str, spec: StartSpec, now: float) -> Operation:
    return Operation(
        id=operation_id,
        spec=spec,
        total=spec.total,
        stages=tuple(Stage(s.name, s.weight) for s in spec.stages),
        created_at=now,
        updated_at=now,
        last_report_at=now,
    )


def require_active(op: Operation, call: str) -> None:
    if op.state.terminal:
        raise FailedPrecondition(
            f"operation {op.id!r} is {op.state.name}; {call} is not allowed after it ended"
        )


def validate_update(update: Update) -> None:
    """Checks what can be checked without the operation."""
    for name, value in (
        ("stage_completed", update.stage_completed),
        ("stage_total", update.stage_total),
        ("completed", update.completed),
        ("total", update.total),
    ):
        if value is not None:
            v.check_count(name, value)
    if update.percent is not None:
        v.check_number("percent", update.percent, low=0, high=100)
    if update.stage is not None and not update.stage:
        raise InvalidArgument("stage", "must not be empty when set")
    if update.stage is not None:
        v.check_name("stage", update.stage, v.MAX_KEY_LENGTH)
    if update.message is not None:
        v.check_bytes("message", update.message, v.MAX_MESSAGE_BYTES)
    if update.checkpoint is not None:
        v.check_bytes("checkpoint", update.checkpoint, v.MAX_CHECKPOINT_BYTES)
    # Most reports leave these unset: no call for them (every report passes here).
    if update.pause_reason:
        v.check_bytes("pause_reason", update.pause_reason, v.MAX_MESSAGE_BYTES)
    if update.details is not None:
        v.check_struct("details", update.details)
    if update.counters:
        v.check_counter_deltas("counters", update.counters)
    if update.measures:
        m.validate_reported(update.measures)


def is_duplicate(op: Operation, update: Update) -> bool:
    """A report at or below the last applied sequence is a retry or arrived late."""
    return update.sequence != 0 and update.sequence <= op.last_sequence


def _stage_index(stages: tuple[Stage, ...], name: str) -> int:
    for i, stage in enumerate(stages):
        if stage.name == name:
            return i
    return -1


def _enter_stage(op: Operation, name: str, now: float) -> tuple[Stage, ...]:
    stages = list(op.stages)
    target = _stage_index(op.stages, name)
    current = _stage_index(op.stages, op.stage) if op.stage else -1
    if target < 0:
        if op.planned:
            plan = ", ".join(s.name for s in op.stages)
            raise InvalidArgument("stage", f"{name!r} is not in the stage plan ({plan})")
        # Without a plan, stages are recorded as they come, for the history.
        stages.append(Stage(name, 0.0))
        target = len(stages) - 1
    if target < current:
        raise InvalidArgument("stage", f"{name!r} comes before the current stage {op.stage!r}")
    if target == current:
        return op.stages
    for i in range(max(current, 0), target):
        stage = stages[i]
        if stage.state is StageState.RUNNING:
            stages[i] = evolve(stage, state=StageState.DONE, finished_at=now)
        elif stage.state is StageState.PENDING:
            stages[i] = evolve(stage, state=StageState.SKIPPED)
    stages[target] = evolve(stages[target], state=StageState.RUNNING, started_at=now)
    return tuple(stages)


def _monotonic(old: int, new: int | None, *, sequenced: bool) -> int:
    if new is None:
        return old
    # Without sequences a late report must not move progress backwards.
    return new if sequenced else max(old, new)


def apply_update(op: Operation, update: Update, now: float) -> Operation:
    """Applies a (non-duplicate) report. Raises before building anything on bad input."""
    require_active(op, "UpdateOperation")
    sequenced = update.sequence != 0
    stages = op.stages
    stage_name = op.stage
    if update.stage is not None:
        stages = _enter_stage(op, update.stage, now)
        stage_name = update.stage
    if (update.stage_completed is not None or update.stage_total is not None) and not stage_name:
        field = "stage_completed" if update.stage_completed is not None else "stage_total"
        raise InvalidArgument(field, "there is no current stage; set stage first")
    if stage_name:
        i = _stage_index(stages, stage_name)
        stage = stages[i]
        completed = _monotonic(stage.completed, update.stage_completed, sequenced=sequenced)
        total = stage.total if update.stage_total is None else update.stage_total
        if total and completed > total:
            field = "stage_completed" if update.stage_completed is not None else "stage_total"
            raise InvalidArgument(
                field, f"stage_completed {completed} is above stage_total {total}"
            )
        if (completed, total) != (stage.completed, stage.total):
            stages = (
                *stages[:i],
                evolve(stage, completed=completed, total=total),
                *stages[i + 1 :],
            )

    completed = _monotonic(op.completed, update.completed, sequenced=sequenced)
    total = op.total if update.total is None else update.total
    if total and completed > total:
        field = "completed" if update.completed is not None else "total"
        raise InvalidArgument(field, f"completed {completed} is above total {total}")

    counters: Mapping[str, int] = op.counters
    if update.counters:
        merged = dict(op.counters)
        for key, delta in update.counters.items():
            merged[key] = merged.get(key, 0) + delta
        if len(merged) > v.MAX_COUNTERS:
            raise InvalidArgument("counters", f"more than {v.MAX_COUNTERS} counter names")
        counters = merged
    # Most reports carry no measures: the copy below keeps the operation's.
    measures = m.merged(op.measures, update.measures) if update.measures else None

    state = op.state
    pause_reason = op.pause_reason
    if update.paused is True:
        state, pause_reason = State.PAUSED, update.pause_reason
    elif update.paused is False or state is State.QUEUED:
        state, pause_reason = State.RUNNING, ""

    new = evolve(
        op,
        state=state,
        stalled=False,
        completed=completed,
        total=total,
        stage=stage_name,
        stages=stages,
        message=op.message if update.message is None else update.message,
        details=op.details if update.details is None else update.details,
        counters=counters,
        checkpoint=op.checkpoint if update.checkpoint is None else update.checkpoint,
        pause_reason=pause_reason,
        explicit_percent=op.explicit_percent if update.percent is None else update.percent,
        started_at=op.started_at if op.started_at is not None else now,
        updated_at=now,
        last_report_at=now,
        last_sequence=max(op.last_sequence, update.sequence),
    )
    if measures is not None:
        amend(new, measures=measures)
    return amend(new, percent=compute_percent(new))


def compute_percent(op: Operation) -> float:
    """Percent done in [0, 100]: stage plan, else units, else the explicit figure."""
    if op.state is State.SUCCEEDED:
        return 100.0
    if op.planned:
        weights = sum(s.weight for s in op.stages)
        done = 0.0
        for stage in op.stages:
            if stage.state in (StageState.DONE, StageState.SKIPPED):
                done += stage.weight
            elif stage.state in _PARTIAL and stage.total:
                done += stage.weight * stage.completed / stage.total
        percent = 100.0 * done / weights if weights else 0.0
    elif op.total:
        percent = 100.0 * op.completed / op.total
    elif op.explicit_percent or op.children_percent is None:
        percent = op.explicit_percent
    else:
        # A parent without progress of its own shows its children's.
        percent = op.children_percent
    return min(100.0, max(0.0, percent)) if math.isfinite(percent) else 0.0


def _finish_stages(op: Operation, state: State, now: float) -> tuple[Stage, ...]:
    running = StageState.DONE if state is State.SUCCEEDED else StageState.INTERRUPTED
    stages = []
    for stage in op.stages:
        if stage.state is StageState.RUNNING:
            stage = evolve(stage, state=running, finished_at=now)
        elif stage.state is StageState.PENDING and state is State.SUCCEEDED:
            stage = evolve(stage, state=StageState.SKIPPED)
        stages.append(stage)
    return tuple(stages)


def repeat_of_finish(op: Operation, call: str, request_id: str) -> bool:
    """True when this is a retry of the call that ended the operation."""
    return bool(request_id) and op.finished_by == (call, request_id)


def finish(
    op: Operation,
    state: State,
    now: float,
    *,
    call: str,
    request_id: str,
    message: str | None = None,
    result: JsonObject | None = None,
    error: OperationError | None = None,
) -> Operation:
    require_active(op, call)
    new = evolve(
        op,
        state=state,
        stalled=False,
        stages=_finish_stages(op, state, now),
        message=op.message if message is None else message,
        result=result,
        error=error,
        pause_reason="",
        started_at=op.started_at if op.started_at is not None else now,
        updated_at=now,
        finished_at=now,
        finished_by=(call, request_id),
    )
    return amend(new, percent=compute_percent(new))


def validate_complete(message: str, result: JsonObject | None, request_id: str) -> None:
    v.check_bytes("message", message, v.MAX_MESSAGE_BYTES)
    v.check_struct("result", result)
    v.check_name("request_id", request_id)


def validate_fail(error: OperationError, request_id: str) -> None:
    v.check_name("error.code", error.code)
    v.check_bytes("error.message", error.message, v.MAX_MESSAGE_BYTES)
    v.check_name("error.stage", error.stage, v.MAX_KEY_LENGTH)
    v.check_bytes("error.item", error.item, v.MAX_MESSAGE_BYTES)
    v.check_struct("error.details", error.details)
    v.check_name("request_id", request_id)


def fail_state(error: OperationError) -> State:
    """FailOperation with code CANCELLED is how a producer acknowledges a cancel."""
    return State.CANCELLED if error.code == CANCELLED_CODE else State.FAILED


def request_cancel(op: Operation, reason: str, now: float) -> Operation | None:
    """The cancelled operation, or None when nothing changes (already asked/ended)."""
    v.check_bytes("reason", reason, v.MAX_MESSAGE_BYTES)
    if op.state is State.CANCELLED or (op.cancel_requested and op.state.active):
        return None
    if op.state.terminal:
        raise FailedPrecondition(f"operation {op.id!r} already ended {op.state.name}")
    if op.state is State.QUEUED:
        # Nobody is working on it yet, so there is no producer to acknowledge.
        ended = finish(
            op,
            State.CANCELLED,
            now,
            call="CancelOperation",
            request_id="",
            error=OperationError(code=CANCELLED_CODE, message=reason or "cancelled while queued"),
        )
        return evolve(ended, cancel_requested=True, cancel_reason=reason)
    return evolve(op, cancel_requested=True, cancel_reason=reason, updated_at=now)


def mark_stalled(op: Operation, now: float) -> Operation | None:
    """The stalled operation if its heartbeat lease ran out, else None."""
    if (
        op.state is State.RUNNING
        and not op.stalled
        and op.heartbeat_timeout > 0
        and now - op.last_report_at >= op.heartbeat_timeout
    ):
        return evolve(op, stalled=True, updated_at=now)
    return None
