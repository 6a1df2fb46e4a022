"""The producer handles' shared state and decisions; _sync and _aio only wait and call.

Every handle of one client reports through that client's one background sender.
This module holds everything the sync (threads) and asyncio senders share: a
handle's state (HandleState), what the handles expose (ProducerHandle), which
calls go out when (ReportScheduler), in which order and by which route (Round),
and how an answer or a failure lands on its handle. It never waits and never
does I/O; callers serialise access to it (the sync sender's lock, or the asyncio
client's one event loop).

Why one sender per client: a producer with many operations in flight (the
children of a batch, or `client.start` called in a loop) would otherwise send
one call per operation per interval. The shared sender sends every due
operation's reports in one BatchUpdateOperations call instead.

Tracking never breaks the job (best effort, the default): a handle whose server
is unreachable, slow or restarted keeps its latest state (coalesced: bounded,
never a queue of every report) and the sender delivers it once the server
answers. A handle started while the server was unreachable has a local id and
is registered (StartOperation with that id) when the server answers; one the
server no longer knows (NOT_FOUND: a restarted memory store) is registered
again with the same id and parameters, then sent its whole current state, so
counters stay exact. One the server says it deleted is left deleted. Outages
are logged once when they start and once when they end. strict=True restores
raising: outages are retried as before, then raised at the handle's next call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import grpc
from headway.v1 import progress_pb2 as pb

from headway_client._errors import (
    STATUS_BY_NUMBER,
    FailedPrecondition,
    HeadwayError,
    InvalidArgument,
    OperationCancelled,
    OperationDeleted,
    ack_error,
    status_of,
)
from headway_client._reports import MAX_SEGMENTS, PendingReports
from headway_client._retry import REPORT_RETRY, RETRYABLE, RetryPolicy

log = logging.getLogger("headway_client")

# The server's limit on reports per BatchUpdateOperations call (progress.proto).
MAX_BATCH_REPORTS = 1000
# Bytes of reports per BatchUpdateOperations call: well under the 4 MiB a
# server accepts by default (a report may carry 16 KiB of details).
MAX_BATCH_BYTES = 2 << 20
# How long, by default, complete()/fail() (and a best-effort start()) may hold the job.
FINISH_TIMEOUT = 5.0

# What the sender hands back for each report: its ack, or why the call carrying it failed.
Result = pb.ReportProgressResponse | BaseException
Ending = pb.CompleteOperationRequest | pb.FailOperationRequest

# Statuses that say the caller's request is wrong, not that the tracker is out of
# reach: raised (at the handle's next call) in every mode.
_CALLER_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
# Statuses that say the server is out of reach or too slow: every call fails alike,
# so the sender pauses them all (backoff) rather than each handle on its own.
_LINK_DOWN = RETRYABLE


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, HeadwayError):
        return error.code
    return status_of(error)


def is_outage(error: BaseException) -> bool:
    """The tracker failed, not the caller: kept and retried when best effort."""
    if not isinstance(error, HeadwayError | grpc.RpcError):
        return False  # a defect on this side: retrying would not help
    code = _code_of(error)
    return code not in _CALLER_ERRORS and code != grpc.StatusCode.NOT_FOUND


def local_id() -> str:
    """An operation id chosen here (the server accepts a client-chosen id), in the
    server's own format, so a start can be repeated until it lands."""
    return "op-" + secrets.token_hex(16)


def offline_operation(request: pb.StartOperationRequest) -> pb.Operation:
    """What a handle knows of an operation the server has not registered yet."""
    operation = pb.Operation(
        id=request.operation_id,
        kind=request.kind,
        project=request.project,
        dataset=request.dataset,
        labels=dict(request.labels),
        total=request.total,
        unit=request.unit,
        parent_id=request.parent_id,
        state=pb.Operation.QUEUED,
    )
    if request.HasField("heartbeat_timeout"):
        operation.heartbeat_timeout.CopyFrom(request.heartbeat_timeout)
    return operation


def starts_offline(error: HeadwayError) -> bool:
    """Whether a best-effort start() that failed so goes on with a local handle
    (else the error is the caller's: an invalid argument, an id taken)."""
    return _code_of(error) not in _CALLER_ERRORS


@dataclass
class StartPlan:
    """How start() goes: strict (the call must succeed, as before), or best effort
    (one bounded attempt when the server may answer, else a handle with a local id
    that the sender registers later)."""

    request: pb.StartOperationRequest
    strict: bool
    try_now: bool
    operation: pb.Operation | None = None
    error: HeadwayError | None = None

    @classmethod
    def of(
        cls,
        scheduler: ReportScheduler,
        request: pb.StartOperationRequest,
        *,
        strict: bool,
        caller_request_id: bool,
    ) -> StartPlan:
        if strict:
            return cls(request, strict=True, try_now=True)
        if not request.operation_id and not caller_request_id:
            # Chosen here, so every attempt (now or later) registers this same
            # operation. A caller's request_id keeps the server's id for it while
            # the server answers.
            request.operation_id = local_id()
        return cls(request, strict=False, try_now=scheduler.may_start_now(request))

    def failed(self, error: HeadwayError) -> None:
        """The attempt failed: raises what the caller must hear, keeps the rest."""
        if self.strict or not starts_offline(error):
            raise error
        self.error = error

    @property
    def online(self) -> bool:
        return self.operation is not None

    def result(self) -> pb.Operation:
        if self.operation is not None:
            return self.operation
        if not self.request.operation_id:
            self.request.operation_id = local_id()
        return offline_operation(self.request)


class Route(Enum):
    """How the shared sender sends reports; it moves down on UNIMPLEMENTED, never back."""

    BATCH = "BatchUpdateOperations"
    STREAM = "ReportProgress"
    UNARY = "UpdateOperation"


class HandleState:
    """One producer handle's state: what it reported, what is pending, what the server said."""

    def __init__(
        self,
        operation: pb.Operation,
        spec: pb.StartOperationRequest,
        *,
        registered: bool,
        min_interval: float,
        raise_on_cancel: bool,
        direct: bool,
        strict: bool,
    ) -> None:
        self.id = operation.id
        self.operation = operation
        # What registers the operation (again), with its id: a start is idempotent.
        self.spec = pb.StartOperationRequest()
        self.spec.CopyFrom(spec)
        self.spec.operation_id = operation.id
        self.plan = [stage.name for stage in spec.stages]
        self.min_interval = min_interval
        self.raise_on_cancel = raise_on_cancel
        # streaming=False: this handle's reports go as unary UpdateOperation calls.
        self.direct = direct
        self.strict = strict
        self.cancel_requested = operation.cancel_requested
        self.revision = operation.revision
        self.percent = operation.percent
        self.rpcs = 0  # reports acknowledged by the server
        # The whole state reported so far, to send to a server that lost it.
        self.completed = operation.completed
        self.stage = operation.stage
        self.stage_completed = 0
        self.latest: dict[str, Any] = {}
        self.counters: dict[str, int] = {}
        self.measures: dict[str, float] = {}
        self.left: list[dict[str, Any]] = []  # the stages left, with their last progress
        self.pending = PendingReports(self.id, first_sequence=operation.last_sequence + 1)
        self.error: BaseException | None = None
        self.closed = False  # complete() or fail() began: no more reports
        self.detached: HeadwayError | None = None  # the client was closed under it
        self.in_flight = False
        self.urgent = False  # a flush or the ending waits: send without pacing
        self.last_sent = -math.inf
        # Best effort
        self.needs_start = not registered  # StartOperation must (again) precede reports
        self.failures = 0  # consecutive failed attempts (an outage)
        self.hold_until = -math.inf  # this handle's own backoff (e.g. a full server)
        self.abandoned = False  # deleted on the server, or impossible to register
        self.dropped = False  # gave up with state the server does not have
        self.ending: Ending | None = None
        self.ending_error: BaseException | None = None  # what complete()/fail() raise
        self.done = False  # the ending was delivered, or given up
        self._delays: Iterator[float] | None = None
        self.warned = False  # one warning per trouble of this handle

    @property
    def idle(self) -> bool:
        """Everything reported so far has been acknowledged (or has failed, or was given up)."""
        return self.abandoned or (not self.pending and not self.in_flight and not self.needs_start)

    @property
    def connected(self) -> bool:
        return not self.needs_start and not self.abandoned and self.failures == 0

    @property
    def delivered(self) -> bool:
        """The server has everything reported so far."""
        return self.idle and not self.abandoned and self.detached is None

    @property
    def flush_gives_up(self) -> bool:
        """A best-effort flush stops waiting: a retry failed too (the server is out of
        reach; the progress is kept for later), or nothing will be sent any more."""
        if self.abandoned or self.detached is not None:
            return True
        return not self.strict and self.failures >= 2 and not self.in_flight

    @property
    def has_work(self) -> bool:
        if self.in_flight or self.abandoned or self.done:
            return False
        return self.needs_start or bool(self.pending) or self.ending is not None

    def check(self) -> None:
        """Raises what the producer's next call must hear: a send error, the end, a cancel."""
        self.raise_error()
        if self.detached is not None:
            raise self.detached
        if self.closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed here")
        if self.raise_on_cancel and self.cancel_requested:
            raise OperationCancelled(f"cancellation of operation {self.id} was requested")

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def advance(
        self,
        n: int,
        *,
        total: int | None,
        message: str | None,
        details: Mapping[str, Any] | None,
        counters: Mapping[str, int] | None,
        checkpoint: str | None,
        measures: Mapping[str, float] | None = None,
    ) -> bool:
        """Adds n to completed (and to the stage's); True when the sender must be woken."""
        self.check()
        if n < 0:
            raise InvalidArgument(f"n: must not be negative (got {n})")
        self.completed += n
        stage_completed = None
        if self.stage:
            self.stage_completed += n
            stage_completed = self.stage_completed
        return self._add(
            completed=self.completed,
            stage_completed=stage_completed,
            total=total,
            message=message,
            details=details,
            counters=counters,
            checkpoint=checkpoint,
            measures=measures,
        )

    def update(
        self,
        *,
        completed: int | None,
        total: int | None,
        stage: str | None,
        stage_completed: int | None,
        stage_total: int | None,
        percent: float | None,
        message: str | None,
        details: Mapping[str, Any] | None,
        counters: Mapping[str, int] | None,
        checkpoint: str | None,
        paused: bool | None,
        pause_reason: str | None,
        measures: Mapping[str, float] | None = None,
    ) -> bool:
        """Records absolute values and counter deltas; True when the sender must be woken."""
        self.check()
        for name, value in (("completed", completed), ("stage_completed", stage_completed)):
            if value is not None and value < 0:
                raise InvalidArgument(f"{name}: must not be negative (got {value})")
        if stage is not None and stage != self.stage:
            self._check_stage(stage)
            if self.stage:
                left = {"stage": self.stage, "stage_completed": self.stage_completed}
                if "stage_total" in self.latest:
                    left["stage_total"] = self.latest["stage_total"]
                self.left = [*self.left[-(MAX_SEGMENTS - 2) :], left]
            self.stage, self.stage_completed = stage, 0
            self.latest.pop("stage_total", None)
        if completed is not None:
            self.completed = completed
        if stage_completed is not None:
            self.stage_completed = stage_completed
        return self._add(
            completed=completed,
            total=total,
            stage=stage,
            stage_completed=stage_completed,
            stage_total=stage_total,
            percent=percent,
            message=message,
            details=details,
            counters=counters,
            checkpoint=checkpoint,
            paused=paused,
            pause_reason=pause_reason,
            measures=measures,
        )

    def _check_stage(self, stage: str) -> None:
        # Checked here too, so a bug in the caller's code is heard at once even
        # while the server is out of reach.
        if not self.plan:
            return
        if stage not in self.plan:
            raise InvalidArgument(f"stage: {stage!r} is not in the stage plan {self.plan}")
        if self.stage in self.plan and self.plan.index(stage) < self.plan.index(self.stage):
            raise InvalidArgument(f"stage: {stage!r} comes before the current stage {self.stage!r}")

    _ABSOLUTE = ("total", "stage_total", "percent", "message", "checkpoint", "paused")

    def _add(self, **fields: Any) -> bool:
        counters = fields.get("counters")
        if counters:
            for key, delta in counters.items():
                if delta < 0:
                    raise InvalidArgument(f"counters: {key!r} delta must not be negative")
            for key, delta in counters.items():
                self.counters[key] = self.counters.get(key, 0) + delta
        measures = fields.get("measures")
        if measures:
            for key, value in measures.items():
                if not math.isfinite(value):
                    raise InvalidArgument(f"measures: {key!r} must be a finite number")
            self.measures.update(measures)
        for name in self._ABSOLUTE:
            value = fields.get(name)
            if value is not None:
                self.latest[name] = value
        for name in ("pause_reason", "details"):
            value = fields.get(name)
            if value is not None:
                self.latest[name] = value
        if self.abandoned:
            return False  # the operation is gone from the server: nothing more is sent
        # Only the first pending report can move the sender's next wake-up earlier;
        # waking it for every advance() would cost a context switch per call.
        wake = not self.pending
        self.pending.add(**fields)
        return wake

    def full_state(self) -> list[dict[str, Any]]:
        """Reports carrying everything reported so far: one per stage left (with its
        last progress), then the current state (counters as their totals)."""
        fields = dict(self.latest)
        if self.completed:
            fields["completed"] = self.completed
        if self.stage:
            fields["stage"] = self.stage
            fields["stage_completed"] = self.stage_completed
        if self.counters:
            fields["counters"] = dict(self.counters)
        if self.measures:
            fields["measures"] = dict(self.measures)
        return [*self.left, fields]

    def begin_flush(self) -> None:
        self.urgent = True

    def begin_finish(self, ending: Ending) -> None:
        """Marks the handle ended; what is pending is sent at once, then `ending`."""
        if self.closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed")
        self.closed = True
        self.urgent = True
        self.ending = ending
        if self.abandoned or self._skips_ending():
            self.done = True

    def _skips_ending(self) -> bool:
        # As before: complete() raises an earlier report's error instead of completing.
        return self.error is not None and isinstance(self.ending, pb.CompleteOperationRequest)

    def raise_finish_error(self, *, report_errors: bool) -> None:
        """What complete() (report_errors) or fail() raise once the ending is settled."""
        if report_errors:
            self.raise_error()
        if self.ending_error is not None:
            error, self.ending_error = self.ending_error, None
            raise error

    def acknowledge(self, response: pb.UpdateOperationResponse) -> None:
        self.rpcs += 1
        self.revision = max(self.revision, response.revision)
        self.percent = response.percent
        # A cancel request is never withdrawn; a server that lost it (a restart)
        # must not make the producer forget it.
        self.cancel_requested = self.cancel_requested or response.cancel_requested

    def registered(self, operation: pb.Operation) -> None:
        """The server answered StartOperation (a first registration or a new one)."""
        self.needs_start = False
        self.urgent = True  # its state goes out at once
        self.pending.skip_to(operation.last_sequence + 1)
        self.revision = max(self.revision, operation.revision)
        self.percent = operation.percent
        self.cancel_requested = self.cancel_requested or operation.cancel_requested
        if not self.closed:
            self.operation = operation

    def register_again(self) -> None:
        """The server no longer knows the operation: start it again, then send everything."""
        self.needs_start = True
        self.pending.reset(self.full_state())

    def abandon(self) -> None:
        """Stops reporting for good (the server deleted the operation, or refuses it)."""
        self.abandoned = True
        self.dropped = True
        self.pending = PendingReports(self.id)
        self.needs_start = False
        if self.ending is not None:
            self.done = True

    def fail(self, error: BaseException) -> None:
        # The first error is the one the producer hears (at its next call); the
        # later ones are usually its consequences.
        if self.error is None:
            self.error = error

    def next_delay(self, policy: RetryPolicy) -> float:
        if self._delays is None:
            self._delays = _forever(policy)
        return next(self._delays)

    def recovered(self) -> None:
        self.failures = 0
        self.hold_until = -math.inf
        self._delays = None
        self.warned = False


def _forever(policy: RetryPolicy) -> Iterator[float]:
    while True:
        yield from RetryPolicy(
            attempts=1_000_000,
            initial_backoff=policy.initial_backoff,
            max_backoff=policy.max_backoff,
            multiplier=policy.multiplier,
        ).delays()


class ProducerHandle:
    """What the sync and asyncio producer handles share: state, views and reporting.

    Reporting never waits on the network, so advance/update/stage/pause/resume
    are the same for both; only flush, complete and fail wait, each its own way.
    """

    def __init__(
        self,
        sender: Sender,
        operation: pb.Operation,
        spec: pb.StartOperationRequest,
        *,
        min_interval: float,
        raise_on_cancel: bool,
        streaming: bool,
        strict: bool,
        finish_timeout: float,
        online: bool = True,
        start_error: HeadwayError | None = None,
    ) -> None:
        self.id = operation.id
        self.finish_timeout = finish_timeout
        self._state = HandleState(
            operation,
            spec,
            registered=online,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            direct=not streaming,
            strict=strict,
        )
        self._sender = sender
        sender.register(self._state, start_error)

    @property
    def operation(self) -> pb.Operation:
        """The operation as the server last returned it (start, complete or fail); while
        the server has not registered it, what this handle knows (QUEUED)."""
        return self._state.operation

    @operation.setter
    def operation(self, value: pb.Operation) -> None:
        self._state.operation = value

    # What the server said, as of the last acknowledged report

    @property
    def cancel_requested(self) -> bool:
        return self._state.cancel_requested

    @property
    def revision(self) -> int:
        return self._state.revision

    @property
    def percent(self) -> float:
        return self._state.percent

    @property
    def rpcs(self) -> int:
        """Reports the server acknowledged, for the curious and the tests."""
        return self._state.rpcs

    @property
    def connected(self) -> bool:
        """The server has registered the operation and took this handle's last call;
        False while the handle keeps its state for a server out of reach."""
        return self._state.connected

    @property
    def dropped(self) -> bool:
        """Reporting stopped for good with state the server does not have: the
        operation was deleted on the server, the server refused to register it, or
        the client closed before it could deliver the ending."""
        return self._state.dropped

    @property
    def strict(self) -> bool:
        return self._state.strict

    @property
    def min_interval(self) -> float:
        return self._state.min_interval

    @min_interval.setter
    def min_interval(self, value: float) -> None:
        self._state.min_interval = value

    @property
    def raise_on_cancel(self) -> bool:
        return self._state.raise_on_cancel

    @raise_on_cancel.setter
    def raise_on_cancel(self, value: bool) -> None:
        self._state.raise_on_cancel = value

    # Reporting (never waits on the network)

    def advance(
        self,
        n: int = 1,
        *,
        total: int | None = None,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
        counters: Mapping[str, int] | None = None,
        checkpoint: str | None = None,
        measures: Mapping[str, float] | None = None,
    ) -> None:
        """Adds n to completed (and to the current stage's completed when it has a stage).

        `measures` are absolute values of named numbers (quality, cost_usd, ...).

        Raises:
            InvalidArgument: n or a counter delta is negative (at once, online or
                not), or the server rejected a report sent earlier.
            FailedPrecondition: after complete/fail, or the server says the
                operation already ended.
            OperationCancelled: with raise_on_cancel, once cancellation was requested.
            With strict=True, also what an earlier report failed with (Unavailable, ...).
        """
        with self._sender.lock:
            if self._state.advance(
                n,
                total=total,
                message=message,
                details=details,
                counters=counters,
                checkpoint=checkpoint,
                measures=measures,
            ):
                self._sender.wake()

    def update(
        self,
        *,
        completed: int | None = None,
        total: int | None = None,
        stage: str | None = None,
        stage_completed: int | None = None,
        stage_total: int | None = None,
        percent: float | None = None,
        message: str | None = None,
        details: Mapping[str, Any] | None = None,
        counters: Mapping[str, int] | None = None,
        checkpoint: str | None = None,
        paused: bool | None = None,
        pause_reason: str | None = None,
        measures: Mapping[str, float] | None = None,
    ) -> None:
        """Reports absolute values (only those given, measures included) and counter deltas.

        Raises:
            As advance; also InvalidArgument at once for a stage outside the plan
            or before the current one.
        """
        with self._sender.lock:
            if self._state.update(
                completed=completed,
                total=total,
                stage=stage,
                stage_completed=stage_completed,
                stage_total=stage_total,
                percent=percent,
                message=message,
                details=details,
                counters=counters,
                checkpoint=checkpoint,
                paused=paused,
                pause_reason=pause_reason,
                measures=measures,
            ):
                self._sender.wake()

    def stage(self, name: str, *, total: int | None = None, message: str | None = None) -> None:
        """Enters a stage (from the plan, if there is one), optionally with its own total."""
        self.update(stage=name, stage_total=total, stage_completed=0, message=message)

    def pause(self, reason: str = "") -> None:
        self.update(paused=True, pause_reason=reason)

    def resume(self) -> None:
        self.update(paused=False)


def ending_for(exc: BaseException | None) -> pb.OperationError | BaseException | None:
    """How a handle's `with` block ends the operation: None completes it, else fail(this)."""
    if exc is None:
        return None
    if isinstance(exc, OperationCancelled):
        # Acknowledges the cancel request: the operation ends CANCELLED.
        return pb.OperationError(code="CANCELLED", message=str(exc))
    return exc


class Sender(Protocol):
    """The part of a client's sender that ProducerHandle's reporting uses."""

    @property
    def lock(self) -> contextlib.AbstractContextManager[Any]: ...

    def register(self, state: HandleState, start_error: HeadwayError | None) -> None:
        """Adds a handle; `start_error` is why a best-effort start() could not register it."""

    def wake(self) -> None:
        """Tells the sender something changed; called with the lock held."""


@dataclass
class Batch:
    """The calls taken for one round of sending, each with the handle it came from."""

    # StartOperation calls of handles the server does not know (yet, or any more).
    starts: list[tuple[HandleState, pb.StartOperationRequest]] = field(default_factory=list)
    # Reports of streaming=False handles, one UpdateOperation call each.
    direct: list[tuple[HandleState, pb.UpdateOperationRequest]] = field(default_factory=list)
    # Reports sent along the shared route (a batch call, the stream, or unary calls).
    shared: list[tuple[HandleState, pb.UpdateOperationRequest]] = field(default_factory=list)
    # CompleteOperation/FailOperation calls of handles whose reports are all delivered.
    endings: list[tuple[HandleState, Ending]] = field(default_factory=list)

    @property
    def requests(self) -> list[pb.UpdateOperationRequest]:
        """Every report, direct ones first: the order the sender's results follow."""
        return [request for _, request in (*self.direct, *self.shared)]

    @property
    def states(self) -> list[HandleState]:
        items = (*self.starts, *self.direct, *self.shared, *self.endings)
        return list(dict.fromkeys(state for state, _ in items))


@dataclass(frozen=True)
class Step:
    """The sender's next move: send `batch`, or wait `wait` seconds (None: until woken), or stop."""

    batch: Batch | None = None
    wait: float | None = None
    stop: bool = False


class CallKind(Enum):
    START = "StartOperation"
    REPORTS = "reports"
    ENDING = "ending"


@dataclass
class Call:
    """One call for the sender to make: a StartOperation, reports along `route`
    (a batch, or one report on the stream or as UpdateOperation), or an ending."""

    kind: CallKind
    route: Route | None = None
    shared: bool = False  # reports along the shared route, which falls back on UNIMPLEMENTED
    start: pb.StartOperationRequest | None = None
    reports: list[pb.UpdateOperationRequest] = field(default_factory=list)
    ending: Ending | None = None


class Round:
    """One round's calls, in order (starts, reports, endings), and what each got.

    The sender loops `while (call := round.next_call()): round.record(result)`;
    a call the server's absence failed skips the rest of the round (each would
    fail alike, and with a slow server each would cost a whole deadline).
    """

    def __init__(self, scheduler: ReportScheduler, batch: Batch) -> None:
        self.scheduler = scheduler
        self.batch = batch
        self.requests = batch.requests
        self.start_results: list[pb.Operation | BaseException] = []
        self.results: list[Result] = []
        self.ending_results: list[pb.Operation | BaseException] = []
        self._call: Call | None = None
        self._skip: BaseException | None = None

    def next_call(self) -> Call | None:
        batch = self.batch
        if self._skip is not None:
            error = self._skip
            self.start_results += [error] * (len(batch.starts) - len(self.start_results))
            self.results += [error] * (len(self.requests) - len(self.results))
            self.ending_results += [error] * (len(batch.endings) - len(self.ending_results))
            return None
        call: Call | None = None
        if len(self.start_results) < len(batch.starts):
            call = Call(CallKind.START, start=batch.starts[len(self.start_results)][1])
        elif len(self.results) < len(batch.direct):
            call = Call(CallKind.REPORTS, Route.UNARY, reports=[self.requests[len(self.results)]])
        elif len(self.results) < len(self.requests):
            route, rest = self.scheduler.route, self.requests[len(self.results) :]
            reports = _within_bytes(rest[:MAX_BATCH_REPORTS]) if route is Route.BATCH else rest[:1]
            call = Call(CallKind.REPORTS, route, shared=True, reports=reports)
        elif len(self.ending_results) < len(batch.endings):
            call = Call(CallKind.ENDING, ending=batch.endings[len(self.ending_results)][1])
        self._call = call
        return call

    def record(self, result: Any) -> None:
        """What the current call returned (an Operation, or a list of acks) or raised."""
        call = self._call
        assert call is not None
        if isinstance(result, BaseException) and _code_of(result) in _LINK_DOWN:
            self._skip = result
        if call.kind is CallKind.START:
            self.start_results.append(result)
        elif call.kind is CallKind.ENDING:
            self.ending_results.append(result)
        elif not isinstance(result, BaseException):
            self.results.extend(result)
        elif call.shared and self.scheduler.fall_back(result):
            pass  # the same reports go again, by the next route
        elif call.route is Route.UNARY and (ack := rejected(call.reports[0], result)) is not None:
            self.results.append(ack)
        else:
            self.results.extend([result] * len(call.reports))
            if call.shared:
                # Later calls of this round may carry later reports of the same
                # operations: applied first, they would make these look like
                # duplicates when resent (their deltas lost). All go again.
                self._skip = result


class ReportScheduler:
    """Which calls of a client's handles go out when, and by which route.

    Pacing: a handle's reports go out at most every its min_interval. Handles
    are sent together: a round goes out no sooner than the smallest interval
    after the last paced round, and takes every handle that is due then, so
    handles started at different moments fall into step and share calls.
    A flush or an ending sends at once (taking along whoever is due).

    Outages: while the server is unreachable or too slow (UNAVAILABLE,
    DEADLINE_EXCEEDED), nothing goes out until the next attempt (exponential
    backoff with jitter, the client's RetryPolicy without its attempt limit),
    which then takes everything due. Other troubles of one operation (say, a full
    server refusing to register it) hold back that handle alone.
    """

    def __init__(self, target: str = "", backoff: RetryPolicy | None = None) -> None:
        self.target = target
        self.backoff = backoff or RetryPolicy()
        self.handles: dict[HandleState, None] = {}  # insertion-ordered set
        self.route = Route.BATCH
        self.stopped = False
        self._last_paced = -math.inf
        self.down_since: float | None = None
        self.retry_at = -math.inf
        self._delays: Iterator[float] | None = None

    @property
    def connected(self) -> bool:
        return self.down_since is None

    def register(self, state: HandleState) -> None:
        if self.stopped:
            raise FailedPrecondition("the client was closed")
        self.handles[state] = None

    def unregister(self, state: HandleState) -> None:
        self.handles.pop(state, None)

    def may_start_now(self, request: pb.StartOperationRequest) -> bool:
        """Whether a best-effort start() tries the server before returning: not while
        it is known to be out of reach, nor when the parent is a handle here that
        the server has not registered yet (it is registered first, in order)."""
        if self.down_since is not None:
            return False
        parent = self._find(request.parent_id) if request.parent_id else None
        return parent is None or not parent.needs_start

    def _find(self, operation_id: str) -> HandleState | None:
        for state in self.handles:
            if state.id == operation_id:
                return state
        return None

    def start_failed(self, state: HandleState, error: HeadwayError, now: float) -> None:
        """A best-effort start() could not register `state` before returning."""
        self._failed(state, error, now)
        if _link(error) is not None:
            self._link_down(error, now)

    def gave_up_waiting(self, state: HandleState, timeout: float) -> None:
        """complete()/fail() returned before the ending reached the server."""
        log.warning(
            "headway: operation %s not ended on %s within %.1f s; still trying in the"
            " background until the client is closed",
            state.id,
            self.target,
            timeout,
        )

    def next_step(self, now: float) -> Step:
        if self.stopped or not self.handles:
            return Step(stop=True)  # the sender ends; the next handle starts a new one
        for state in list(self.handles):
            if state.done:
                self.unregister(state)  # e.g. an ending given up without a call
        if not self.handles:
            return Step(stop=True)
        working = [state for state in self.handles if state.has_work]
        if not working:
            return Step()
        probing = self.down_since is not None
        if probing and now < self.retry_at:
            return Step(wait=self.retry_at - now)
        paced = [state for state in working if state.pending and not state.needs_start]
        floor = self._last_paced + min((s.min_interval for s in paced), default=0.0)
        due: list[HandleState] = []
        earliest = math.inf
        for state in working:
            if state.hold_until > now:
                at = state.hold_until
            elif probing or state.urgent or state.needs_start or not state.pending:
                at = now
            else:
                at = max(state.last_sent + state.min_interval, floor)
            if at <= now:
                due.append(state)
            else:
                earliest = min(earliest, at)
        if not due:
            return Step(wait=earliest - now)
        if any(state.pending and not state.urgent for state in due):
            self._last_paced = now
        batch = Batch()
        for state in due:
            if state.needs_start:
                batch.starts.append((state, state.spec))
            elif state.pending:
                requests = state.pending.take()
                state.last_sent = now
                route = batch.direct if state.direct else batch.shared
                route.extend((state, request) for request in requests)
            elif state.ending is not None:
                batch.endings.append((state, state.ending))
            else:
                continue
            state.in_flight = True
        if not batch.states:
            return self.next_step(now)
        return Step(batch=batch)

    def begin_round(self, batch: Batch) -> Round:
        return Round(self, batch)

    def settle(self, done: Round, now: float) -> None:
        """Lands every answer (or failure) of a round on its handle."""
        batch = done.batch
        link_failure: BaseException | None = None
        answered = False
        for (state, _), start in zip(batch.starts, done.start_results, strict=True):
            if isinstance(start, BaseException):
                link_failure = link_failure or _link(start)
                answered = answered or _link(start) is None
                self._failed(state, start, now)
            else:
                answered = True
                self._started(state, start)
        items = [*batch.direct, *batch.shared]
        assert len(done.results) == len(items), (len(done.results), len(items))
        failed: dict[HandleState, list[tuple[pb.UpdateOperationRequest, BaseException]]] = {}
        for (state, request), result in zip(items, done.results, strict=True):
            if isinstance(result, BaseException):
                link_failure = link_failure or _link(result)
                failed.setdefault(state, []).append((request, result))
                continue
            answered = True
            if result.error_code:
                code = STATUS_BY_NUMBER.get(result.error_code, grpc.StatusCode.UNKNOWN)
                error = ack_error(code, result.error_message, deleted=result.deleted)
                failed.setdefault(state, []).append((request, error))
            else:
                state.acknowledge(result.result)
                state.recovered()
        for state, failures in failed.items():
            self._reports_failed(state, failures, now)
        for (state, _), ending in zip(batch.endings, done.ending_results, strict=True):
            if isinstance(ending, BaseException):
                link_failure = link_failure or _link(ending)
                answered = answered or _link(ending) is None
                self._ending_failed(state, ending, now)
            else:
                answered = True
                state.operation = ending
                state.done = True
                state.recovered()
        for state in batch.states:
            state.in_flight = False
            if state.ending is not None and state._skips_ending():
                state.done = True
            if state.idle:
                state.urgent = False
            if state.done:
                self.unregister(state)
        if link_failure is not None:
            self._link_down(link_failure, now)
        elif answered:
            self._link_up(now)

    def _started(self, state: HandleState, operation: pb.Operation) -> None:
        again = state.warned
        state.registered(operation)
        state.recovered()
        if again:
            state.warned = False
            log.info("headway: operation %s is registered at %s", state.id, self.target)

    def _failed(self, state: HandleState, error: BaseException, now: float) -> None:
        """A StartOperation of `state` failed."""
        code = _code_of(error)
        if isinstance(error, OperationDeleted) and not state.strict:
            # Its parent was deleted on purpose: it stays deleted, and a child
            # of it cannot be registered.
            self._abandon(state, f"its parent was deleted on the server: {error}")
        elif code == grpc.StatusCode.NOT_FOUND:
            # Its parent is unknown: registered again first if it is a handle here.
            parent = self._find(state.spec.parent_id)
            if parent is not None and not parent.abandoned and not parent.needs_start:
                parent.register_again()
            self._hold(state, error, now)
        elif is_outage(error):
            self._hold(state, error, now)
        else:
            # The server refuses it (invalid, or the id is taken with other parameters).
            state.fail(error)
            self._abandon(state, f"the server refused to register it: {error}")

    def _reports_failed(
        self,
        state: HandleState,
        failures: list[tuple[pb.UpdateOperationRequest, BaseException]],
        now: float,
    ) -> None:
        requeue: list[pb.UpdateOperationRequest] = []
        for request, error in failures:
            code = _code_of(error)
            if isinstance(error, OperationDeleted) and not state.strict:
                self._abandon(state, "it was deleted on the server")
                return
            if code == grpc.StatusCode.NOT_FOUND and not state.strict:
                self._lost(state)
                return
            if self._keeps(state, error):
                requeue.append(request)
            else:
                state.fail(error)  # the producer hears it; the report is dropped
        if requeue:
            state.pending.requeue(requeue)
            self._hold(state, failures[0][1], now)

    def _ending_failed(self, state: HandleState, error: BaseException, now: float) -> None:
        code = _code_of(error)
        if state.strict:
            if self._keeps(state, error):
                self._hold(state, error, now)
                return
            state.ending_error = error
            state.done = True
        elif isinstance(error, OperationDeleted):
            self._abandon(state, "it was deleted on the server")
        elif code == grpc.StatusCode.NOT_FOUND:
            self._lost(state)
        elif is_outage(error):
            self._hold(state, error, now)
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            # It ended elsewhere (cancelled while queued, or finished by someone else).
            log.warning("headway: operation %s was not ended here: %s", state.id, error)
            state.done = True
        else:
            state.ending_error = error
            state.done = True

    def _keeps(self, state: HandleState, error: BaseException) -> bool:
        """Whether a failed call's work is kept to be sent again."""
        if state.strict:
            # As before best effort existed: retried for a while, then raised.
            return _code_of(error) in RETRYABLE and state.failures + 1 < REPORT_RETRY.attempts
        return is_outage(error)

    def _hold(self, state: HandleState, error: BaseException, now: float) -> None:
        """One more failed attempt for `state`: it waits its own backoff (unless the
        whole link is down, which the round's settling handles)."""
        state.failures += 1
        if _link(error) is None:
            state.hold_until = now + state.next_delay(self.backoff)
            if not state.warned and not state.strict:
                state.warned = True
                log.warning(
                    "headway: operation %s: %s; keeping its progress and retrying",
                    state.id,
                    _describe(error),
                )

    def _lost(self, state: HandleState) -> None:
        """The server does not know the operation (a restarted store): register it again."""
        state.register_again()
        state.failures += 1
        if not state.warned:
            state.warned = True
            log.warning(
                "headway: operation %s is unknown to %s (restarted?); registering it again",
                state.id,
                self.target,
            )

    def _abandon(self, state: HandleState, why: str) -> None:
        state.abandon()
        log.warning("headway: operation %s is no longer reported: %s", state.id, why)

    def _link_down(self, error: BaseException, now: float) -> None:
        if self._delays is None:
            self._delays = _forever(self.backoff)
        if self.down_since is None:
            self.down_since = now
            log.warning(
                "headway: cannot reach %s (%s); reporting resumes when it answers",
                self.target,
                _describe(error),
            )
        self.retry_at = now + next(self._delays)

    def _link_up(self, now: float) -> None:
        if self.down_since is not None:
            log.warning(
                "headway: %s answers again after %.1f s; sending the progress kept",
                self.target,
                now - self.down_since,
            )
        self.down_since = None
        self.retry_at = -math.inf
        self._delays = None

    def fall_back(self, error: BaseException) -> bool:
        """Moves to the next route when the server lacks the current one's method."""
        if _code_of(error) != grpc.StatusCode.UNIMPLEMENTED or self.route is Route.UNARY:
            return False
        self.route = Route.STREAM if self.route is Route.BATCH else Route.UNARY
        return True

    def undelivered(self) -> int:
        """Handles whose ending has not reached the server yet."""
        return sum(1 for state in self.handles if state.ending is not None and not state.done)

    def shutdown(self, error: HeadwayError) -> None:
        """The client is closing: nothing more is sent; unsent reports fail with `error`."""
        self.stopped = True
        lost = 0
        for state in self.handles:
            if state.ending is not None and not state.done and not state.strict:
                lost += 1
                state.dropped = True
            if state.pending:
                state.pending.take()
                state.fail(error)
            state.detached = error
            state.urgent = False
            state.done = True
        self.handles.clear()
        if lost:
            log.warning(
                "headway: closing with %d operation(s) not ended on %s; their last progress"
                " is lost",
                lost,
                self.target,
            )


def _link(error: BaseException) -> BaseException | None:
    """`error` if it says the server is out of reach, else None."""
    return error if _code_of(error) in _LINK_DOWN else None


def _describe(error: BaseException) -> str:
    details = error.details if isinstance(error, HeadwayError) else str(error)
    return f"{_code_of(error).name}: {details}"


def _within_bytes(
    reports: list[pb.UpdateOperationRequest], limit: int = MAX_BATCH_BYTES
) -> list[pb.UpdateOperationRequest]:
    """The longest prefix of `reports` (at least one) whose encoding fits in `limit`."""
    total = 0
    for i, report in enumerate(reports):
        total += report.ByteSize() + 8  # and the field's tag and length
        if total > limit and i > 0:
            return reports[:i]
    return reports


def batch_results(
    requests: list[pb.UpdateOperationRequest], response: pb.BatchUpdateOperationsResponse
) -> list[pb.ReportProgressResponse]:
    if len(response.results) != len(requests):
        raise HeadwayError(
            f"BatchUpdateOperations answered {len(response.results)} results"
            f" for {len(requests)} reports"
        )
    return list(response.results)


def acked(
    request: pb.UpdateOperationRequest, response: pb.UpdateOperationResponse
) -> pb.ReportProgressResponse:
    """A unary UpdateOperation's answer in the shape of a batch or stream ack."""
    return pb.ReportProgressResponse(
        sequence=request.sequence, operation_id=request.operation_id, result=response
    )


def rejected(
    request: pb.UpdateOperationRequest, error: BaseException
) -> pb.ReportProgressResponse | None:
    """The ack of a unary report the server refused; None when the call, not the report,
    failed (out of reach, the method missing), which the round handles."""
    code = _code_of(error)
    if (
        not isinstance(error, HeadwayError)
        or code in RETRYABLE
        or code == grpc.StatusCode.UNIMPLEMENTED
    ):
        return None
    return pb.ReportProgressResponse(
        sequence=request.sequence,
        operation_id=request.operation_id,
        error_code=code.value[0],
        error_message=error.details,
        deleted=isinstance(error, OperationDeleted),
    )
