"""A parent's roll-up of its children: summary, weighted percent, ETA of the last to end."""

from __future__ import annotations

import dataclasses

import pytest
from headway_server.domain import eta, lifecycle, progress
from headway_server.domain.model import (
    ChildProgress,
    Estimate,
    Operation,
    StartSpec,
    State,
    Update,
    evolve,
)


def child(op_id: str, total: int, completed: int, eta: float | None) -> Operation:
    op = lifecycle.new_operation(op_id, StartSpec(parent_id="parent", total=total), 0.0)
    op = lifecycle.apply_update(op, Update(sequence=1, completed=completed), 10.0)
    return dataclasses.replace(op, estimate=Estimate(eta=eta, confidence=0.6, at=10.0))


def test_parent_takes_weighted_percent_and_the_latest_child_eta():
    parent = lifecycle.new_operation("parent", StartSpec(), 0.0)
    children = [child("a", 100, 100, 0.0), child("b", 300, 150, 50.0), child("c", 0, 0, 20.0)]
    rolled = progress.roll_up(parent, [ChildProgress.of(c) for c in children], now=20.0)
    assert rolled is not None
    assert dict(rolled.children) == {"RUNNING": 3}
    # c has no total: it weighs the average known total, 200.
    assert rolled.percent == pytest.approx((100 * 100 + 50 * 300 + 0 * 200) / 600)
    assert rolled.estimate.eta == pytest.approx(40.0)  # b ends at 60, 40 s after now
    assert rolled.estimate.confidence == pytest.approx(0.6)
    assert (
        progress.roll_up(rolled, [ChildProgress.of(c) for c in children], now=20.0) is None
    )  # nothing changed


def test_parent_with_its_own_units_only_counts_children():
    parent = lifecycle.new_operation("parent", StartSpec(total=10), 0.0)
    rolled = progress.roll_up(parent, [ChildProgress.of(child("a", 100, 50, 5.0))], now=20.0)
    assert rolled is not None
    assert rolled.percent == 0.0 and rolled.children_percent is None
    assert dict(rolled.children) == {"RUNNING": 1}


def test_finished_children_leave_a_finished_estimate():
    parent = lifecycle.new_operation("parent", StartSpec(), 0.0)
    done = lifecycle.finish(
        child("a", 10, 10, 0.0), State.SUCCEEDED, 30.0, call="CompleteOperation", request_id=""
    )
    rolled = progress.roll_up(parent, [ChildProgress.of(done)], now=30.0)
    assert rolled is not None
    assert rolled.percent == 100.0
    assert (rolled.estimate.eta, rolled.estimate.confidence) == (0.0, 1.0)


def test_an_eta_beyond_ten_years_is_reported_unknown():
    from headway_server.domain import alerts

    thresholds = alerts.AlertThresholds()
    op = lifecycle.new_operation("slow", StartSpec(total=10**12), 0.0)

    def observe(op: Operation, t: float) -> Operation:
        return progress.refresh_built(op, t, thresholds, reported=True)

    op = observe(lifecycle.apply_update(op, Update(sequence=1), 1.0), 1.0)
    for i in range(2, 12):
        t = float(i * 10)
        op = observe(lifecycle.apply_update(op, Update(sequence=i, completed=i), t), t)
    raw = eta.estimate(op.eta_state, op, 120.0)
    assert raw.eta is not None and raw.eta > progress.MAX_ETA  # what the clamp is for
    refreshed = progress.refresh_built(evolve(op), 120.0, thresholds)
    assert refreshed.estimate.eta is None
