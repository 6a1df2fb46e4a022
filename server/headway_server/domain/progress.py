"""Derived progress: ETA and throughput, alerts, and a parent's roll-up of its children.

Pure functions over Operation values, applied by the service inside the same
compare-and-set write as the change that caused them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from headway_server.domain import alerts, eta, measures
from headway_server.domain.model import (
    AlertType,
    ChildProgress,
    Estimate,
    Operation,
    State,
    amend,
    evolve,
)

# Children per parent and nesting depth; a roll-up reads every child of a
# parent, so both bound the cost of one child's report.
MAX_CHILDREN = 10_000
MAX_DEPTH = 8
# Ten years: beyond this an ETA is reported as unknown.
MAX_ETA = 10 * 365 * 86400.0


def refresh_built(
    op: Operation,
    now: float,
    thresholds: alerts.AlertThresholds,
    *,
    typical_throughput: float | None = None,
    reported: bool = False,
    history: eta.StageHistory | None = None,
) -> Operation:
    """Recomputes the estimate and the alerts that depend on it, on a value the
    caller has just built and not yet shared: sets the fields in place rather
    than copying the operation once more. `reported`: the
    value is what an applied report left, to feed to the ETA estimator first;
    `history`: earlier runs of the operation's kind (eta.StageHistory)."""
    estimate: Estimate | None = None
    if reported:
        state = op.eta_state if op.eta_state is not None else eta.EtaState()
        if op.has_own_progress:
            observed, estimate = eta.observe_and_estimate(state, op, now, history)
        else:
            observed = eta.observe(state, op, now)
        amend(op, eta_state=observed)
    elif op.eta_state is not None and op.has_own_progress:
        estimate = eta.estimate(op.eta_state, op, now, history)
    if estimate is None:
        estimate = op.estimate
    elif estimate.eta is not None and estimate.eta > MAX_ETA:
        # A crawl at this pace would outlast any useful answer (and the
        # protobuf Timestamp range): say "unknown" rather than a date.
        estimate = evolve(estimate, eta=None, confidence=0.0)
    peak = op.peak_throughput
    if op.state is State.RUNNING and op.percent >= 10 and not estimate.per_percent:
        peak = max(peak, estimate.throughput)
    amend(op, estimate=estimate, peak_throughput=peak)
    baseline = alerts.track_eta_baseline(op, now, thresholds.eta_slip_window)
    if baseline is not op.eta_baseline:
        amend(op, eta_baseline=baseline)
    found_alerts = alerts.evaluate(op, now, thresholds, typical_throughput=typical_throughput)
    if found_alerts is not op.alerts:
        amend(op, alerts=found_alerts)
    if op.state.terminal:
        # The final estimate is computed; the estimator's state (~0.5 KB) is
        # not needed for the hour a finished operation is retained.
        amend(op, eta_state=None)
    return op


def raised_alerts(old: Operation | None, new: Operation) -> list[AlertType]:
    """The types of the alerts `new` has that `old` had not (one per measure for
    MEASURE_THRESHOLD, which may be raised for several measures at once)."""
    before = {(a.type, a.measure) for a in old.alerts} if old is not None else set()
    return [a.type for a in new.alerts if (a.type, a.measure) not in before]


def roll_up(parent: Operation, children: Sequence[ChildProgress], now: float) -> Operation | None:
    """The parent with its children summary (and, without progress of its own, their
    percent and ETA), or None when nothing changed."""
    by_state = dict(sorted(Counter(child.state.name for child in children).items()))
    changes: dict[str, object] = {}
    if by_state != dict(parent.children):
        changes["children"] = by_state
    if not parent.has_own_progress and not parent.state.terminal and children:
        known = [c.total for c in children if c.total > 0]
        # Weighted by child totals where known, equally otherwise.
        default = sum(known) / len(known) if known else 1.0
        weights = [float(c.total) if c.total > 0 else default for c in children]
        percent = sum(w * c.percent for w, c in zip(weights, children, strict=True))
        percent /= sum(weights)
        if percent != parent.children_percent:
            changes["children_percent"] = percent
            changes["percent"] = percent
        # Only running children have an estimate, and count.
        active = [c for c in children if c.state.active]
        etas = [c.estimate for c in active if c.estimate is not None and c.estimate.eta is not None]
        # Children run side by side: the parent ends when the last one does.
        if active and len(etas) == len(active):
            last = max(etas, key=lambda e: e.at + e.eta if e.eta is not None else 0.0)
            remaining = max(0.0, last.at + (last.eta or 0.0) - now)
            confidence = min(e.confidence for e in etas)
            estimate = Estimate(eta=remaining, confidence=confidence, at=now)
        else:
            estimate = Estimate(at=now) if active else Estimate(eta=0.0, confidence=1.0, at=now)
        if (estimate.eta, estimate.confidence) != (parent.estimate.eta, parent.estimate.confidence):
            changes["estimate"] = estimate
    if parent.children_measures or any(c.measures for c in children):
        combined = measures.combine(parent.spec, children)
        if combined != parent.children_measures:
            changes["children_measures"] = combined
    if not changes:
        return None
    rolled = evolve(parent, updated_at=now, **changes)
    if "children_measures" in changes and parent.spec.alert_rules:
        amend(rolled, alerts=measures.with_threshold_alerts(rolled, now))
    return rolled
