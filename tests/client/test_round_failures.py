"""A round's calls after one that failed whole: never applied ahead of it.

One handle's reports can straddle two BatchUpdateOperations calls of a round.
Had the second been applied while the first failed (say RESOURCE_EXHAUSTED),
the first's reports, resent, would come back as duplicates (their sequence is
below the operation's last) and their counter deltas would be lost.
"""

from __future__ import annotations

import grpc
from headway.v1 import progress_pb2 as pb
from headway_client._errors import error_for
from headway_client._producer import CallKind, HandleState, ReportScheduler


def test_a_failed_batch_call_holds_back_the_rest_of_its_round() -> None:
    scheduler = ReportScheduler("test")
    states = []
    for i in range(20):
        state = HandleState(
            pb.Operation(id=f"op-{i}"),
            pb.StartOperationRequest(),
            registered=True,
            min_interval=0.1,
            raise_on_cancel=False,
            direct=False,
            strict=False,
        )
        scheduler.register(state)
        states.append(state)
    # 52 stage segments each: 1,040 reports, op-19's straddling the 1,000 limit.
    for state in states:
        for k in range(52):
            state.update(
                stage=f"s{k}",
                counters={"c": 1},
                completed=None,
                total=None,
                stage_completed=None,
                stage_total=None,
                percent=None,
                message=None,
                details=None,
                checkpoint=None,
                paused=None,
                pause_reason=None,
            )
    # A server applying reports as UpdateOperation would (sequence idempotency).
    last: dict[str, int] = {}
    counted: dict[str, int] = {}
    calls = 0
    now = 100.0
    for _ in range(10):
        step = scheduler.next_step(now)
        if step.batch is not None:
            round_ = scheduler.begin_round(step.batch)
            while (call := round_.next_call()) is not None:
                assert call.kind is CallKind.REPORTS
                calls += 1
                if calls == 1:
                    round_.record(error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "too large"))
                    continue
                acks = []
                for report in call.reports:
                    applied = report.sequence > last.get(report.operation_id, 0)
                    if applied:
                        last[report.operation_id] = report.sequence
                        counted[report.operation_id] = (
                            counted.get(report.operation_id, 0) + report.counters["c"]
                        )
                    acks.append(
                        pb.ReportProgressResponse(
                            sequence=report.sequence,
                            operation_id=report.operation_id,
                            result=pb.UpdateOperationResponse(applied=applied),
                        )
                    )
                round_.record(acks)
            scheduler.settle(round_, now)
        now += 10
    assert counted == {state.id: 52 for state in states}
    assert not any(state.pending for state in states)
