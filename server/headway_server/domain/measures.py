"""Measures: named numbers a producer reports (quality, cost, tokens), how they
combine over a parent's children, and the threshold alerts on them.

Reports carry absolute values, so a retried or reordered report changes nothing
(reports at or below the last applied sequence are ignored, as for every field).
Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from headway_server.domain import validation as v
from headway_server.domain.errors import InvalidArgument
from headway_server.domain.model import (
    Aggregation,
    Alert,
    AlertRule,
    AlertType,
    ChildProgress,
    Operation,
    StartSpec,
)

# Measure names per operation (declared and reported), and alert rules.
MAX_MEASURES = 32
MAX_ALERT_RULES = 16


def _check_name(field: str, name: str) -> None:
    if not name or len(name) > v.MAX_KEY_LENGTH:
        raise InvalidArgument(field, f"name must be 1-{v.MAX_KEY_LENGTH} characters")


def _check_value(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number (got {value})")


def validate_spec(spec: StartSpec) -> None:
    """Checks the measures and alert rules of a start request."""
    if len(spec.measures) > MAX_MEASURES:
        raise InvalidArgument("measures", f"has more than {MAX_MEASURES} entries")
    seen: set[str] = set()
    for i, measure in enumerate(spec.measures):
        field = f"measures[{i}].name"
        _check_name(field, measure.name)
        if measure.name in seen:
            raise InvalidArgument(field, f"repeats measure {measure.name!r}")
        seen.add(measure.name)
    if len(spec.alert_rules) > MAX_ALERT_RULES:
        raise InvalidArgument("alert_rules", f"has more than {MAX_ALERT_RULES} entries")
    for i, rule in enumerate(spec.alert_rules):
        field = f"alert_rules[{i}]"
        _check_name(f"{field}.measure", rule.measure)
        if rule.below is None and rule.above is None:
            raise InvalidArgument(field, "needs below or above")
        if rule.below is not None:
            _check_value(f"{field}.below", rule.below)
        if rule.above is not None:
            _check_value(f"{field}.above", rule.above)


def validate_reported(values: Mapping[str, float]) -> None:
    """Checks a report's measures (what can be checked without the operation)."""
    if len(values) > MAX_MEASURES:
        raise InvalidArgument("measures", f"more than {MAX_MEASURES} measure names")
    for name, value in values.items():
        field = f"measures[{name!r}]"
        _check_name(field, name)
        _check_value(field, value)


def merged(own: Mapping[str, float], reported: Mapping[str, float]) -> Mapping[str, float]:
    """The operation's own measures after a report (absolute values replace)."""
    result = {**own, **reported}
    if len(result) > MAX_MEASURES:
        raise InvalidArgument("measures", f"more than {MAX_MEASURES} measure names")
    return result


def aggregation(spec: StartSpec, name: str) -> Aggregation:
    for measure in spec.measures:
        if measure.name == name:
            return measure.aggregation
    return Aggregation.LAST


def combine(parent: StartSpec, children: Sequence[ChildProgress]) -> dict[str, float]:
    """The children's measures combined by each measure's aggregation: the parent's
    declaration, else the first child's that declares it, else LAST."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    latest: dict[str, tuple[float, float]] = {}
    rules: dict[str, Aggregation] = {}
    for child in children:
        values = child.measures
        if not values:
            continue
        at = child.changed_at
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
            seen = latest.get(name)
            if seen is None or at >= seen[0]:
                latest[name] = (at, value)
            if name not in rules and any(m.name == name for m in child.spec.measures):
                rules[name] = aggregation(child.spec, name)
    declared = {m.name: m.aggregation for m in parent.measures}
    result: dict[str, float] = {}
    for name in sorted(sums):
        rule = declared.get(name) or rules.get(name, Aggregation.LAST)
        if rule is Aggregation.SUM:
            result[name] = sums[name]
        elif rule is Aggregation.MEAN:
            result[name] = sums[name] / counts[name]
        else:
            result[name] = latest[name][1]
    return result


def threshold_alerts(
    rules: Sequence[AlertRule], values: Mapping[str, float], previous: Sequence[Alert], now: float
) -> list[Alert]:
    """MEASURE_THRESHOLD alerts for the rules crossed now (one per measure, by
    name), keeping `since` of those already raised."""
    found: dict[str, Alert] = {}
    since: dict[str, float] | None = None
    for rule in rules:
        name = rule.measure
        value = values.get(name)
        if value is None or name in found:
            continue
        if rule.below is not None and value < rule.below:
            message = f"{name} {value:.6g} is below {rule.below:g}"
        elif rule.above is not None and value > rule.above:
            message = f"{name} {value:.6g} is above {rule.above:g}"
        else:
            continue
        if since is None:
            since = {a.measure: a.since for a in previous if a.type is AlertType.MEASURE_THRESHOLD}
        found[name] = Alert(AlertType.MEASURE_THRESHOLD, message, since.get(name, now), name, value)
    return [found[name] for name in sorted(found)]


def with_threshold_alerts(op: Operation, now: float) -> tuple[Alert, ...]:
    """`op`'s alerts with the MEASURE_THRESHOLD ones judged again (the others kept)."""
    others = [a for a in op.alerts if a.type is not AlertType.MEASURE_THRESHOLD]
    if op.state.terminal:
        return tuple(others)
    found = threshold_alerts(op.spec.alert_rules, op.combined_measures, op.alerts, now)
    return (*others, *found)
