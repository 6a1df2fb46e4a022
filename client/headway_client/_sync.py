"""The synchronous client: HeadwayClient and the producer's OperationHandle."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from types import TracebackType
from typing import Any, TypeVar

import grpc
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

from headway_client import _common
from headway_client._errors import (
    STATUS_BY_NUMBER,
    FailedPrecondition,
    OperationCancelled,
    Unavailable,
    error_for,
    from_rpc_error,
    status_of,
)
from headway_client._reports import PendingReports
from headway_client._retry import RECONNECT, REPORT_RETRY, RetryPolicy, call_with_retry, retryable

T = TypeVar("T")
Metadata = Sequence[tuple[str, str]]


class HeadwayClient:
    """A connection to a Headway server.

    Args:
        target: "host:port" of the server.
        credentials: channel credentials for TLS; None for a plaintext channel.
        timeout: per-call deadline in seconds for unary calls.
        metadata: sent with every call (e.g. an authorization header).
        retry: how UNAVAILABLE and DEADLINE_EXCEEDED are retried.
    """

    def __init__(
        self,
        target: str = _common.DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        metadata: Metadata = (),
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.retry = retry or RetryPolicy()
        self._channel = (
            grpc.secure_channel(target, credentials)
            if credentials is not None
            else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.ProgressTrackerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> HeadwayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self, method: Callable[..., T], request: Any, *, retry: RetryPolicy | None = None
    ) -> T:
        def once() -> T:
            return method(request, timeout=self.timeout, metadata=self.metadata)

        try:
            return call_with_retry(once, retry or self.retry)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # Producers

    def start(
        self,
        *,
        kind: str = "",
        project: str = "",
        dataset: str = "",
        labels: Mapping[str, str] | None = None,
        total: int = 0,
        unit: str = "",
        stages: Sequence[_common.StageArg] = (),
        heartbeat_timeout: float | None = None,
        parent_id: str = "",
        operation_id: str = "",
        request_id: str = "",
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
    ) -> OperationHandle:
        """Starts an operation and returns the handle a producer reports through.

        Retried starts are safe: without an operation_id a request_id is
        generated, so the server returns the same operation.

        Raises:
            InvalidArgument, AlreadyExists, ResourceExhausted, Unavailable.
        """
        operation = self.start_operation(
            kind=kind,
            project=project,
            dataset=dataset,
            labels=labels,
            total=total,
            unit=unit,
            stages=stages,
            heartbeat_timeout=heartbeat_timeout,
            parent_id=parent_id,
            operation_id=operation_id,
            request_id=request_id,
        )
        return OperationHandle(
            self,
            operation,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            streaming=streaming,
        )

    def start_operation(
        self,
        *,
        kind: str = "",
        project: str = "",
        dataset: str = "",
        labels: Mapping[str, str] | None = None,
        total: int = 0,
        unit: str = "",
        stages: Sequence[_common.StageArg] = (),
        heartbeat_timeout: float | None = None,
        parent_id: str = "",
        operation_id: str = "",
        request_id: str = "",
    ) -> pb.Operation:
        """Starts an operation and returns it, without a reporting handle (e.g. for scripts)."""
        request = _common.start_request(
            kind=kind,
            project=project,
            dataset=dataset,
            labels=labels,
            total=total,
            unit=unit,
            stages=stages,
            heartbeat_timeout=heartbeat_timeout,
            parent_id=parent_id,
            operation_id=operation_id,
            request_id=request_id or _common.new_request_id(),
        )
        return self._call(self.stub.StartOperation, request)

    def track(
        self,
        iterable: Iterable[T],
        total: int | None = None,
        *,
        kind: str = "",
        project: str = "",
        unit: str = "items",
        **start_options: Any,
    ) -> Iterator[T]:
        """Yields the items of `iterable`, reporting one unit per item, like tqdm.

        The operation completes when the iterable is exhausted and fails if the
        loop raises.
        """
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        with self.start(
            kind=kind, project=project, total=total or 0, unit=unit, **start_options
        ) as op:
            for item in iterable:
                yield item
                op.advance(1)

    # Anyone

    def get(self, operation_id: str) -> pb.Operation:
        return self._call(self.stub.GetOperation, pb.GetOperationRequest(operation_id=operation_id))

    def list(self, **filter_fields: Any) -> list[pb.Operation]:
        """Every operation matching the filter fields (project=, active_only=, ...), all pages."""
        request = pb.ListOperationsRequest(
            filter=_common.operation_filter(**filter_fields), page_size=1000
        )
        operations: list[pb.Operation] = []
        while True:
            page = self._call(self.stub.ListOperations, request)
            operations.extend(page.operations)
            if not page.next_page_token:
                return operations
            request.page_token = page.next_page_token

    def cancel(self, operation_id: str, reason: str = "") -> pb.Operation:
        return self._call(
            self.stub.CancelOperation,
            pb.CancelOperationRequest(operation_id=operation_id, reason=reason),
        )

    def delete(self, operation_id: str) -> None:
        self._call(self.stub.DeleteOperation, pb.DeleteOperationRequest(operation_id=operation_id))

    def complete(
        self,
        operation_id: str,
        *,
        result: Mapping[str, Any] | None = None,
        message: str = "",
        request_id: str = "",
    ) -> pb.Operation:
        request = _common.complete_request(
            operation_id, result, message, request_id or _common.new_request_id()
        )
        return self._call(self.stub.CompleteOperation, request)

    def fail(
        self,
        operation_id: str,
        error: pb.OperationError | BaseException | str,
        *,
        request_id: str = "",
    ) -> pb.Operation:
        request = _common.fail_request(operation_id, error, request_id or _common.new_request_id())
        return self._call(self.stub.FailOperation, request)

    def report(self, request: pb.UpdateOperationRequest) -> pb.UpdateOperationResponse:
        """Sends one report as is, retrying for longer than other calls: its
        sequence makes retries safe, and a lost report would lose counter deltas."""
        return self._call(self.stub.UpdateOperation, request, retry=REPORT_RETRY)

    # Watchers

    def watch(self, operation_id: str, *, from_revision: int = 0) -> Iterator[pb.OperationEvent]:
        """Events of one operation until it ends; reconnects and resumes on UNAVAILABLE."""
        resume = _common.ResumePoint(from_revision)

        def open_stream() -> Iterator[pb.OperationEvent]:
            request = pb.WatchOperationRequest(
                operation_id=operation_id, from_revision=resume.revision
            )
            return iter(self.stub.WatchOperation(request, metadata=self.metadata))

        yield from self._resuming(open_stream, resume, lambda event: [event])

    def watch_operations(
        self, *, from_revision: int = 0, **filter_fields: Any
    ) -> Iterator[pb.OperationEvent]:
        """Events of every operation matching the filter; reconnects and resumes on UNAVAILABLE.

        Runs until the caller stops iterating (close the generator to end the stream).
        """
        resume = _common.ResumePoint(from_revision)
        where = _common.operation_filter(**filter_fields)

        def open_stream() -> Iterator[pb.WatchOperationsResponse]:
            request = pb.WatchOperationsRequest(filter=where, from_revision=resume.revision)
            return iter(self.stub.WatchOperations(request, metadata=self.metadata))

        yield from self._resuming(open_stream, resume, lambda response: response.events)

    def _resuming(
        self,
        open_stream: Callable[[], Iterator[Any]],
        resume: _common.ResumePoint,
        events_of: Callable[[Any], Iterable[pb.OperationEvent]],
    ) -> Iterator[pb.OperationEvent]:
        delays = iter(())  # type: Iterator[float]
        while True:
            stream = open_stream()
            try:
                for message in stream:
                    delays = iter(())  # a message arrived: the connection is good again
                    for event in events_of(message):
                        resume.saw(event)
                        yield event
                return
            except grpc.RpcError as exc:
                if not retryable(exc):
                    raise from_rpc_error(exc) from exc
                delay = next(delays, None)
                if delay is None:
                    delays = iter(RECONNECT.delays())
                    delay = next(delays)
                time.sleep(delay)
            finally:
                cancel = getattr(stream, "cancel", None)
                if cancel is not None:
                    cancel()


class ReportStream:
    """Reports over one ReportProgress stream, acknowledged in order.

    Falls back to unary UpdateOperation for good when the server does not
    implement the stream. A broken stream is reopened and the unacknowledged
    report resent: it keeps its sequence, so the server applies it once.
    """

    def __init__(self, client: HeadwayClient) -> None:
        self.client = client
        self.unary = False
        self._requests: queue.Queue[pb.UpdateOperationRequest | None] | None = None
        self._acks: Any = None

    def _open(self) -> None:
        requests: queue.Queue[pb.UpdateOperationRequest | None] = queue.Queue()

        def feed() -> Iterator[pb.UpdateOperationRequest]:
            while (request := requests.get()) is not None:
                yield request

        self._acks = self.client.stub.ReportProgress(feed(), metadata=self.client.metadata)
        self._requests = requests

    def send(self, request: pb.UpdateOperationRequest) -> pb.UpdateOperationResponse:
        if self.unary:
            return self.client.report(request)
        delays = REPORT_RETRY.delays()
        while True:
            try:
                if self._requests is None:
                    self._open()
                assert self._requests is not None
                self._requests.put(request)
                ack: pb.ReportProgressResponse = next(self._acks)
            except (grpc.RpcError, StopIteration) as exc:
                self.close()
                status = status_of(exc) if isinstance(exc, grpc.RpcError) else None
                if status == grpc.StatusCode.UNIMPLEMENTED:
                    self.unary = True
                    return self.client.report(request)
                delay = next(delays, None)
                if delay is None or (status is not None and not retryable(exc)):
                    if isinstance(exc, grpc.RpcError):
                        raise from_rpc_error(exc) from exc
                    raise Unavailable("the report stream ended") from None
                time.sleep(delay)
                continue
            if ack.error_code:
                code = STATUS_BY_NUMBER.get(ack.error_code, grpc.StatusCode.UNKNOWN)
                raise error_for(code, ack.error_message)
            return ack.result

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._acks.cancel()
        self._requests, self._acks = None, None


class OperationHandle:
    """A producer's handle on one operation; reports are coalesced and sent in the background.

    Use as a context manager: it completes on normal exit, and on an exception
    fails with the exception's type and message, then re-raises.
    """

    def __init__(
        self,
        client: HeadwayClient,
        operation: pb.Operation,
        *,
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
    ) -> None:
        self.client = client
        # Reports go over one ReportProgress stream unless asked otherwise.
        self._stream = ReportStream(client)
        self._stream.unary = not streaming
        self.id = operation.id
        self.operation = operation
        self.min_interval = min_interval
        self.raise_on_cancel = raise_on_cancel
        self.cancel_requested = operation.cancel_requested
        self.revision = operation.revision
        self.percent = operation.percent
        self.rpcs = 0  # UpdateOperation calls sent, for the curious and the tests
        self._completed = operation.completed
        self._stage_completed = 0
        self._stage = operation.stage
        self._pending = PendingReports(self.id, first_sequence=operation.last_sequence + 1)
        self._error: BaseException | None = None
        self._in_flight = False
        self._closed = False
        self._lock = threading.Condition()
        self._sender = threading.Thread(
            target=self._send_forever, name=f"headway-report-{self.id}", daemon=True
        )
        self._sender.start()

    # Reporting (never blocks on the network)

    def _report(self, **fields: Any) -> None:
        with self._lock:
            self._check()
            self._pending.add(**fields)
            self._lock.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed here")
        if self.raise_on_cancel and self.cancel_requested:
            raise OperationCancelled(f"cancellation of operation {self.id} was requested")

    def advance(self, n: int = 1, **fields: Any) -> None:
        """Adds n to completed (and to the current stage's completed when it has a stage)."""
        with self._lock:
            self._completed += n
            stage = {}
            if self._stage:
                self._stage_completed += n
                stage = {"stage_completed": self._stage_completed}
        self._report(completed=self._completed, **stage, **fields)

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
        """Reports absolute values (only those given) and counter deltas."""
        with self._lock:
            if completed is not None:
                self._completed = completed
            if stage is not None and stage != self._stage:
                self._stage, self._stage_completed = stage, 0
            if stage_completed is not None:
                self._stage_completed = stage_completed
        self._report(
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

    def stage(self, name: str, *, total: int | None = None, message: str | None = None) -> None:
        """Enters a stage (from the plan, if there is one), optionally with its own total."""
        self.update(stage=name, stage_total=total, stage_completed=0, message=message)

    def pause(self, reason: str = "") -> None:
        self.update(paused=True, pause_reason=reason)

    def resume(self) -> None:
        self.update(paused=False)

    # Background sending

    def _send_forever(self) -> None:
        last_sent = 0.0
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending and self._closed:
                    return
                wait = last_sent + self.min_interval - time.monotonic()
                if wait > 0 and not self._closed:
                    # Coalesce: let reports pile up until the interval has passed.
                    self._lock.wait(wait)
                    continue
                requests = self._pending.take()
                self._in_flight = True
            try:
                for request in requests:
                    self._send(request)
            except BaseException as exc:  # delivered to the producer's next call
                with self._lock:
                    self._error = exc
            finally:
                with self._lock:
                    self._in_flight = False
                    self._lock.notify_all()
                last_sent = time.monotonic()

    def _send(self, request: pb.UpdateOperationRequest) -> None:
        # A retried report keeps its sequence, so the server applies it once.
        response = self._stream.send(request)
        with self._lock:
            self.rpcs += 1
            self.revision = max(self.revision, response.revision)
            self.percent = response.percent
            self.cancel_requested = response.cancel_requested

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every report so far has been sent; raises a send error if one failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            # Wake the sender now instead of at the end of its interval.
            self._lock.notify_all()
            while self._pending or self._in_flight:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"reports of operation {self.id} not sent in time")
                self._lock.wait(0.05 if remaining is None else min(0.05, remaining))
                self._lock.notify_all()
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def _close_sender(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._sender.join()
        self._stream.close()

    # Ending

    def complete(
        self, *, result: Mapping[str, Any] | None = None, message: str = ""
    ) -> pb.Operation:
        """Sends what is pending, then completes the operation (safe to retry)."""
        self._finish_reports()
        self.operation = self.client.complete(self.id, result=result, message=message)
        return self.operation

    def fail(self, error: pb.OperationError | BaseException | str) -> pb.Operation:
        """Sends what is pending, then fails the operation; CANCELLED acknowledges a cancel."""
        self._finish_reports(raise_errors=False)
        self.operation = self.client.fail(self.id, error)
        return self.operation

    def _finish_reports(self, *, raise_errors: bool = True) -> None:
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"operation {self.id} was already completed or failed")
        self._close_sender()
        if self._error is not None and raise_errors:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> OperationHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        if exc is None:
            self.complete()
        elif isinstance(exc, OperationCancelled):
            self.fail(pb.OperationError(code="CANCELLED", message=str(exc)))
        else:
            self.fail(exc)
