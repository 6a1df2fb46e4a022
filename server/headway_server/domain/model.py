"""The operation model: immutable values that the store holds and the domain replaces.

Values are frozen so a watcher or a response can hold one while producers move
on; every change builds a new value with `evolve`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Copying and building values is the hot path of a report: see domain.values.
from headway_server.domain.values import amend as amend
from headway_server.domain.values import evolve as evolve
from headway_server.domain.values import fast_init

JsonObject = Mapping[str, Any]


class State(enum.IntEnum):
    """Operation states; the numbers are the proto's."""

    QUEUED = 1
    RUNNING = 2
    PAUSED = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def terminal(self) -> bool:
        return self >= State.SUCCEEDED

    @property
    def active(self) -> bool:
        return self <= State.PAUSED


class StageState(enum.IntEnum):
    """Stage states; the numbers are the proto's."""

    PENDING = 1
    RUNNING = 2
    DONE = 3
    SKIPPED = 4
    INTERRUPTED = 5


@fast_init
@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    weight: float
    state: StageState = StageState.PENDING
    completed: int = 0
    total: int = 0
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    weight: float


@dataclass(frozen=True, slots=True)
class OperationError:
    code: str = ""
    message: str = ""
    stage: str = ""
    item: str = ""
    recoverable: bool = False
    details: JsonObject | None = None


class AlertType(enum.IntEnum):
    """Numbers are the proto's Alert.Type."""

    STALLED = 1
    SLOW = 2
    HIGH_ERROR_RATE = 3
    ETA_SLIPPING = 4
    MEASURE_THRESHOLD = 5


@fast_init
@dataclass(frozen=True, slots=True)
class Alert:
    type: AlertType
    message: str
    since: float
    # MEASURE_THRESHOLD: the measure (one alert per measure) and its value.
    measure: str = ""
    value: float = 0.0


class Aggregation(enum.IntEnum):
    """How a measure combines over children and in statistics; the proto's numbers."""

    LAST = 1
    SUM = 2
    MEAN = 3


@dataclass(frozen=True, slots=True)
class MeasureSpec:
    name: str
    aggregation: Aggregation = Aggregation.LAST


@dataclass(frozen=True, slots=True)
class AlertRule:
    """MEASURE_THRESHOLD while `measure` is below `below` or above `above`."""

    measure: str
    below: float | None = None
    above: float | None = None


class LogLevel(enum.IntEnum):
    """Numbers are the proto's LogEntry.Level."""

    DEBUG = 1
    INFO = 2
    WARNING = 3
    ERROR = 4


@dataclass(frozen=True, slots=True)
class LogEntry:
    level: LogLevel
    message: str = ""
    stage: str = ""
    item: str = ""
    code: str = ""
    recoverable: bool = False
    details: JsonObject | None = None
    time: float = 0.0
    # Position in the operation's log (1, 2, ...), set when stored.
    index: int = 0


class TimelineType(enum.IntEnum):
    """Numbers are the proto's TimelineEntry.Type."""

    STARTED = 1
    RUNNING = 2
    STAGE_STARTED = 3
    PAUSED = 4
    RESUMED = 5
    STALLED = 6
    RECOVERED = 7
    CANCEL_REQUESTED = 8
    ERROR = 9
    ALERT_RAISED = 10
    ALERT_CLEARED = 11
    SUCCEEDED = 12
    FAILED = 13
    CANCELLED = 14


@fast_init
@dataclass(frozen=True, slots=True)
class TimelineEntry:
    type: TimelineType
    time: float
    revision: int
    stage: str = ""
    message: str = ""


@fast_init
@dataclass(frozen=True, slots=True)
class Estimate:
    """What the ETA estimator says about an operation at `at`."""

    throughput: float = 0.0
    # True when throughput is in percent per second (no units reported).
    per_percent: bool = False
    # Seconds remaining from `at`; None while unknown.
    eta: float | None = None
    confidence: float = 0.0
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class StartSpec:
    """What a producer asked for at start; a retried start must ask for the same."""

    kind: str = ""
    project: str = ""
    dataset: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    total: int = 0
    unit: str = ""
    stages: tuple[StageSpec, ...] = ()
    heartbeat_timeout: float = 0.0
    parent_id: str = ""
    # Measures declared at start (undeclared ones are LAST) and threshold rules.
    measures: tuple[MeasureSpec, ...] = ()
    alert_rules: tuple[AlertRule, ...] = ()


def shared(table: dict[Any, Any], key: Any, value: Any, limit: int) -> Any:
    """The value `table` holds for `key`, else `value`, now held for it: one object
    for many equal ones. A table reaching `limit` starts over (bounded memory)."""
    found = table.get(key)
    if found is None:
        if len(table) >= limit:
            table.clear()
        found = table[key] = value
    return found


class SharedSpecs:
    """Start parameters with their parts shared between operations.

    Operations of one pipeline start with the same kind, project, labels and
    stages, and often differ in total or parent: sharing the parts saves a few
    hundred bytes per held operation and finished summary (bench: retained
    memory). Bounded: a table that fills up starts over, and later starts share
    again from there.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._labels: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
        self._stages: dict[tuple[StageSpec, ...], tuple[StageSpec, ...]] = {}
        self._strings: dict[str, str] = {}
        self._measures: dict[tuple[MeasureSpec, ...], tuple[MeasureSpec, ...]] = {}
        self._rules: dict[tuple[AlertRule, ...], tuple[AlertRule, ...]] = {}

    def _shared(self, table: dict[Any, Any], key: Any, value: Any) -> Any:
        return shared(table, key, value, self._limit)

    def share(self, spec: StartSpec) -> StartSpec:
        strings = self._strings
        return StartSpec(
            kind=self._shared(strings, spec.kind, spec.kind),
            project=self._shared(strings, spec.project, spec.project),
            dataset=self._shared(strings, spec.dataset, spec.dataset),
            labels=self._shared(self._labels, tuple(sorted(spec.labels.items())), spec.labels),
            total=spec.total,
            unit=self._shared(strings, spec.unit, spec.unit),
            stages=self._shared(self._stages, spec.stages, spec.stages),
            heartbeat_timeout=spec.heartbeat_timeout,
            parent_id=spec.parent_id,
            measures=self._shared(self._measures, spec.measures, spec.measures),
            alert_rules=self._shared(self._rules, spec.alert_rules, spec.alert_rules),
        )


@fast_init
@dataclass(frozen=True, slots=True)
class Update:
    """One progress report; None means "not set, leave as is"."""

    sequence: int = 0
    stage: str | None = None
    stage_completed: int | None = None
    stage_total: int | None = None
    completed: int | None = None
    total: int | None = None
    percent: float | None = None
    message: str | None = None
    details: JsonObject | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    checkpoint: str | None = None
    paused: bool | None = None
    pause_reason: str = ""
    # Absolute values of measures (None: none reported).
    measures: Mapping[str, float] | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Operation:
    id: str
    spec: StartSpec
    state: State = State.QUEUED
    stalled: bool = False
    cancel_requested: bool = False
    cancel_reason: str = ""
    percent: float = 0.0
    completed: int = 0
    total: int = 0
    stage: str = ""
    stages: tuple[Stage, ...] = ()
    message: str = ""
    details: JsonObject | None = None
    counters: Mapping[str, int] = field(default_factory=dict)
    checkpoint: str = ""
    error: OperationError | None = None
    result: JsonObject | None = None
    pause_reason: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    revision: int = 0
    created_revision: int = 0
    last_sequence: int = 0
    # Not in the contract: the last explicit percent (used when there are no
    # units and no plan), the call that ended the operation as
    # (call name, request_id) so that call can be repeated, and when the
    # producer last reported (the heartbeat lease runs from there).
    explicit_percent: float = 0.0
    finished_by: tuple[str, str] | None = None
    last_report_at: float = 0.0
    # Progress depth (issue 4).
    error_count: int = 0
    warning_count: int = 0
    alerts: tuple[Alert, ...] = ()
    # Children by state name, and their rolled-up percent, for a parent.
    children: Mapping[str, int] = field(default_factory=dict)
    children_percent: float | None = None
    depth: int = 0
    estimate: Estimate = Estimate()
    # The estimator's memory (domain.eta.EtaState); opaque to everything else.
    eta_state: Any = None
    # Highest throughput seen once past 10 % (the SLOW alert's "own earlier rate").
    peak_throughput: float = 0.0
    # (when, estimated completion) the ETA_SLIPPING alert compares against.
    eta_baseline: tuple[float, float] | None = None
    # Measures (issue 14): the producer's own latest values, and for a parent
    # its children's combined (see combined_measures).
    measures: Mapping[str, float] = field(default_factory=dict)
    children_measures: Mapping[str, float] = field(default_factory=dict)

    # The start parameters are fixed for life; these read through to them.
    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def project(self) -> str:
        return self.spec.project

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    @property
    def parent_id(self) -> str:
        return self.spec.parent_id

    @property
    def unit(self) -> str:
        return self.spec.unit

    @property
    def heartbeat_timeout(self) -> float:
        return self.spec.heartbeat_timeout

    @property
    def planned(self) -> bool:
        return bool(self.spec.stages)

    @property
    def combined_measures(self) -> Mapping[str, float]:
        """What the operation shows: its children's measures, and its own over them."""
        if not self.children_measures:
            return self.measures
        return {**self.children_measures, **self.measures}

    @property
    def has_own_progress(self) -> bool:
        """Whether the producer reports its own percent (else a parent rolls up children)."""
        return self.planned or self.total > 0 or self.explicit_percent > 0


@dataclass(frozen=True, slots=True)
class OperationFilter:
    """Selects operations; every set field must match."""

    project: str = ""
    dataset: str = ""
    kind: str = ""
    states: frozenset[State] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    parent_id: str = ""
    active_only: bool = False
    # Only these projects (a caller's scope, under authentication); None = any.
    projects: frozenset[str] | None = None

    def matches_spec(self, spec: StartSpec) -> bool:
        """Matches on the start parameters, which never change."""
        return (
            (not self.project or spec.project == self.project)
            and (self.projects is None or spec.project in self.projects)
            and (not self.dataset or spec.dataset == self.dataset)
            and (not self.kind or spec.kind == self.kind)
            and (not self.parent_id or spec.parent_id == self.parent_id)
            and all(spec.labels.get(k) == v for k, v in self.labels.items())
        )

    def matches(self, op: Operation | FinishedOperation) -> bool:
        return (
            self.matches_spec(op.spec)
            and (not self.states or op.state in self.states)
            and (not self.active_only or op.state.active)
        )


@dataclass(frozen=True, slots=True)
class FinishedOperation:
    """A finished operation as the memory store holds it: what filters, sweeps,
    counts and roll-ups read, beside the rest packed into bytes
    (store.packing; the store's `get` unpacks the whole Operation)."""

    id: str
    # Its parts shared with other operations started alike (SharedSpecs).
    spec: StartSpec
    state: State
    revision: int
    created_revision: int
    finished_at: float | None
    total: int
    percent: float
    packed: bytes
    # Its combined measures (for a parent's roll-up).
    measures: Mapping[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def parent_id(self) -> str:
        return self.spec.parent_id

    @property
    def stalled(self) -> bool:
        # finish() clears it, and only unstalled operations are packed.
        return False


# What sweeps, counts and roll-ups read: a running operation whole, a finished one as held.
HeldOperation = Operation | FinishedOperation


@dataclass(frozen=True, slots=True)
class ChildProgress:
    """What a parent's roll-up and its cancel cascade read of one child: what
    a store's `children()` answers, however the store holds the child."""

    id: str
    spec: StartSpec
    state: State
    revision: int
    total: int
    percent: float
    # A running child's estimate; None once it has finished.
    estimate: Estimate | None
    # A cancel request not acted on yet (False once it has finished).
    cancel_requested: bool
    # Its measures as it shows them (its own over its children's), and when
    # they last changed (its last update, or when it finished).
    measures: Mapping[str, float]
    changed_at: float

    @classmethod
    def of(cls, op: Operation) -> ChildProgress:
        active = op.state.active
        return cls(
            op.id,
            op.spec,
            op.state,
            op.revision,
            op.total,
            op.percent,
            op.estimate if active else None,
            op.cancel_requested and active,
            op.combined_measures,
            op.updated_at if active or op.finished_at is None else op.finished_at,
        )


@fast_init
@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the store's change history: the latest state of an operation
    at `revision`, or its last state before deletion when `deleted`."""

    revision: int
    operation: Operation
    deleted: bool = False
