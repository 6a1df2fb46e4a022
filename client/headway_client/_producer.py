"""The producer handles' shared state and decisions; _sync and _aio only wait.

Every handle of one client reports through that client's one background sender.
This module holds everything the sync (threads) and asyncio senders share: a
handle's state (HandleState), what the handles expose (ProducerHandle), which
reports go out when (ReportScheduler) and how an ack or a failure lands on its
handle. It never waits and never does I/O; callers serialise access to it (the
sync sender's lock, or the asyncio client's one event loop).

Why one sender per client: a producer with many operations in flight (the
children of a batch, or `client.start` called in a loop) would otherwise send
one call per operation per interval. The shared sender sends every due
operation's reports in one BatchUpdateOperations call instead.
"""

from __future__ import annotations

import contextlib
import math
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
    OperationCancelled,
    error_for,
    status_of,
)
from headway_client._reports import PendingReports
from headway_client._retry import RETRYABLE

# The server's limit on reports per BatchUpdateOperations call (progress.proto).
MAX_BATCH_REPORTS = 1000

# What the sender hands back for each report: its ack, or why the call carrying it failed.
Result = pb.ReportProgressResponse | BaseException


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
        *,
        min_interval: float,
        raise_on_cancel: bool,
        direct: bool,
    ) -> None:
        self.id = operation.id
        self.min_interval = min_interval
        self.raise_on_cancel = raise_on_cancel
        # streaming=False: this handle's reports go as unary UpdateOperation calls.
        self.direct = direct
        self.cancel_requested = operation.cancel_requested
        self.revision = operation.revision
        self.percent = operation.percent
        self.rpcs = 0  # reports acknowledged by the server
        self.completed = operation.completed
        self.stage = operation.stage
        self.stage_completed = 0
        self.pending = PendingReports(self.id, first_sequence=operation.last_sequence + 1)
        self.error: BaseException | None = None
        self.closed = False  # complete() or fail() began: no more reports
        self.detached: HeadwayError | None = None  # the client was closed under it
        self.in_flight = False
        self.urgent = False  # a flush or the ending waits: send without pacing
        self.last_sent = -math.inf

    @property
    def idle(self) -> bool:
        """Everything reported so far has been acknowledged (or has failed)."""
        return not self.pending and not self.in_flight

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
    ) -> bool:
        """Adds n to completed (and to the stage's); True when the sender must be woken."""
        self.check()
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
    ) -> bool:
        """Records absolute values and counter deltas; True when the sender must be woken."""
        self.check()
        if completed is not None:
            self.completed = completed
        if stage is not None and stage != self.stage:
            self.stage, self.stage_completed = stage, 0
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
        )

    def _add(self, **fields: Any) -> bool:
        # Only the first pending report can move the sender's next wake-up earlier;
        # waking it for every advance() would cost a context switch per call.
        wake = not self.pending
        self.pending.add(**fields)
        return wake

    def begin_flush(self) -> None:
        self.urgent = True

    def begin_finish(self) -> None:
        """Marks the handle ended; what is pending is sent at once, nothing more accepted."""
        if self.closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed")
        self.closed = True
        self.urgent = True

    def acknowledge(self, result: Result) -> None:
        """Applies the server's answer to one of this handle's reports."""
        if isinstance(result, BaseException):
            self._failed(result)
        elif result.error_code:
            code = STATUS_BY_NUMBER.get(result.error_code, grpc.StatusCode.UNKNOWN)
            self._failed(error_for(code, result.error_message))
        else:
            response = result.result
            self.rpcs += 1
            self.revision = max(self.revision, response.revision)
            self.percent = response.percent
            self.cancel_requested = response.cancel_requested

    def _failed(self, error: BaseException) -> None:
        # The first error is the one the producer hears (at its next call); the
        # later ones are usually its consequences.
        if self.error is None:
            self.error = error


class ProducerHandle:
    """What the sync and asyncio producer handles share: state, views and reporting.

    Reporting never waits on the network, so advance/update/stage/pause/resume
    are the same for both; only flush, complete and fail wait, each its own way.
    """

    def __init__(
        self,
        sender: Sender,
        operation: pb.Operation,
        *,
        min_interval: float,
        raise_on_cancel: bool,
        streaming: bool,
    ) -> None:
        self.id = operation.id
        self.operation = operation
        self._state = HandleState(
            operation,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            direct=not streaming,
        )
        self._sender = sender
        sender.register(self._state)

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
    ) -> None:
        """Adds n to completed (and to the current stage's completed when it has a stage).

        Raises:
            The error of a report sent earlier, FailedPrecondition after
            complete/fail, OperationCancelled with raise_on_cancel.
        """
        with self._sender.lock:
            if self._state.advance(
                n,
                total=total,
                message=message,
                details=details,
                counters=counters,
                checkpoint=checkpoint,
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
    ) -> None:
        """Reports absolute values (only those given) and counter deltas.

        Raises:
            As advance.
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

    def register(self, state: HandleState) -> None: ...

    def wake(self) -> None:
        """Tells the sender something changed; called with the lock held."""


@dataclass
class Batch:
    """Reports taken for one round of sending, each with the handle it came from."""

    # Reports of streaming=False handles, one UpdateOperation call each.
    direct: list[tuple[HandleState, pb.UpdateOperationRequest]] = field(default_factory=list)
    # Reports sent along the shared route (a batch call, the stream, or unary calls).
    shared: list[tuple[HandleState, pb.UpdateOperationRequest]] = field(default_factory=list)

    @property
    def requests(self) -> list[pb.UpdateOperationRequest]:
        """Every report, direct ones first: the order the sender's results follow."""
        return [request for _, request in (*self.direct, *self.shared)]


@dataclass(frozen=True)
class Step:
    """The sender's next move: send `batch`, or wait `wait` seconds (None: until woken), or stop."""

    batch: Batch | None = None
    wait: float | None = None
    stop: bool = False


class ReportScheduler:
    """Which reports of a client's handles go out when, and by which route.

    Pacing: a handle's reports go out at most every its min_interval. Handles
    are sent together: a round goes out no sooner than the smallest interval
    after the last paced round, and takes every handle that is due then, so
    handles started at different moments fall into step and share calls.
    A flush or an ending sends at once (taking along whoever is due).
    """

    def __init__(self) -> None:
        self.handles: dict[HandleState, None] = {}  # insertion-ordered set
        self.route = Route.BATCH
        self.stopped = False
        self._last_paced = -math.inf

    def register(self, state: HandleState) -> None:
        if self.stopped:
            raise FailedPrecondition("the client was closed")
        self.handles[state] = None

    def unregister(self, state: HandleState) -> None:
        self.handles.pop(state, None)

    def next_step(self, now: float) -> Step:
        if self.stopped or not self.handles:
            return Step(stop=True)  # the sender ends; the next handle starts a new one
        pending = [state for state in self.handles if state.pending]
        if not pending:
            return Step()
        floor = self._last_paced + min(state.min_interval for state in pending)
        due: list[HandleState] = []
        earliest = math.inf
        for state in pending:
            at = now if state.urgent else max(state.last_sent + state.min_interval, floor)
            if at <= now:
                due.append(state)
            else:
                earliest = min(earliest, at)
        if not due:
            return Step(wait=earliest - now)
        if any(not state.urgent for state in due):
            self._last_paced = now
        batch = Batch()
        for state in due:
            requests = state.pending.take()
            state.in_flight, state.last_sent = True, now
            (batch.direct if state.direct else batch.shared).extend((state, r) for r in requests)
        return Step(batch=batch)

    def settle(self, batch: Batch, results: list[Result]) -> None:
        """Lands each report's ack (or failure) on its handle; results follow batch.requests."""
        items = [*batch.direct, *batch.shared]
        assert len(results) == len(items), (len(results), len(items))
        for (state, _), result in zip(items, results, strict=True):
            state.acknowledge(result)
        for state, _ in items:
            state.in_flight = False
            if state.idle:
                state.urgent = False

    def fall_back(self, error: BaseException) -> bool:
        """Moves to the next route when the server lacks the current one's method."""
        if _code_of(error) != grpc.StatusCode.UNIMPLEMENTED or self.route is Route.UNARY:
            return False
        self.route = Route.STREAM if self.route is Route.BATCH else Route.UNARY
        return True

    def shutdown(self, error: HeadwayError) -> None:
        """The client is closing: nothing more is sent; unsent reports fail with `error`."""
        self.stopped = True
        for state in self.handles:
            if state.pending:
                state.pending.take()
                state._failed(error)
            state.detached = error
            state.urgent = False
        self.handles.clear()


def chunks(requests: list[pb.UpdateOperationRequest]) -> Iterator[list[pb.UpdateOperationRequest]]:
    """The reports split into BatchUpdateOperations calls the server accepts."""
    for start in range(0, len(requests), MAX_BATCH_REPORTS):
        yield requests[start : start + MAX_BATCH_REPORTS]


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
    failed (retries exhausted, the method missing), which fails the whole round."""
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
    )


def _code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, HeadwayError):
        return error.code
    return status_of(error)
