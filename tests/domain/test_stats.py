"""Stage analytics: percentiles, held counts, finished summaries, window, filter, bounds."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import pytest
from headway_server.domain import lifecycle
from headway_server.domain.model import (
    Operation,
    OperationError,
    OperationFilter,
    StageSpec,
    StartSpec,
    State,
    Update,
)
from headway_server.domain.stats import (
    KindStats,
    Percentiles,
    StatsAggregate,
    percentiles,
)

T0 = 1000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


_ids = itertools.count(1)


def start(clock: Clock, kind: str = "ingest", **spec: object) -> Operation:
    op_id = f"op-{next(_ids)}"
    checked = lifecycle.validate_start(StartSpec(kind=kind, **spec), op_id, "")  # type: ignore[arg-type]
    return lifecycle.new_operation(op_id, checked, clock.now)


def update(op: Operation, clock: Clock, **fields: object) -> Operation:
    change = Update(**fields)  # type: ignore[arg-type]
    lifecycle.validate_update(change)
    return lifecycle.apply_update(op, change, clock.now)


def end(op: Operation, clock: Clock, state: State = State.SUCCEEDED) -> Operation:
    if state is State.SUCCEEDED:
        return lifecycle.finish(op, state, clock.now, call="CompleteOperation", request_id="r")
    error = OperationError(code="CANCELLED" if state is State.CANCELLED else "boom")
    return lifecycle.finish(op, state, clock.now, call="FailOperation", request_id="r", error=error)


def run(
    clock: Clock,
    kind: str = "ingest",
    *,
    seconds: float = 10.0,
    units: int = 0,
    state: State = State.SUCCEEDED,
    queued: float = 0.0,
    **spec: object,
) -> Operation:
    """An operation that waits `queued` s, runs `seconds` s doing `units`, then ends."""
    op = start(clock, kind, **spec)
    clock.advance(queued)
    op = update(op, clock, completed=0)
    clock.advance(seconds)
    if units:
        op = update(op, clock, completed=units)
    return end(op, clock, state)


def staged(
    clock: Clock,
    stages: Sequence[tuple[str, float, int]],
    kind: str = "index",
    state: State = State.SUCCEEDED,
) -> Operation:
    """Runs each (name, seconds, units) stage of a planned operation in order."""
    op = start(clock, kind, stages=tuple(StageSpec(name, 1) for name, _, _ in stages))
    for name, seconds, units in stages:
        op = update(op, clock, stage=name, stage_total=max(units, 1))
        clock.advance(seconds)
        if units:
            op = update(op, clock, stage_completed=units)
    return end(op, clock, state)


def by_kind(kinds: list[KindStats]) -> Mapping[str, KindStats]:
    return {k.kind: k for k in kinds}


ALL = OperationFilter()


def figures(p: Percentiles) -> tuple[float, ...]:
    """(count, p50, p90, p99), to compare with pytest.approx."""
    return dataclasses.astuple(p)


# --- percentiles -----------------------------------------------------------------------


def test_percentiles_interpolate_linearly_between_ranks() -> None:
    assert percentiles([]) == Percentiles(0, 0.0, 0.0, 0.0)
    assert percentiles([7.0]) == Percentiles(1, 7.0, 7.0, 7.0)
    assert figures(percentiles([4.0, 2.0])) == pytest.approx((2, 3.0, 3.8, 3.98))
    hundred = percentiles([float(x) for x in range(100, 0, -1)])
    assert hundred.count == 100
    assert hundred.p50 == pytest.approx(50.5)
    assert hundred.p90 == pytest.approx(90.1)
    assert hundred.p99 == pytest.approx(99.01)


# --- held operations -------------------------------------------------------------------


def test_counts_come_from_held_operations_matching_the_filter() -> None:
    clock = Clock()
    queued = start(clock, project="a")
    running = update(start(clock, project="a"), clock, completed=1)
    stalled = dataclasses.replace(update(start(clock, project="a"), clock), stalled=True)
    paused = update(start(clock, project="a"), clock, paused=True)
    done = run(clock, project="a")
    other = update(start(clock, project="b"), clock)
    held = [queued, running, stalled, paused, done, other]

    stats = StatsAggregate().compute(held, OperationFilter(project="a"), window=None, now=clock.now)

    assert stats.counts_by_state == {
        "QUEUED": 1,
        "RUNNING": 2,
        "PAUSED": 1,
        "SUCCEEDED": 1,
        "FAILED": 0,
        "CANCELLED": 0,
    }
    assert (stats.active, stats.stalled, stats.paused) == (4, 1, 1)
    # Finished stats come from summaries only; nothing was recorded.
    assert (stats.finished, stats.success_rate, stats.kinds) == (0, 0.0, [])

    everything = StatsAggregate().compute(held, ALL, window=None, now=clock.now)
    assert everything.counts_by_state["RUNNING"] == 3
    assert everything.active == 5


# --- finished summaries ----------------------------------------------------------------


def test_finished_stats_per_kind_with_duration_and_throughput_percentiles() -> None:
    clock = Clock()
    aggregate = StatsAggregate()
    for seconds in (10.0, 20.0, 30.0, 40.0):
        aggregate.record_finished(run(clock, "ingest", seconds=seconds, units=100, queued=5))
    aggregate.record_finished(run(clock, "ingest", seconds=50.0, state=State.FAILED))
    aggregate.record_finished(run(clock, "crawl", seconds=2.0, units=10))

    stats = aggregate.compute([], ALL, window=None, now=clock.now)

    assert stats.finished == 6
    assert stats.success_rate == pytest.approx(5 / 6)
    assert [k.kind for k in stats.kinds] == ["crawl", "ingest"]
    ingest = by_kind(stats.kinds)["ingest"]
    assert (ingest.finished, ingest.succeeded) == (5, 4)
    assert ingest.success_rate == pytest.approx(0.8)
    # Durations run from start (the first report), not creation: queueing is excluded.
    assert ingest.duration.count == 5
    assert ingest.duration.p50 == pytest.approx(30.0)
    assert ingest.duration.p90 == pytest.approx(46.0)
    # Throughput only where units were reported: 100 units in 10/20/30/40 s.
    assert ingest.throughput.count == 4
    assert ingest.throughput.p50 == pytest.approx((100 / 30 + 100 / 20) / 2)
    crawl = by_kind(stats.kinds)["crawl"]
    assert crawl.throughput == Percentiles(1, 5.0, 5.0, 5.0)
    assert crawl.stages == []


def test_operation_cancelled_while_queued_counts_as_finished_with_no_run_time() -> None:
    """finish() stamps started_at when the operation never ran, so it lasted 0 s."""
    clock = Clock()
    op = start(clock, "ingest")
    clock.advance(7)
    cancelled = lifecycle.request_cancel(op, "no longer needed", clock.now)
    assert cancelled is not None and cancelled.state is State.CANCELLED
    aggregate = StatsAggregate()
    aggregate.record_finished(cancelled)
    ingest = aggregate.compute([], ALL, window=None, now=clock.now).kinds[0]
    assert ingest.duration == Percentiles(1, 0.0, 0.0, 0.0)
    assert ingest.throughput == Percentiles()
    assert (ingest.finished, ingest.succeeded, ingest.success_rate) == (1, 0, 0.0)


def test_stage_durations_and_rates_per_kind_in_first_seen_order() -> None:
    clock = Clock()
    aggregate = StatsAggregate()
    aggregate.record_finished(staged(clock, [("clone", 2, 0), ("parse", 10, 100), ("embed", 4, 8)]))
    aggregate.record_finished(staged(clock, [("clone", 4, 0), ("parse", 20, 100), ("embed", 8, 8)]))
    # A failed run: its stage reached is interrupted but still timed; later ones never ran.
    failed = staged(clock, [("clone", 6, 0), ("parse", 30, 30)], state=State.FAILED)
    aggregate.record_finished(failed)

    index = aggregate.compute([], ALL, window=None, now=clock.now).kinds[0]

    assert index.kind == "index"
    assert [s.name for s in index.stages] == ["clone", "parse", "embed"]
    clone, parse, embed = index.stages
    assert figures(clone.duration) == pytest.approx((3, 4.0, 5.6, 5.96))
    assert clone.throughput == Percentiles()  # no units reported
    assert parse.duration.count == 3
    assert parse.duration.p50 == pytest.approx(20.0)
    assert parse.throughput.count == 3
    assert parse.throughput.p50 == pytest.approx(5.0)  # 10/s, 5/s, 1/s
    assert embed.duration.count == 2
    assert figures(embed.throughput) == pytest.approx((2, 1.5, 1.9, 1.99))

    succeeded = aggregate.compute(
        [], OperationFilter(states=frozenset({State.SUCCEEDED})), window=None, now=clock.now
    ).kinds[0]
    assert succeeded.stages[1].duration.count == 2


def test_summaries_outlive_the_operations_held() -> None:
    """Retention removed the operations; their summaries still answer."""
    clock = Clock()
    aggregate = StatsAggregate()
    for _ in range(3):
        aggregate.record_finished(run(clock, seconds=5))
    clock.advance(86_400)
    stats = aggregate.compute([], ALL, window=None, now=clock.now)
    assert stats.finished == 3
    assert stats.counts_by_state["SUCCEEDED"] == 0  # none held
    assert stats.kinds[0].duration.p50 == pytest.approx(5.0)


def test_window_keeps_only_operations_finished_within_it() -> None:
    clock = Clock()
    aggregate = StatsAggregate()
    aggregate.record_finished(run(clock, seconds=100))  # finishes at T0 + 100
    clock.advance(1000)
    aggregate.record_finished(run(clock, seconds=10))  # finishes at T0 + 1110
    aggregate.record_finished(run(clock, seconds=20, state=State.FAILED))  # at T0 + 1130
    now = clock.advance(30)

    recent = aggregate.compute([], ALL, window=60, now=now)
    assert recent.finished == 2
    assert recent.success_rate == pytest.approx(0.5)
    assert recent.kinds[0].duration.p50 == pytest.approx(15.0)
    assert aggregate.compute([], ALL, window=10, now=now).kinds == []
    assert aggregate.compute([], ALL, window=None, now=now).finished == 3
    # The bound is inclusive: an operation that finished exactly `window` ago counts.
    assert aggregate.compute([], ALL, window=now - (T0 + 100), now=now).finished == 3


def test_filter_selects_summaries_by_identity_and_state() -> None:
    clock = Clock()
    aggregate = StatsAggregate()
    aggregate.record_finished(
        run(clock, "ingest", project="acme", dataset="repos", labels={"team": "x"})
    )
    aggregate.record_finished(run(clock, "ingest", project="acme", labels={"team": "y"}))
    aggregate.record_finished(run(clock, "crawl", project="acme", state=State.FAILED))
    aggregate.record_finished(run(clock, "ingest", project="other", parent_id="op-parent"))

    def finished(**where: object) -> int:
        chosen = OperationFilter(**where)  # type: ignore[arg-type]
        return aggregate.compute([], chosen, window=None, now=clock.now).finished

    assert finished() == 4
    assert finished(project="acme") == 3
    assert finished(project="acme", kind="ingest") == 2
    assert finished(dataset="repos") == 1
    assert finished(labels={"team": "x"}) == 1
    assert finished(labels={"team": "z"}) == 0
    assert finished(parent_id="op-parent") == 1
    assert finished(states=frozenset({State.FAILED})) == 1
    assert finished(states=frozenset({State.SUCCEEDED, State.FAILED})) == 4
    # Summaries are all terminal: an active-only filter selects none of them.
    assert finished(active_only=True) == 0


# --- bounds and typical throughput ------------------------------------------------------


def test_summaries_are_bounded_and_drop_the_oldest() -> None:
    clock = Clock()
    aggregate = StatsAggregate(max_summaries=3)
    for seconds in (1.0, 2.0, 3.0, 4.0, 5.0):
        aggregate.record_finished(run(clock, seconds=seconds, units=10))
    assert len(aggregate) == 3
    kind = aggregate.compute([], ALL, window=None, now=clock.now).kinds[0]
    assert kind.finished == 3
    assert figures(kind.duration) == pytest.approx((3, 4.0, 4.8, 4.98))
    # The typical rate follows what is kept: 10 units in 3, 4 and 5 s.
    assert aggregate.typical_throughput("ingest") == pytest.approx(10 / 4)

    with pytest.raises(ValueError, match="max_summaries"):
        StatsAggregate(max_summaries=0)


def test_typical_throughput_is_the_median_of_successful_runs_of_the_kind() -> None:
    clock = Clock()
    aggregate = StatsAggregate()
    aggregate.record_finished(run(clock, "ingest", seconds=10, units=100))  # 10/s
    aggregate.record_finished(run(clock, "ingest", seconds=10, units=300))  # 30/s
    # Failures, runs without units and other kinds do not count.
    aggregate.record_finished(run(clock, "ingest", seconds=1, units=1000, state=State.FAILED))
    aggregate.record_finished(run(clock, "ingest", seconds=10))
    for _ in range(3):
        aggregate.record_finished(run(clock, "crawl", seconds=1, units=1))
    assert aggregate.typical_throughput("ingest") is None  # two samples only

    aggregate.record_finished(run(clock, "ingest", seconds=10, units=200))  # 20/s
    assert aggregate.typical_throughput("ingest") == pytest.approx(20.0)
    aggregate.record_finished(run(clock, "ingest", seconds=10, units=500))  # 50/s
    assert aggregate.typical_throughput("ingest") == pytest.approx(25.0)
    assert aggregate.typical_throughput("crawl") == pytest.approx(1.0)
    assert aggregate.typical_throughput("unknown") is None


def test_eviction_forgets_typical_samples_of_kinds_no_longer_held() -> None:
    clock = Clock()
    aggregate = StatsAggregate(max_summaries=3)
    for _ in range(3):
        aggregate.record_finished(run(clock, "old", seconds=1, units=5))
    assert aggregate.typical_throughput("old") == pytest.approx(5.0)
    aggregate.record_finished(run(clock, "new", seconds=1, units=7))
    assert aggregate.typical_throughput("old") is None  # two samples left
    for _ in range(2):
        aggregate.record_finished(run(clock, "new", seconds=1, units=7))
    assert aggregate.typical_throughput("new") == pytest.approx(7.0)
    assert aggregate.typical_throughput("old") is None
    assert aggregate._typical.keys() == {"new"}
