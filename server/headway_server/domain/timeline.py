"""The audit trail of an operation, derived from consecutive stored states."""

from __future__ import annotations

from headway_server.domain.model import Operation, State, TimelineEntry, TimelineType

_ENDING = {
    State.SUCCEEDED: TimelineType.SUCCEEDED,
    State.FAILED: TimelineType.FAILED,
    State.CANCELLED: TimelineType.CANCELLED,
}


def entries(old: Operation | None, new: Operation) -> list[TimelineEntry]:
    """What happened between two stored states of one operation (old None: it started)."""
    at, rev = new.updated_at, new.revision

    def entry(kind: TimelineType, message: str = "") -> TimelineEntry:
        return TimelineEntry(kind, at, rev, new.stage, message)

    if old is None:
        return [entry(TimelineType.STARTED, new.kind)]
    found: list[TimelineEntry] = []
    if new.stage != old.stage:
        found.append(entry(TimelineType.STAGE_STARTED, new.stage))
    if new.state is not old.state:
        if new.state is State.RUNNING:
            resumed = old.state is State.PAUSED
            found.append(entry(TimelineType.RESUMED if resumed else TimelineType.RUNNING))
        elif new.state is State.PAUSED:
            found.append(entry(TimelineType.PAUSED, new.pause_reason))
        elif new.state.terminal:
            message = new.error.message if new.error is not None else new.message
            if new.error is not None and new.error.code:
                message = f"{new.error.code}: {message}"
            found.append(entry(_ENDING[new.state], message))
    if new.stalled and not old.stalled:
        found.append(entry(TimelineType.STALLED))
    elif old.stalled and not new.stalled:
        found.append(entry(TimelineType.RECOVERED))
    if new.cancel_requested and not old.cancel_requested:
        found.append(entry(TimelineType.CANCEL_REQUESTED, new.cancel_reason))
    if old.alerts or new.alerts:
        # One alert per type, and per measure for MEASURE_THRESHOLD.
        old_alerts = {(a.type, a.measure): a for a in old.alerts}
        new_alerts = {(a.type, a.measure): a for a in new.alerts}
        for key, alert in new_alerts.items():
            if key not in old_alerts:
                found.append(
                    entry(TimelineType.ALERT_RAISED, f"{alert.type.name}: {alert.message}")
                )
        for key, alert in old_alerts.items():
            if key not in new_alerts:
                name = f"{alert.type.name} {alert.measure}" if alert.measure else alert.type.name
                found.append(entry(TimelineType.ALERT_CLEARED, name))
    return found
