"""Stage analytics: what GetStats reports, from held operations and finished summaries.

Individual operations leave the store when their retention ends; what stats need
of a finished one (identity, state, duration, throughput, per-stage duration and
rate, final measures) is kept here in a bounded aggregate, oldest dropped first,
so stats reach further back than retention does. So is the ETA's history of each
kind (how long each stage of its successful runs took relative to its weight:
domain.eta). Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sortedcontainers import SortedList

from headway_server.domain import eta, measures
from headway_server.domain.model import (
    Aggregation,
    HeldOperation,
    Operation,
    OperationFilter,
    StartSpec,
    State,
    shared,
)

DEFAULT_MAX_SUMMARIES = 100_000
# Distinct stage-name lists shared between summaries before the table starts over.
_SHARED_NAMES = 1000
# typical_throughput answers only with at least this many successful samples.
MIN_TYPICAL_SAMPLES = 3
# Kinds whose ETA history is kept (the oldest kind is dropped beyond).
MAX_HISTORY_KINDS = 10_000


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50/p90/p99 of `count` samples (linear interpolation); all zero without samples."""

    count: int = 0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0


@dataclass(frozen=True, slots=True)
class StageStats:
    name: str
    # Seconds from the stage's start to its finish.
    duration: Percentiles
    # Stage units per second (stages that reported stage_completed).
    throughput: Percentiles


@dataclass(frozen=True, slots=True)
class MeasureStats:
    name: str
    aggregation: Aggregation
    # Final values of the finished operations that reported it.
    values: Percentiles
    # SUM measures: the total of those values (0.0 for the others).
    total: float


@dataclass(frozen=True, slots=True)
class KindStats:
    kind: str
    finished: int
    succeeded: int
    success_rate: float
    # Seconds from start (or creation when never started) to finish.
    duration: Percentiles
    # Operation units per second (operations that reported completed).
    throughput: Percentiles
    stages: list[StageStats]
    measures: list[MeasureStats]


@dataclass(frozen=True, slots=True)
class Stats:
    # Held operations by state name; every state is present, zero when none.
    counts_by_state: dict[str, int]
    # SUCCEEDED / finished over the finished summaries selected; 0 when none.
    success_rate: float
    active: int
    stalled: int
    paused: int
    finished: int
    kinds: list[KindStats]


@dataclass(frozen=True, slots=True)
class _StageSummary:
    name: str
    duration: float
    rate: float | None


# NaN stands for "no rate" among a summary's packed numbers.
_NO_RATE = math.nan


@dataclass(frozen=True, slots=True)
class _Summary:
    """What stats keep of a finished operation.

    One is kept per finished operation long after the operation itself, so its
    numbers are packed into one bytes value (~100 B) rather than held as a
    float object each (~0.5 KB with the stage objects; bench: retained memory).
    """

    spec: StartSpec
    state: State
    # Stage names, shared between summaries with the same stages.
    stage_names: tuple[str, ...]
    # finished_at, duration, throughput, then each stage's duration and rate,
    # then each measure's final value.
    numbers: bytes
    # Names of the measures it ended with (shared like stage_names).
    measure_names: tuple[str, ...] = ()

    @property
    def measures(self) -> dict[str, float]:
        if not self.measure_names:
            return {}
        values = self._values[3 + 2 * len(self.stage_names) :]
        return dict(zip(self.measure_names, values, strict=True))

    @property
    def _values(self) -> tuple[float, ...]:
        return struct.unpack(f"<{len(self.numbers) // 8}d", self.numbers)

    @property
    def finished_at(self) -> float:
        return float(struct.unpack_from("<d", self.numbers)[0])

    @property
    def duration(self) -> float:
        return float(struct.unpack_from("<d", self.numbers, 8)[0])

    @property
    def throughput(self) -> float | None:
        return _rate_or_none(struct.unpack_from("<d", self.numbers, 16)[0])

    @property
    def stages(self) -> tuple[_StageSummary, ...]:
        values = self._values
        return tuple(
            _StageSummary(name, values[3 + 2 * i], _rate_or_none(values[4 + 2 * i]))
            for i, name in enumerate(self.stage_names)
        )


def _rate_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def percentiles(values: list[float]) -> Percentiles:
    """p50/p90/p99 by linear interpolation between closest ranks (sorts `values`)."""
    if not values:
        return Percentiles()
    values.sort()
    return Percentiles(
        count=len(values),
        p50=_quantile(values, 0.50),
        p90=_quantile(values, 0.90),
        p99=_quantile(values, 0.99),
    )


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def _rate(units: int, seconds: float) -> float | None:
    return units / seconds if units > 0 and seconds > 0 else None


def _summarize(op: Operation, names: dict[tuple[str, ...], tuple[str, ...]]) -> _Summary:
    finished_at = op.finished_at if op.finished_at is not None else op.updated_at
    began = op.started_at if op.started_at is not None else op.created_at
    duration = max(0.0, finished_at - began)
    throughput = _rate(op.completed, duration)
    numbers = [finished_at, duration, _NO_RATE if throughput is None else throughput]
    stage_names = []
    for stage in op.stages:
        if stage.started_at is None or stage.finished_at is None:
            continue
        seconds = stage.finished_at - stage.started_at
        rate = _rate(stage.completed, seconds)
        stage_names.append(stage.name)
        numbers += [max(0.0, seconds), _NO_RATE if rate is None else rate]
    key = tuple(stage_names)
    values = op.combined_measures
    measure_names: tuple[str, ...] = ()
    if values:
        ordered = tuple(sorted(values))
        numbers += [values[name] for name in ordered]
        measure_names = shared(names, ordered, ordered, _SHARED_NAMES)
    return _Summary(
        op.spec,
        op.state,
        shared(names, key, key, _SHARED_NAMES),
        struct.pack(f"<{len(numbers)}d", *numbers),
        measure_names,
    )


class _KindAccumulator:
    __slots__ = ("durations", "finished", "measures", "stages", "succeeded", "throughputs")

    def __init__(self) -> None:
        self.finished = 0
        self.succeeded = 0
        self.durations: list[float] = []
        self.throughputs: list[float] = []
        # name -> (durations, rates); dicts keep first-seen order.
        self.stages: dict[str, tuple[list[float], list[float]]] = {}
        # measure name -> (aggregation, final values).
        self.measures: dict[str, tuple[Aggregation, list[float]]] = {}

    def add(self, summary: _Summary) -> None:
        self.finished += 1
        if summary.state is State.SUCCEEDED:
            self.succeeded += 1
        self.durations.append(summary.duration)
        if summary.throughput is not None:
            self.throughputs.append(summary.throughput)
        for stage in summary.stages:
            durations, rates = self.stages.setdefault(stage.name, ([], []))
            durations.append(stage.duration)
            if stage.rate is not None:
                rates.append(stage.rate)
        if summary.measure_names:
            for name, value in summary.measures.items():
                found = self.measures.get(name)
                if found is None:
                    rule = measures.aggregation(summary.spec, name)
                    found = self.measures[name] = (rule, [])
                found[1].append(value)

    def build(self, kind: str) -> KindStats:
        return KindStats(
            kind=kind,
            finished=self.finished,
            succeeded=self.succeeded,
            success_rate=self.succeeded / self.finished if self.finished else 0.0,
            duration=percentiles(self.durations),
            throughput=percentiles(self.throughputs),
            stages=[
                StageStats(name, percentiles(durations), percentiles(rates))
                for name, (durations, rates) in self.stages.items()
            ],
            measures=[
                MeasureStats(
                    name,
                    rule,
                    percentiles(list(values)),
                    math.fsum(values) if rule is Aggregation.SUM else 0.0,
                )
                for name, (rule, values) in sorted(self.measures.items())
            ],
        )


class StatsAggregate:
    """Bounded summaries of finished operations, and the stats computed from them.

    Not thread-safe; used from the server's event loop.
    """

    def __init__(self, *, max_summaries: int = DEFAULT_MAX_SUMMARIES) -> None:
        if max_summaries < 1:
            raise ValueError("max_summaries must be at least 1")
        self.max_summaries = max_summaries
        self._summaries: deque[_Summary] = deque()
        # kind -> throughputs of the SUCCEEDED summaries held, sorted (for the median).
        self._typical: dict[str, SortedList] = {}
        self._stage_names: dict[tuple[str, ...], tuple[str, ...]] = {}
        # kind -> the last runs' eta.run_ratios, and their summary.
        self._runs: dict[str, deque[Mapping[str, float]]] = {}
        self._histories: dict[str, eta.StageHistory] = {}

    def __len__(self) -> int:
        return len(self._summaries)

    def record_finished(self, op: Operation) -> None:
        """Called once when `op` reaches a terminal state."""
        summary = _summarize(op, self._stage_names)
        if len(self._summaries) >= self.max_summaries:
            self._forget(self._summaries.popleft())
        self._summaries.append(summary)
        if summary.state is State.SUCCEEDED and summary.throughput is not None:
            self._typical.setdefault(summary.spec.kind, SortedList()).add(summary.throughput)
        ratios = eta.run_ratios(op)
        if ratios is not None:
            self._learn(op.kind, ratios)

    def _learn(self, kind: str, ratios: Mapping[str, float]) -> None:
        runs = self._runs.get(kind)
        if runs is None:
            if len(self._runs) >= MAX_HISTORY_KINDS:
                oldest = next(iter(self._runs))
                del self._runs[oldest]
                self._histories.pop(oldest, None)
            runs = self._runs[kind] = deque(maxlen=eta.HISTORY_RUNS)
        runs.append(ratios)
        history = eta.build_history(list(runs))
        if history is not None:
            self._histories[kind] = history

    def stage_history(self, kind: str) -> eta.StageHistory | None:
        """What the successful runs of `kind` say about its stages (for the ETA);
        None before the first. Kept per kind, apart from the summaries."""
        return self._histories.get(kind)

    def _forget(self, summary: _Summary) -> None:
        if summary.state is not State.SUCCEEDED or summary.throughput is None:
            return
        samples = self._typical[summary.spec.kind]
        samples.remove(summary.throughput)
        if not samples:
            del self._typical[summary.spec.kind]

    def typical_throughput(self, kind: str) -> float | None:
        """Median units/s of this kind's SUCCEEDED summaries; None below 3 samples."""
        samples = self._typical.get(kind)
        if samples is None or len(samples) < MIN_TYPICAL_SAMPLES:
            return None
        n = len(samples)
        middle = n // 2
        if n % 2:
            return float(samples[middle])
        return (float(samples[middle - 1]) + float(samples[middle])) / 2

    def compute(
        self,
        held: Iterable[HeldOperation],
        where: OperationFilter,
        *,
        window: float | None,
        now: float,
    ) -> Stats:
        """Counts from the held operations matching `where`; finished stats from the
        summaries matching it that finished within `window` seconds of `now`
        (all summaries held when `window` is None)."""
        counts = {state.name: 0 for state in State}
        active = stalled = paused = 0
        for op in held:
            if not where.matches(op):
                continue
            counts[op.state.name] += 1
            if op.state.active:
                active += 1
                if op.stalled:
                    stalled += 1
                if op.state is State.PAUSED:
                    paused += 1

        kinds: dict[str, _KindAccumulator] = {}
        # Summaries are all terminal, so an active-only filter selects none.
        if not where.active_only:
            since = None if window is None else now - window
            for summary in self._summaries:
                if since is not None and summary.finished_at < since:
                    continue
                if where.states and summary.state not in where.states:
                    continue
                if not where.matches_spec(summary.spec):
                    continue
                accumulator = kinds.get(summary.spec.kind)
                if accumulator is None:
                    accumulator = kinds[summary.spec.kind] = _KindAccumulator()
                accumulator.add(summary)

        finished = sum(a.finished for a in kinds.values())
        succeeded = sum(a.succeeded for a in kinds.values())
        return Stats(
            counts_by_state=counts,
            success_rate=succeeded / finished if finished else 0.0,
            active=active,
            stalled=stalled,
            paused=paused,
            finished=finished,
            kinds=[kinds[kind].build(kind) for kind in sorted(kinds)],
        )
