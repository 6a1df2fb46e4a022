"""Model-based test of the operation lifecycle (README guarantees 1, 2, 3, 5 and 9).

A Hypothesis state machine drives the real server through the generated stubs
(start, retried start, reports with and without sequences including duplicates,
counter deltas, pause/resume, complete, fail, cancel, delete, get) and keeps a
small Python model of what each operation must look like. After every step the
server must agree with the model: status codes, state, counters, completed,
last_sequence, cancel_requested, percent, and store-wide increasing revisions.

Where the README leaves a case open the machine does not go there: pausing or
completing a QUEUED operation (the lifecycle only shows QUEUED -> RUNNING), a
report without `paused` to a PAUSED operation, and a duplicate report to an
ended operation (either FAILED_PRECONDITION or `applied=false` is accepted).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

if TYPE_CHECKING:  # mypy knows the helpers as tests.watch_checks, pytest as watch_checks
    from tests import watch_checks as wc
else:
    import watch_checks as wc


OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS

QUEUED = pb.Operation.QUEUED
RUNNING = pb.Operation.RUNNING
PAUSED = pb.Operation.PAUSED
SUCCEEDED = pb.Operation.SUCCEEDED
FAILED = pb.Operation.FAILED
CANCELLED = pb.Operation.CANCELLED
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
COUNTER_NAMES = ("files", "bytes", "errors")


@dataclasses.dataclass
class Model:
    """What one operation must look like."""

    id: str
    kind: str
    total: int
    revision: int
    state: int = QUEUED
    completed: int = 0
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    last_sequence: int = 0
    cancel_requested: bool = False
    cancel_reason: str = ""
    # (call, request_id) of the call that ended the operation.
    finished_by: tuple[str, str] | None = None
    deleted: bool = False

    @property
    def percent(self) -> float:
        if self.state == SUCCEEDED:
            return 100.0
        return 100.0 * self.completed / self.total

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def call(method: Any, request: Any) -> tuple[Any, grpc.StatusCode]:
    """Calls a unary method; returns (response or None, status code)."""
    try:
        return method(request, timeout=5), OK
    except grpc.RpcError as exc:
        return None, exc.code()


# Some operation that is not deleted (deleted ones are still picked now and then).
has_operations = precondition(lambda self: any(not m.deleted for m in self.models.values()))


class LifecycleMachine(RuleBasedStateMachine):
    stub: ClassVar[pb_grpc.ProgressTrackerStub]

    def __init__(self) -> None:
        super().__init__()
        self.project = wc.unique("model")
        self.models: dict[str, Model] = {}
        self.revision = 0  # highest revision seen
        self.touched: set[str] = set()  # operations the current step called

    # --- helpers ---

    def advance(self, model: Model, revision: int) -> None:
        """A change happened: it has a revision above every earlier one."""
        assert revision > self.revision, f"revision {revision} not above {self.revision}"
        assert revision > model.revision
        self.revision = revision
        model.revision = revision

    def check(self, model: Model, op: pb.Operation) -> None:
        where = f"{model}\nserver:\n{op}"
        assert op.id == model.id and op.project == self.project, where
        assert op.state == model.state, where
        assert op.completed == model.completed, where
        assert op.total == model.total, where
        assert dict(op.counters) == model.counters, where
        assert op.last_sequence == model.last_sequence, where
        assert op.cancel_requested == model.cancel_requested, where
        assert op.cancel_reason == model.cancel_reason, where
        assert op.revision == model.revision, where
        assert 0.0 <= op.percent <= 100.0, where
        assert abs(op.percent - model.percent) < 1e-9, where
        assert op.created_revision <= op.revision, where

    def get(self, operation_id: str) -> tuple[pb.Operation | None, grpc.StatusCode]:
        return call(self.stub.GetOperation, pb.GetOperationRequest(operation_id=operation_id))

    def request_id(self, model: Model, name: str, repeat: bool) -> str:
        if repeat and model.finished_by is not None and model.finished_by[0] == name:
            return model.finished_by[1]
        return wc.unique("req")

    def unchanged(self, model: Model, returned: pb.Operation) -> None:
        """A no-op call returned the stored operation and changed nothing."""
        stored, code = self.get(model.id)
        assert code == OK and stored is not None
        wc.assert_same_operation(returned, stored, "a no-op returns the stored operation")
        self.check(model, stored)

    def begin(self, model: Model) -> None:
        """Moves a QUEUED operation to RUNNING with a first (empty) report."""
        if model.state != QUEUED or model.deleted:
            return
        sequence = model.last_sequence + 1
        request = pb.UpdateOperationRequest(operation_id=model.id, sequence=sequence)
        response, code = call(self.stub.UpdateOperation, request)
        assert code == OK and response.applied, code
        model.state = RUNNING
        model.last_sequence = sequence
        self.advance(model, response.revision)
        assert response.state == RUNNING

    def live(self) -> list[str]:
        return [i for i, m in self.models.items() if not m.deleted and not m.terminal]

    def pick(self, data: st.DataObject) -> Model:
        """Mostly an active operation; sometimes an ended or (rarely) a deleted one."""
        live = self.live()
        ended = [i for i, m in self.models.items() if not m.deleted and m.terminal]
        gone = [i for i, m in self.models.items() if m.deleted]
        roll = data.draw(st.integers(0, 9), label="roll")
        choices = (live if roll < 7 else ended if roll < 9 else gone) or live or ended or gone
        model = self.models[data.draw(st.sampled_from(choices), label="operation")]
        self.touched.add(model.id)
        return model

    # --- rules ---

    @precondition(lambda self: len(self.live()) < 3)  # keep the steps on a few operations
    @rule(
        total=st.sampled_from([1, 2, 7, 40]),
        kind=st.sampled_from(["crawl", "ingest"]),
    )
    def start(self, total: int, kind: str) -> None:
        operation_id = wc.unique("op")
        request = pb.StartOperationRequest(
            operation_id=operation_id, kind=kind, project=self.project, total=total
        )
        op, code = call(self.stub.StartOperation, request)
        assert code == OK, code
        model = Model(id=operation_id, kind=kind, total=total, revision=0)
        self.advance(model, op.revision)
        assert op.created_revision == op.revision
        self.models[operation_id] = model
        self.check(model, op)

    @has_operations
    @rule(data=st.data(), same=st.booleans())
    def start_again(self, data: st.DataObject, same: bool) -> None:
        model = self.pick(data)
        operation_id = model.id
        if model.deleted:
            return  # whether a deleted id can be reused is not specified
        request = pb.StartOperationRequest(
            operation_id=operation_id,
            kind=model.kind,
            project=self.project,
            total=model.total if same else model.total + 1,
        )
        op, code = call(self.stub.StartOperation, request)
        if same:
            assert code == OK, code
            self.unchanged(model, op)
        else:
            assert code == ALREADY_EXISTS, code

    @has_operations
    @rule(
        reports=st.lists(
            st.tuples(
                st.sampled_from(["next", "jump", "duplicate", "unsequenced"]),
                st.booleans(),
                st.dictionaries(st.sampled_from(COUNTER_NAMES), st.integers(1, 9), max_size=2),
            ),
            min_size=1,
            max_size=6,
        ),
        data=st.data(),
    )
    def report(self, reports: list[tuple[str, bool, dict[str, int]]], data: st.DataObject) -> None:
        """A burst of progress reports to one operation."""
        model = self.pick(data)
        for mode, set_completed, counters in reports:
            self.report_once(model, mode, set_completed, counters, data)

    def report_once(
        self,
        model: Model,
        mode: str,
        set_completed: bool,
        counters: dict[str, int],
        data: st.DataObject,
    ) -> None:
        operation_id = model.id
        if mode == "duplicate" and model.last_sequence == 0:
            mode = "next"
        if mode == "next":
            sequence = model.last_sequence + 1
        elif mode == "jump":
            sequence = model.last_sequence + data.draw(st.integers(2, 5), label="jump")
        elif mode == "duplicate":
            sequence = data.draw(st.integers(1, model.last_sequence), label="duplicate")
        else:
            sequence = 0
        fields: dict[str, Any] = {"sequence": sequence, "counters": counters}
        if set_completed:
            fields["completed"] = data.draw(st.integers(0, model.total), label="completed")
        if model.state == PAUSED and mode != "duplicate":
            fields["paused"] = False  # what a report to a PAUSED operation does is open
        request = pb.UpdateOperationRequest(operation_id=operation_id, **fields)
        response, code = call(self.stub.UpdateOperation, request)

        if model.deleted:
            assert code == NOT_FOUND, code
            return
        if model.terminal:
            if mode == "duplicate" and code == OK:
                assert not response.applied
                assert response.revision == model.revision and response.state == model.state
            else:
                assert code == FAILED_PRECONDITION, code
            return
        assert code == OK, code
        if mode == "duplicate":
            assert not response.applied, "a report at or below last_sequence must not apply"
            assert response.revision == model.revision
        else:
            assert response.applied
            if model.state in (QUEUED, PAUSED):
                model.state = RUNNING
            if "completed" in fields:
                new = fields["completed"]
                # Absolute with sequences; never backwards without them.
                model.completed = new if sequence else max(model.completed, new)
            for name, delta in counters.items():
                model.counters[name] = model.counters.get(name, 0) + delta
            if sequence:
                model.last_sequence = sequence
            self.advance(model, response.revision)
        assert response.state == model.state
        assert response.cancel_requested == model.cancel_requested
        assert abs(response.percent - model.percent) < 1e-9
        assert 0.0 <= response.percent <= 100.0

    @has_operations
    @rule(data=st.data(), paused=st.booleans(), sequenced=st.booleans())
    def pause_or_resume(self, data: st.DataObject, paused: bool, sequenced: bool) -> None:
        model = self.pick(data)
        operation_id = model.id
        if paused:
            self.begin(model)  # pausing before the first report is not specified
        sequence = model.last_sequence + 1 if sequenced else 0
        request = pb.UpdateOperationRequest(
            operation_id=operation_id, sequence=sequence, paused=paused, pause_reason="later"
        )
        response, code = call(self.stub.UpdateOperation, request)
        if model.deleted:
            assert code == NOT_FOUND, code
            return
        if model.terminal:
            assert code == FAILED_PRECONDITION, code
            return
        assert code == OK and response.applied, code
        model.state = PAUSED if paused else RUNNING
        if sequence:
            model.last_sequence = sequence
        self.advance(model, response.revision)
        assert response.state == model.state

    @has_operations
    @rule(data=st.data(), repeat=st.booleans())
    def complete(self, data: st.DataObject, repeat: bool) -> None:
        model = self.pick(data)
        operation_id = model.id
        self.begin(model)  # completing before the first report is not specified
        request_id = self.request_id(model, "complete", repeat)
        request = pb.CompleteOperationRequest(operation_id=operation_id, request_id=request_id)
        op, code = call(self.stub.CompleteOperation, request)
        self.finished(model, op, code, ("complete", request_id), SUCCEEDED)

    @has_operations
    @rule(data=st.data(), repeat=st.booleans(), acknowledge_cancel=st.booleans())
    def fail(self, data: st.DataObject, repeat: bool, acknowledge_cancel: bool) -> None:
        model = self.pick(data)
        operation_id = model.id
        self.begin(model)  # failing before the first report is not specified
        request_id = self.request_id(model, "fail", repeat)
        code_name = "CANCELLED" if acknowledge_cancel else "BOOM"
        request = pb.FailOperationRequest(
            operation_id=operation_id,
            error=pb.OperationError(code=code_name, message="stopped"),
            request_id=request_id,
        )
        op, code = call(self.stub.FailOperation, request)
        state = CANCELLED if acknowledge_cancel else FAILED
        self.finished(model, op, code, ("fail", request_id), state)

    def finished(
        self,
        model: Model,
        op: pb.Operation | None,
        code: grpc.StatusCode,
        by: tuple[str, str],
        state: int,
    ) -> None:
        if model.deleted:
            assert code == NOT_FOUND, code
        elif model.terminal:
            if model.finished_by == by:
                assert code == OK, f"repeating the call that ended it must succeed: {code}"
                assert op is not None
                self.unchanged(model, op)
            else:
                assert code == FAILED_PRECONDITION, code
        else:
            assert code == OK and op is not None, code
            model.state = state
            model.finished_by = by
            self.advance(model, op.revision)
            self.check(model, op)

    @has_operations
    @rule(data=st.data(), reason=st.sampled_from(["user", "budget"]))
    def cancel(self, data: st.DataObject, reason: str) -> None:
        model = self.pick(data)
        operation_id = model.id
        request = pb.CancelOperationRequest(operation_id=operation_id, reason=reason)
        op, code = call(self.stub.CancelOperation, request)
        if model.deleted:
            assert code == NOT_FOUND, code
        elif model.state in (SUCCEEDED, FAILED):
            assert code == FAILED_PRECONDITION, code
        elif model.state == CANCELLED or model.cancel_requested:
            assert code == OK, code
            self.unchanged(model, op)  # cancelling again is a no-op
        else:
            assert code == OK, code
            model.cancel_requested = True
            model.cancel_reason = reason
            if model.state == QUEUED:
                model.state = CANCELLED  # nobody to acknowledge: cancelled at once
                model.finished_by = ("cancel", "")
            self.advance(model, op.revision)
            self.check(model, op)

    @has_operations
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        model = self.pick(data)
        operation_id = model.id
        request = pb.DeleteOperationRequest(operation_id=operation_id)
        _, code = call(self.stub.DeleteOperation, request)
        if model.deleted:
            assert code == NOT_FOUND, code
        else:
            assert code == OK, code
            model.deleted = True

    @has_operations
    @rule(data=st.data())
    def get_one(self, data: st.DataObject) -> None:
        model = self.pick(data)
        operation_id = model.id
        op, code = self.get(operation_id)
        if model.deleted:
            assert code == NOT_FOUND, code
        else:
            assert code == OK and op is not None, code
            self.check(model, op)

    @invariant()
    def server_matches_model(self) -> None:
        """Every active operation, and whatever the step called (a rejected call changes
        nothing), is what the model says; deleted ones stay NOT_FOUND."""
        for model in self.models.values():
            if model.deleted or model.terminal:
                if model.id not in self.touched:
                    continue
            op, code = self.get(model.id)
            if model.deleted:
                assert code == NOT_FOUND, code
            else:
                assert code == OK and op is not None, code
                self.check(model, op)
        self.touched.clear()


def test_lifecycle_matches_model(grpc_stub: pb_grpc.ProgressTrackerStub) -> None:
    LifecycleMachine.stub = grpc_stub
    run_state_machine_as_test(
        LifecycleMachine,
        settings=settings(
            max_examples=50,
            stateful_step_count=25,
            deadline=None,
            database=None,
            # Shrinking replays many runs against the live server; a failure is
            # reported unshrunk (every step is printed) so the test stays bounded.
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
