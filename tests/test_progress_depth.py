"""Issue 4 end to end through the stubs: logs, timeline, roll-up, alerts, ETA, stats."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from headway.v1 import progress_pb2 as pb

Level = pb.LogEntry


def start(stub: Any, **fields: Any) -> pb.Operation:
    op: pb.Operation = stub.StartOperation(pb.StartOperationRequest(**fields), timeout=5)
    return op


def report(stub: Any, op_id: str, **fields: Any) -> pb.UpdateOperationResponse:
    request = pb.UpdateOperationRequest(operation_id=op_id, **fields)
    response: pb.UpdateOperationResponse = stub.UpdateOperation(request, timeout=5)
    return response


def get(stub: Any, op_id: str) -> pb.Operation:
    op: pb.Operation = stub.GetOperation(pb.GetOperationRequest(operation_id=op_id), timeout=5)
    return op


def timeline_types(stub: Any, op_id: str) -> list[str]:
    response = stub.GetTimeline(pb.GetTimelineRequest(operation_id=op_id), timeout=5)
    return [pb.TimelineEntry.Type.Name(e.type) for e in response.entries]


def test_logs_count_errors_exactly_and_filter_by_level_and_stage(grpc_stub):
    op = start(grpc_stub, kind="index", project="logs", stages=[pb.StageSpec(name="parse")])
    report(grpc_stub, op.id, sequence=1, stage="parse")
    entries = [
        pb.LogEntry(level=Level.INFO, message="parsed a.py", stage="parse", item="a.py"),
        pb.LogEntry(level=Level.WARNING, message="slow file", stage="parse", item="b.py"),
        pb.LogEntry(
            level=Level.ERROR,
            message="syntax error",
            stage="parse",
            item="c.py",
            code="E_SYNTAX",
            recoverable=True,
        ),
        pb.LogEntry(level=Level.ERROR, message="timeout", stage="embed", code="E_TIMEOUT"),
    ]
    reply = grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id=op.id, entries=entries))
    assert (reply.error_count, reply.warning_count, reply.dropped) == (2, 1, 0)
    stored = get(grpc_stub, op.id)
    assert (stored.error_count, stored.warning_count) == (2, 1)
    warnings_up = grpc_stub.ListLogs(
        pb.ListLogsRequest(operation_id=op.id, min_level=Level.WARNING)
    )
    assert [e.message for e in warnings_up.entries] == ["slow file", "syntax error", "timeout"]
    in_parse = grpc_stub.ListLogs(
        pb.ListLogsRequest(operation_id=op.id, stage="parse", min_level=Level.ERROR)
    )
    [error] = in_parse.entries
    assert (error.item, error.code, error.recoverable) == ("c.py", "E_SYNTAX", True)
    assert error.time.seconds > 0 and error.index == 3
    assert timeline_types(grpc_stub, op.id).count("ERROR") == 2


def test_logs_page_and_report_what_the_bounded_buffer_dropped(grpc_stub):
    op = start(grpc_stub, kind="crawl", project="logs")
    for batch in range(3):
        entries = [pb.LogEntry(message=f"page {batch * 500 + i}") for i in range(500)]
        reply = grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id=op.id, entries=entries))
    assert reply.dropped == 500  # the buffer keeps the newest 1000
    seen: list[str] = []
    token = ""
    while True:
        page = grpc_stub.ListLogs(
            pb.ListLogsRequest(operation_id=op.id, page_size=300, page_token=token)
        )
        seen.extend(e.message for e in page.entries)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"page {i}" for i in range(500, 1500)]
    assert page.dropped == 500


def test_too_many_log_entries_or_bad_fields_are_rejected_and_change_nothing(grpc_stub):
    op = start(grpc_stub, kind="k", project="logs")
    too_many = [pb.LogEntry(message="x")] * 1001
    with pytest.raises(grpc.RpcError) as info:
        grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id=op.id, entries=too_many))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entries" in str(info.value.details())
    big = pb.LogEntry(level=Level.ERROR, message="x" * 5000)
    with pytest.raises(grpc.RpcError) as info:
        grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id=op.id, entries=[big]))
    assert "entries[0].message" in str(info.value.details())
    assert get(grpc_stub, op.id).error_count == 0
    with pytest.raises(grpc.RpcError) as info:
        grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id="nope", entries=[]))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_timeline_records_the_life_of_an_operation_with_revisions(grpc_stub):
    op = start(
        grpc_stub,
        kind="ingest",
        project="tl",
        stages=[pb.StageSpec(name="clone"), pb.StageSpec(name="index")],
    )
    report(grpc_stub, op.id, sequence=1, stage="clone")
    report(grpc_stub, op.id, sequence=2, paused=True, pause_reason="rate limited")
    report(grpc_stub, op.id, sequence=3, paused=False, stage="index")
    grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=op.id, reason="user"))
    grpc_stub.FailOperation(
        pb.FailOperationRequest(
            operation_id=op.id, error=pb.OperationError(code="CANCELLED", message="stopped")
        )
    )
    response = grpc_stub.GetTimeline(pb.GetTimelineRequest(operation_id=op.id))
    types = [pb.TimelineEntry.Type.Name(e.type) for e in response.entries]
    assert types == [
        "STARTED",
        "STAGE_STARTED",
        "RUNNING",
        "PAUSED",
        "STAGE_STARTED",
        "RESUMED",
        "CANCEL_REQUESTED",
        "CANCELLED",
    ]
    revisions = [e.revision for e in response.entries]
    assert revisions == sorted(revisions)
    assert response.entries[3].message == "rate limited"


def test_stage_history_has_duration_and_rate(grpc_stub):
    op = start(
        grpc_stub,
        kind="k",
        project="stages",
        stages=[pb.StageSpec(name="a"), pb.StageSpec(name="b")],
    )
    report(grpc_stub, op.id, sequence=1, stage="a", stage_total=10)
    time.sleep(0.2)
    report(grpc_stub, op.id, sequence=2, stage_completed=10)
    report(grpc_stub, op.id, sequence=3, stage="b")
    a = get(grpc_stub, op.id).stages[0]
    duration = a.duration.ToNanoseconds() / 1e9
    assert a.state == pb.Stage.DONE and duration >= 0.2
    assert a.rate == pytest.approx(10 / duration)


def test_parent_rolls_up_children_and_cancels_them(grpc_stub):
    parent = start(grpc_stub, kind="batch", project="rollup")
    small = start(grpc_stub, kind="file", project="rollup", parent_id=parent.id, total=100)
    large = start(grpc_stub, kind="file", project="rollup", parent_id=parent.id, total=300)
    report(grpc_stub, small.id, sequence=1, completed=100)
    report(grpc_stub, large.id, sequence=1, completed=150)
    rolled = get(grpc_stub, parent.id)
    assert rolled.children.total == 2
    assert dict(rolled.children.by_state) == {"RUNNING": 2}
    # Weighted by totals: (100% * 100 + 50% * 300) / 400.
    assert rolled.percent == pytest.approx(62.5)
    listed = grpc_stub.ListOperations(
        pb.ListOperationsRequest(filter=pb.OperationFilter(parent_id=parent.id))
    )
    assert {o.id for o in listed.operations} == {small.id, large.id}
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=small.id))
    report(grpc_stub, parent.id, sequence=1, message="working")  # the parent runs too
    grpc_stub.CancelOperation(pb.CancelOperationRequest(operation_id=parent.id, reason="stop"))
    assert get(grpc_stub, large.id).cancel_requested
    assert get(grpc_stub, small.id).state == pb.Operation.SUCCEEDED
    assert dict(get(grpc_stub, parent.id).children.by_state) == {"RUNNING": 1, "SUCCEEDED": 1}


def test_nesting_is_limited(grpc_stub):
    parent = start(grpc_stub, kind="n", project="nest")
    for _ in range(8):
        parent = start(grpc_stub, kind="n", project="nest", parent_id=parent.id)
    with pytest.raises(grpc.RpcError) as info:
        start(grpc_stub, kind="n", project="nest", parent_id=parent.id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parent_id" in str(info.value.details())


def test_running_operation_gets_throughput_and_an_eta(grpc_stub):
    op = start(grpc_stub, kind="steady", project="eta", total=100, unit="rows")
    for i in range(1, 11):
        report(grpc_stub, op.id, sequence=i, completed=i * 5)
        time.sleep(0.05)
    stored = get(grpc_stub, op.id)
    assert stored.throughput > 0 and stored.throughput_unit == "rows"
    assert stored.HasField("eta") and stored.eta.ToNanoseconds() > 0
    assert stored.HasField("estimated_completion_time")
    assert 0 <= stored.eta_confidence <= 1


def test_high_error_rate_alert_is_raised_and_seen_by_watchers(grpc_stub, record):
    op = start(grpc_stub, kind="upload", project="alerts", total=100)
    report(grpc_stub, op.id, sequence=1, completed=10)
    stream = record(grpc_stub.WatchOperation(pb.WatchOperationRequest(operation_id=op.id)))
    assert stream.next().type == pb.OperationEvent.SNAPSHOT
    errors = [pb.LogEntry(level=Level.ERROR, message=f"e{i}") for i in range(6)]
    grpc_stub.ReportLogs(pb.ReportLogsRequest(operation_id=op.id, entries=errors))
    event = stream.next()
    assert [pb.Alert.Type.Name(a.type) for a in event.operation.alerts] == ["HIGH_ERROR_RATE"]
    assert "ALERT_RAISED" in timeline_types(grpc_stub, op.id)


def test_stalled_alert_comes_and_goes_with_the_lease(server_factory):
    from headway.v1 import progress_pb2_grpc as pb_grpc

    server = server_factory(sweep_interval=0.05)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        op = start(
            stub,
            kind="k",
            project="stall",
            heartbeat_timeout=duration_pb2.Duration(nanos=200_000_000),
        )
        report(stub, op.id, sequence=1)
        deadline = time.monotonic() + 5
        while not get(stub, op.id).alerts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pb.Alert.Type.Name(a.type) for a in get(stub, op.id).alerts] == ["STALLED"]
        report(stub, op.id, sequence=2)
        assert not get(stub, op.id).alerts
        types = timeline_types(stub, op.id)
        assert types.index("STALLED") < types.index("RECOVERED")


def test_stats_by_kind_and_stage_survive_retention(server_factory):
    from headway.v1 import progress_pb2_grpc as pb_grpc

    server = server_factory(retention=0.2, sweep_interval=0.05)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        for i in range(4):
            op = start(
                stub,
                kind="ingest",
                project="stats",
                total=10,
                stages=[pb.StageSpec(name="fetch"), pb.StageSpec(name="store")],
            )
            report(stub, op.id, sequence=1, stage="fetch", stage_total=10, completed=5)
            report(stub, op.id, sequence=2, stage_completed=10)
            report(stub, op.id, sequence=3, stage="store", completed=10)
            if i < 3:
                stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
            else:
                stub.FailOperation(
                    pb.FailOperationRequest(operation_id=op.id, error=pb.OperationError(code="E"))
                )
        running = start(stub, kind="ingest", project="stats")
        report(stub, running.id, sequence=1)
        time.sleep(0.6)  # the finished ones are removed by retention
        listed = stub.ListOperations(
            pb.ListOperationsRequest(filter=pb.OperationFilter(project="stats"))
        )
        assert [o.id for o in listed.operations] == [running.id]
        stats = stub.GetStats(pb.GetStatsRequest(filter=pb.OperationFilter(project="stats")))
    assert {k: v for k, v in stats.counts_by_state.items() if v} == {"RUNNING": 1}
    assert stats.counts_by_state["SUCCEEDED"] == 0  # finished ones come from the summaries
    assert (stats.active, stats.finished) == (1, 4)
    assert stats.success_rate == pytest.approx(0.75)
    [kind] = stats.kinds
    assert (kind.kind, kind.finished, kind.succeeded) == ("ingest", 4, 3)
    assert kind.duration.count == 4 and kind.duration.p50 >= 0
    assert [s.name for s in kind.stages] == ["fetch", "store"]
    assert kind.stages[0].duration.count == 4
