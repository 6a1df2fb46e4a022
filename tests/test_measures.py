"""Issue 14 end to end through the stubs: measures, their roll-up, statistics and
threshold alerts."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

Agg = pb.MeasureSpec
# Not an Aggregation value: what an old or buggy client could send.
BAD: Any = 9


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


def timeline(stub: Any, op_id: str) -> list[tuple[str, str]]:
    response = stub.GetTimeline(pb.GetTimelineRequest(operation_id=op_id), timeout=5)
    return [(pb.TimelineEntry.Type.Name(e.type), e.message) for e in response.entries]


def measure_alerts(op: pb.Operation) -> list[tuple[str, float]]:
    return [(a.measure, a.value) for a in op.alerts if a.type == pb.Alert.MEASURE_THRESHOLD]


def test_measures_are_absolute_and_a_retry_changes_nothing(grpc_stub):
    op = start(
        grpc_stub,
        kind="doc",
        project="measures",
        measures=[pb.MeasureSpec(name="cost_usd", aggregation=Agg.SUM)],
    )
    assert [(m.name, m.aggregation) for m in op.measure_specs] == [("cost_usd", Agg.SUM)]
    report(grpc_stub, op.id, sequence=1, measures={"quality": 0.93, "cost_usd": 1.25})
    # Only the measures given change; the others keep their value.
    report(grpc_stub, op.id, sequence=2, measures={"cost_usd": 1.5}, message="more")
    retried = report(grpc_stub, op.id, sequence=2, measures={"cost_usd": 1.5})
    late = report(grpc_stub, op.id, sequence=1, measures={"quality": 0.1, "cost_usd": 1.25})
    assert not retried.applied and not late.applied
    assert dict(get(grpc_stub, op.id).measures) == {"quality": 0.93, "cost_usd": 1.5}


def test_measures_on_report_progress_and_batches(grpc_stub):
    a = start(grpc_stub, kind="doc", project="measures-stream")
    b = start(grpc_stub, kind="doc", project="measures-stream")
    acks = list(
        grpc_stub.ReportProgress(
            iter(
                [
                    pb.UpdateOperationRequest(operation_id=a.id, sequence=1, measures={"q": 0.5}),
                    pb.UpdateOperationRequest(operation_id=a.id, sequence=2, measures={"q": 0.7}),
                    pb.UpdateOperationRequest(operation_id=a.id, sequence=2, measures={"q": 0.1}),
                ]
            ),
            timeout=5,
        )
    )
    assert [ack.result.applied for ack in acks] == [True, True, False]
    batch = grpc_stub.BatchUpdateOperations(
        pb.BatchUpdateOperationsRequest(
            updates=[
                pb.UpdateOperationRequest(operation_id=b.id, sequence=1, measures={"tokens": 10}),
                pb.UpdateOperationRequest(
                    operation_id=b.id, sequence=2, measures={"tokens": float("nan")}
                ),
                pb.UpdateOperationRequest(operation_id=a.id, sequence=3, measures={"tokens": 7}),
            ]
        ),
        timeout=5,
    )
    codes = [r.error_code for r in batch.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "measures['tokens']" in batch.results[1].error_message
    assert dict(get(grpc_stub, a.id).measures) == {"q": 0.7, "tokens": 7}
    assert dict(get(grpc_stub, b.id).measures) == {"tokens": 10}


@pytest.mark.parametrize(
    ("measures", "field"),
    [
        ({"quality": float("inf")}, "measures['quality']"),
        ({"": 1.0}, "measures['']"),
        ({"x" * 64: 1.0}, "measures['" + "x" * 64 + "']"),
        ({f"m{i}": 1.0 for i in range(33)}, "measures"),
    ],
)
def test_bad_measures_are_rejected_naming_the_field(grpc_stub, measures, field):
    op = start(grpc_stub, kind="doc", project="measures-bad")
    with pytest.raises(grpc.RpcError) as info:
        report(grpc_stub, op.id, sequence=1, measures=measures)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(info.value.details())
    assert not get(grpc_stub, op.id).measures


def test_more_than_the_limit_of_names_over_several_reports_is_rejected(grpc_stub):
    op = start(grpc_stub, kind="doc", project="measures-bad")
    report(grpc_stub, op.id, sequence=1, measures={f"a{i}": 1.0 for i in range(20)})
    with pytest.raises(grpc.RpcError) as info:
        report(grpc_stub, op.id, sequence=2, measures={f"b{i}": 1.0 for i in range(20)})
    assert "measures" in str(info.value.details())
    assert len(get(grpc_stub, op.id).measures) == 20


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"measures": [pb.MeasureSpec(name="q"), pb.MeasureSpec(name="q")]}, "measures[1].name"),
        ({"measures": [pb.MeasureSpec(name="")]}, "measures[0].name"),
        ({"measures": [pb.MeasureSpec(name="q", aggregation=BAD)]}, "measures[0].aggregation"),
        ({"alert_rules": [pb.AlertRule(measure="q")]}, "alert_rules[0]"),
        (
            {"alert_rules": [pb.AlertRule(measure="q", below=float("nan"))]},
            "alert_rules[0].below",
        ),
        ({"alert_rules": [pb.AlertRule(measure="", above=1)]}, "alert_rules[0].measure"),
    ],
)
def test_bad_measure_declarations_are_rejected_naming_the_field(grpc_stub, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        start(grpc_stub, kind="doc", project="measures-bad", **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(info.value.details())


def test_a_retried_start_must_declare_the_same_measures(grpc_stub):
    fields = {
        "operation_id": "op-measures-retry",
        "kind": "doc",
        "measures": [pb.MeasureSpec(name="cost", aggregation=Agg.SUM)],
        "alert_rules": [pb.AlertRule(measure="cost", above=5)],
    }
    first = start(grpc_stub, **fields)
    assert start(grpc_stub, **fields).id == first.id
    with pytest.raises(grpc.RpcError) as info:
        start(grpc_stub, **{**fields, "alert_rules": [pb.AlertRule(measure="cost", above=6)]})
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_parent_combines_children_by_each_measures_rule(grpc_stub):
    parent = start(
        grpc_stub,
        kind="batch",
        project="measures-rollup",
        measures=[
            pb.MeasureSpec(name="cost_usd", aggregation=Agg.SUM),
            pb.MeasureSpec(name="quality", aggregation=Agg.MEAN),
        ],
    )
    files = [
        start(grpc_stub, kind="file", project="measures-rollup", parent_id=parent.id)
        for _ in range(3)
    ]
    for i, (quality, cost) in enumerate([(0.9, 1.0), (0.6, 2.5), (0.75, 0.5)]):
        report(
            grpc_stub,
            files[i].id,
            sequence=1,
            measures={"quality": quality, "cost_usd": cost, "stage_no": float(i)},
        )
    rolled = get(grpc_stub, parent.id)
    assert rolled.measures["cost_usd"] == pytest.approx(4.0)
    assert rolled.measures["quality"] == pytest.approx(0.75)
    # Not declared anywhere: LAST, the value of the child that changed last.
    assert rolled.measures["stage_no"] == 2.0
    # A finished child still counts (it is held packed), and a change rolls up.
    grpc_stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=files[0].id))
    report(grpc_stub, files[1].id, sequence=2, measures={"cost_usd": 3.5})
    assert get(grpc_stub, parent.id).measures["cost_usd"] == pytest.approx(5.0)
    # A measure the parent reports itself is its own.
    report(grpc_stub, parent.id, sequence=1, measures={"quality": 0.1})
    rolled = get(grpc_stub, parent.id)
    assert rolled.measures["quality"] == pytest.approx(0.1)
    assert rolled.measures["cost_usd"] == pytest.approx(5.0)
    # A deleted child no longer counts.
    grpc_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=files[2].id))
    assert get(grpc_stub, parent.id).measures["cost_usd"] == pytest.approx(4.5)


def test_threshold_alert_is_raised_seen_by_watchers_and_cleared(grpc_stub, record):
    op = start(
        grpc_stub,
        kind="doc",
        project="measures-alert",
        alert_rules=[
            pb.AlertRule(measure="quality", below=0.8),
            pb.AlertRule(measure="cost_usd", above=50),
        ],
    )
    assert [(r.measure, r.HasField("below"), r.below) for r in op.alert_rules] == [
        ("quality", True, 0.8),
        ("cost_usd", False, 0.0),
    ]
    report(grpc_stub, op.id, sequence=1, measures={"quality": 0.93, "cost_usd": 10})
    stream = record(
        grpc_stub.WatchOperation(
            pb.WatchOperationRequest(operation_id=op.id, min_interval=duration_pb2.Duration())
        )
    )
    assert not stream.next().operation.alerts
    report(grpc_stub, op.id, sequence=2, measures={"quality": 0.72, "cost_usd": 51.5})
    event = stream.next()
    assert measure_alerts(event.operation) == [("cost_usd", 51.5), ("quality", 0.72)]
    messages = [a.message for a in event.operation.alerts]
    assert any("quality" in m and "0.72" in m and "0.8" in m for m in messages)
    report(grpc_stub, op.id, sequence=3, measures={"quality": 0.85})
    assert measure_alerts(stream.next().operation) == [("cost_usd", 51.5)]
    entries = timeline(grpc_stub, op.id)
    raised = [m for t, m in entries if t == "ALERT_RAISED"]
    cleared = [m for t, m in entries if t == "ALERT_CLEARED"]
    assert len(raised) == 2 and all(m.startswith("MEASURE_THRESHOLD") for m in raised)
    assert cleared == ["MEASURE_THRESHOLD quality"]


def test_threshold_alert_on_a_parents_rolled_up_measure(grpc_stub):
    parent = start(
        grpc_stub,
        kind="batch",
        project="measures-alert",
        measures=[pb.MeasureSpec(name="cost_usd", aggregation=Agg.SUM)],
        alert_rules=[pb.AlertRule(measure="cost_usd", above=5)],
    )
    a = start(grpc_stub, kind="file", project="measures-alert", parent_id=parent.id)
    b = start(grpc_stub, kind="file", project="measures-alert", parent_id=parent.id)
    report(grpc_stub, a.id, sequence=1, measures={"cost_usd": 3})
    assert not get(grpc_stub, parent.id).alerts
    report(grpc_stub, b.id, sequence=1, measures={"cost_usd": 3})
    assert measure_alerts(get(grpc_stub, parent.id)) == [("cost_usd", 6.0)]
    grpc_stub.DeleteOperation(pb.DeleteOperationRequest(operation_id=b.id))
    assert not get(grpc_stub, parent.id).alerts


def test_stats_have_measure_percentiles_and_sum_totals_after_retention(server_factory):
    server = server_factory(retention=0.2, sweep_interval=0.05)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        for i in range(5):
            op = start(
                stub,
                kind="upload",
                project="measures-stats",
                measures=[pb.MeasureSpec(name="cost_usd", aggregation=Agg.SUM)],
            )
            report(stub, op.id, sequence=1, measures={"cost_usd": 1.0 + i, "quality": i / 4})
            stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op.id))
        time.sleep(0.6)  # removed by retention
        listed = stub.ListOperations(
            pb.ListOperationsRequest(filter=pb.OperationFilter(project="measures-stats"))
        )
        assert not listed.operations
        stats = stub.GetStats(
            pb.GetStatsRequest(filter=pb.OperationFilter(project="measures-stats"))
        )
    [kind] = stats.kinds
    by_name = {m.name: m for m in kind.measures}
    assert set(by_name) == {"cost_usd", "quality"}
    cost, quality = by_name["cost_usd"], by_name["quality"]
    assert (cost.aggregation, quality.aggregation) == (Agg.SUM, Agg.LAST)
    assert cost.total == pytest.approx(15.0) and quality.total == 0.0
    assert cost.values.count == 5 and cost.values.p50 == pytest.approx(3.0)
    assert quality.values.p90 == pytest.approx(0.9)
    assert quality.values.p99 == pytest.approx(0.99)


def test_alerts_raised_are_counted_in_metrics(server_factory):
    import urllib.request

    server = server_factory(metrics_listen="127.0.0.1:0")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        op = start(
            stub,
            kind="doc",
            project="measures-metrics",
            alert_rules=[
                pb.AlertRule(measure="quality", below=0.8),
                pb.AlertRule(measure="cost", above=1),
            ],
        )
        report(stub, op.id, sequence=1, measures={"quality": 0.5})
        report(stub, op.id, sequence=2, measures={"cost": 2})
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    assert 'headway_alerts_raised_total{type="MEASURE_THRESHOLD"} 2.0' in text
