"""Measures through the Python client: `measures={...}` on update and advance."""

from __future__ import annotations

import math

import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import AsyncHeadwayClient, HeadwayClient, InvalidArgument
from headway_client._reports import PendingReports


def test_measures_on_advance_and_update_reach_the_server_latest_value_wins(grpc_server):
    with HeadwayClient(grpc_server.address, timeout=5) as client:
        with client.start(kind="docs", project="client-measures", total=100) as op:
            for i in range(100):
                op.advance(1, measures={"cost_usd": 0.01 * (i + 1)})
            op.update(measures={"quality": 0.93})
            assert op.flush()
            assert op.rpcs < 20  # coalesced like every absolute value
        stored = client.get(op.id)
    assert stored.state == pb.Operation.SUCCEEDED
    assert dict(stored.measures) == pytest.approx({"cost_usd": 1.0, "quality": 0.93})


async def test_async_client_reports_measures(grpc_server):
    async with AsyncHeadwayClient(grpc_server.address, timeout=5) as client:
        async with await client.start(kind="docs", project="client-measures-aio") as op:
            op.update(measures={"tokens": 48210})
            op.advance(0, measures={"tokens": 50000, "quality": 0.5})
            await op.flush()
        stored = await client.get(op.id)
    assert dict(stored.measures) == {"tokens": 50000, "quality": 0.5}


def test_a_non_finite_measure_raises_at_once_even_offline():
    with HeadwayClient("127.0.0.1:1", timeout=0.2, finish_timeout=0.2) as client:
        op = client.start(kind="docs", project="offline")
        with pytest.raises(InvalidArgument, match="quality"):
            op.update(measures={"quality": math.nan})
        op.fail(RuntimeError("done"))


def test_pending_reports_keep_the_latest_measures_across_merged_stages():
    pending = PendingReports("op-1")
    for i in range(200):
        pending.add(stage=f"s{i}", measures={"cost": float(i), f"m{i % 3}": 1.0})
    requests = pending.take()
    assert requests[-1].measures["cost"] == 199.0
    merged = requests[0]  # the oldest segments merged into one
    assert set(merged.measures) >= {"cost"}


def test_start_declares_measures_and_alert_rules(grpc_server):
    with HeadwayClient(grpc_server.address, timeout=5) as client:
        parent = client.start(
            kind="batch",
            project="client-declared",
            measures={"cost_usd": "sum", "quality": "MEAN"},
            alert_rules={"quality": {"below": 0.8}, "cost_usd": {"above": 50}},
        )
        children = [
            client.start(kind="doc", project="client-declared", parent_id=parent.id)
            for _ in range(2)
        ]
        for child, (cost, quality) in zip(children, [(1.5, 0.9), (2.5, 0.5)], strict=True):
            child.update(measures={"cost_usd": cost, "quality": quality})
            assert child.flush()
        rolled = client.get(parent.id)
        assert dict(rolled.measures) == pytest.approx({"cost_usd": 4.0, "quality": 0.7})
        alerts = [(a.type, a.measure) for a in rolled.alerts]
        assert alerts == [(pb.Alert.MEASURE_THRESHOLD, "quality")]
        assert [(m.name, m.aggregation) for m in rolled.measure_specs] == [
            ("cost_usd", pb.MeasureSpec.SUM),
            ("quality", pb.MeasureSpec.MEAN),
        ]
        for bad in ({"measures": {"x": "median"}}, {"alert_rules": {"x": {"under": 1.0}}}):
            with pytest.raises(InvalidArgument):
                client.start(kind="doc", project="client-declared", **bad)
        for op in (*children, parent):
            op.complete()
