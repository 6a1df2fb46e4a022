"""Alert rules on domain values: SLOW, HIGH_ERROR_RATE, ETA_SLIPPING, STALLED."""

from __future__ import annotations

import dataclasses

from headway_server.domain import alerts, lifecycle
from headway_server.domain.model import AlertType, Estimate, Operation, StartSpec, State, Update

T = alerts.AlertThresholds()


def running(**changes: object) -> Operation:
    op = lifecycle.new_operation("op-1", StartSpec(kind="upload", total=1000, unit="files"), 0.0)
    op = lifecycle.apply_update(op, Update(sequence=1, completed=100), 10.0)
    return dataclasses.replace(op, **changes)  # type: ignore[arg-type]


def types(found: tuple[object, ...]) -> list[AlertType]:
    return [a.type for a in found]  # type: ignore[attr-defined]


def test_slow_against_the_kinds_typical_throughput():
    op = running(estimate=Estimate(throughput=2.0, eta=100, confidence=0.8, at=10))
    assert types(alerts.evaluate(op, 10, T, typical_throughput=10.0)) == [AlertType.SLOW]
    assert alerts.evaluate(op, 10, T, typical_throughput=3.0) == ()


def test_slow_against_its_own_earlier_peak():
    op = running(estimate=Estimate(throughput=2.0, at=10), peak_throughput=5.0)
    [alert] = alerts.evaluate(op, 10, T)
    assert alert.type is AlertType.SLOW and "earlier" in alert.message


def test_high_error_rate_needs_enough_errors_and_a_high_rate():
    assert alerts.evaluate(running(error_count=4), 10, T) == ()  # too few to be a rate
    assert types(alerts.evaluate(running(error_count=11), 10, T)) == [AlertType.HIGH_ERROR_RATE]
    assert alerts.evaluate(running(error_count=9), 10, T) == ()  # 9 per 100 units


def test_eta_slipping_when_the_estimated_end_moves_later():
    op = running(estimate=Estimate(eta=100, confidence=0.8, at=10), eta_baseline=(0.0, 110.0))
    assert alerts.evaluate(op, 10, T) == ()
    later = dataclasses.replace(op, estimate=Estimate(eta=200, confidence=0.8, at=20))
    assert types(alerts.evaluate(later, 20, T)) == [AlertType.ETA_SLIPPING]


def test_baseline_renews_after_the_window_and_when_the_end_moves_earlier():
    op = running(estimate=Estimate(eta=100, confidence=0.8, at=10), eta_baseline=(0.0, 500.0))
    assert alerts.track_eta_baseline(op, 10, 300) == (10, 110)  # earlier end: new baseline
    kept = dataclasses.replace(op, eta_baseline=(0.0, 50.0))
    assert alerts.track_eta_baseline(kept, 10, 300) == (0.0, 50.0)
    assert alerts.track_eta_baseline(kept, 400, 300) == (400, 110)


def test_alerts_keep_their_since_and_end_with_the_operation():
    op = running(stalled=True, last_report_at=10.0, spec=StartSpec(heartbeat_timeout=5))
    [first] = alerts.evaluate(op, 20, T)
    assert (first.type, first.since) == (AlertType.STALLED, 20)
    [again] = alerts.evaluate(dataclasses.replace(op, alerts=(first,)), 30, T)
    assert again.since == 20
    ended = lifecycle.finish(op, State.FAILED, 40, call="FailOperation", request_id="")
    assert alerts.evaluate(ended, 40, T) == ()
