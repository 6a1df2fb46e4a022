"""Alerts: conditions worth a person's attention, raised and cleared as operations change."""

from __future__ import annotations

from dataclasses import dataclass

from headway_server.domain import measures
from headway_server.domain.model import Alert, AlertType, Operation, State


@dataclass(frozen=True, slots=True)
class AlertThresholds:
    # SLOW: throughput below this fraction of the kind's typical throughput or
    # of the operation's own peak rate.
    slow_fraction: float = 0.5
    # HIGH_ERROR_RATE: errors per completed unit above this, once there are
    # at least `min_errors` errors (a single early error is not a rate).
    error_rate: float = 0.1
    min_errors: int = 5
    # ETA_SLIPPING: the estimated completion moved later by more than this many
    # seconds within `eta_slip_window` seconds.
    eta_slip_seconds: float = 60.0
    eta_slip_window: float = 300.0


def track_eta_baseline(op: Operation, now: float, window: float) -> tuple[float, float] | None:
    """The (time, completion) later estimates are compared against; renewed each window."""
    estimate = op.estimate
    if estimate.eta is None or estimate.confidence < 0.2:
        return op.eta_baseline
    completion = estimate.at + estimate.eta
    baseline = op.eta_baseline
    if baseline is None or now - baseline[0] > window or completion < baseline[1]:
        return (now, completion)
    return baseline


def evaluate(
    op: Operation,
    now: float,
    thresholds: AlertThresholds,
    *,
    typical_throughput: float | None = None,
) -> tuple[Alert, ...]:
    """The alerts active for `op` now, keeping `since` of those already raised."""
    if op.state.terminal:
        return ()
    found: dict[AlertType, str] = {}
    if op.stalled:
        found[AlertType.STALLED] = (
            f"no report for {now - op.last_report_at:.0f}s "
            f"(heartbeat timeout {op.heartbeat_timeout:g}s)"
        )
    estimate = op.estimate
    if op.state is State.RUNNING and estimate.throughput > 0 and not estimate.per_percent:
        unit = op.unit or "units"
        if (
            typical_throughput
            and estimate.throughput < thresholds.slow_fraction * typical_throughput
        ):
            found[AlertType.SLOW] = (
                f"{estimate.throughput:.3g} {unit}/s, below {thresholds.slow_fraction:g}x the "
                f"typical {typical_throughput:.3g} {unit}/s for {op.kind or 'this kind'}"
            )
        elif op.peak_throughput and estimate.throughput < (
            thresholds.slow_fraction * op.peak_throughput
        ):
            found[AlertType.SLOW] = (
                f"{estimate.throughput:.3g} {unit}/s, below {thresholds.slow_fraction:g}x its "
                f"earlier {op.peak_throughput:.3g} {unit}/s"
            )
    if op.error_count >= thresholds.min_errors:
        rate = op.error_count / max(op.completed, 1)
        if rate > thresholds.error_rate:
            found[AlertType.HIGH_ERROR_RATE] = (
                f"{op.error_count} errors for {op.completed} units ({rate:.2g} per unit)"
            )
    if op.eta_baseline is not None and estimate.eta is not None and estimate.confidence >= 0.2:
        slip = estimate.at + estimate.eta - op.eta_baseline[1]
        if slip > thresholds.eta_slip_seconds:
            found[AlertType.ETA_SLIPPING] = (
                f"estimated completion moved {slip:.0f}s later since "
                f"{now - op.eta_baseline[0]:.0f}s ago"
            )
    # Most operations have no alert rules: no call for them (every report passes here).
    crossed = (
        measures.threshold_alerts(op.spec.alert_rules, op.combined_measures, op.alerts, now)
        if op.spec.alert_rules
        else None
    )
    if not found and not crossed:
        return ()
    since = {alert.type: alert.since for alert in op.alerts}
    raised = [Alert(kind, message, since.get(kind, now)) for kind, message in sorted(found.items())]
    # MEASURE_THRESHOLD is the highest type, so these stay in type order.
    return (*raised, *crossed) if crossed else tuple(raised)
