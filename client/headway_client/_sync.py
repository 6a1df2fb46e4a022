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
    FailedPrecondition,
    HeadwayError,
    Unavailable,
    from_rpc_error,
)
from headway_client._producer import (
    MAX_BATCH_REPORTS,
    Batch,
    HandleState,
    ProducerHandle,
    ReportScheduler,
    Result,
    Route,
    acked,
    batch_results,
    ending_for,
    rejected,
)
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
        # One sender for every handle this client starts: it batches their reports.
        self._reports = ReportSender(self)

    def close(self) -> None:
        """Closes the channel; reports not sent yet fail their handles."""
        self._reports.close()
        self._channel.close()
        self._reports.join()

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

    A broken stream is reopened and the unacknowledged report resent: it keeps
    its sequence, so the server applies it once. UNIMPLEMENTED is raised (as a
    HeadwayError) for the sender to fall back to unary calls.
    """

    def __init__(self, client: HeadwayClient) -> None:
        self.client = client
        self._requests: queue.Queue[pb.UpdateOperationRequest | None] | None = None
        self._acks: Any = None

    def _open(self) -> None:
        requests: queue.Queue[pb.UpdateOperationRequest | None] = queue.Queue()

        def feed() -> Iterator[pb.UpdateOperationRequest]:
            while (request := requests.get()) is not None:
                yield request

        self._acks = self.client.stub.ReportProgress(feed(), metadata=self.client.metadata)
        self._requests = requests

    def send(self, request: pb.UpdateOperationRequest) -> pb.ReportProgressResponse:
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
                delay = next(delays, None)
                if isinstance(exc, grpc.RpcError) and (delay is None or not retryable(exc)):
                    raise from_rpc_error(exc) from exc
                if delay is None:
                    raise Unavailable("the report stream ended") from None
                time.sleep(delay)
                continue
            return ack

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._acks.cancel()
        self._requests, self._acks = None, None


class ReportSender:
    """The one background thread that sends the reports of all of a client's handles.

    The decisions (what is due, routes, acks) are in _producer; this class only
    waits, on one Condition shared by the thread and every handle. The thread
    starts with the first handle and ends when none is left.
    """

    def __init__(self, client: HeadwayClient) -> None:
        self.client = client
        self.core = ReportScheduler()
        self.lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def register(self, state: HandleState) -> None:
        with self.lock:
            self.core.register(state)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(ReportStream(self.client),), daemon=True
                )
                self._thread.name = f"headway-reports-{id(self):x}"
                self._thread.start()

    def wake(self) -> None:
        self.lock.notify_all()

    def flush(self, state: HandleState, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while not state.idle:
                state.begin_flush()  # sent at once, not at the end of its interval
                self.lock.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"reports of operation {state.id} not sent in time")
                self.lock.wait(remaining)
            state.raise_error()

    def finish(self, state: HandleState, *, raise_errors: bool) -> None:
        with self.lock:
            state.begin_finish()
            self.lock.notify_all()
            while not state.idle:
                self.lock.wait()
            self.core.unregister(state)
            self.lock.notify_all()  # the thread ends when this was the last handle
            if raise_errors:
                state.raise_error()

    def close(self) -> None:
        """Stops sending: reports not sent yet fail their handles. Call before closing
        the channel, then join()."""
        with self.lock:
            self.core.shutdown(FailedPrecondition("the client was closed"))
            self.lock.notify_all()

    def join(self, timeout: float = 5.0) -> None:
        with self.lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, stream: ReportStream) -> None:
        try:
            while True:
                with self.lock:
                    step = self.core.next_step(time.monotonic())
                    while step.batch is None:
                        if step.stop:
                            self._thread = None
                            return
                        self.lock.wait(step.wait)
                        step = self.core.next_step(time.monotonic())
                    batch = step.batch
                results = self._deliver(batch, stream)
                with self.lock:
                    self.core.settle(batch, results)
                    self.lock.notify_all()
        finally:
            stream.close()

    def _deliver(self, batch: Batch, stream: ReportStream) -> list[Result]:
        """Sends one round; each report's ack, or the error of the call that carried it."""
        requests = batch.requests
        results: list[Result] = []
        try:
            for request in requests[: len(batch.direct)]:
                results.append(self._unary(request))
            while len(results) < len(requests):
                route, rest = self.core.route, requests[len(results) :]
                try:
                    if route is Route.BATCH:
                        results.extend(self._batch(rest[:MAX_BATCH_REPORTS]))
                    elif route is Route.STREAM:
                        results.append(stream.send(rest[0]))
                    else:
                        results.append(self._unary(rest[0]))
                except HeadwayError as exc:
                    if not self.core.fall_back(exc):
                        raise
        except Exception as exc:  # the call failed for good: so did every report not acked
            results.extend([exc] * (len(requests) - len(results)))
        return results

    def _batch(self, requests: list[pb.UpdateOperationRequest]) -> list[pb.ReportProgressResponse]:
        # Safe to retry whole: reports keep their sequence, so those the server
        # already applied come back applied=false and add nothing.
        request = pb.BatchUpdateOperationsRequest(updates=requests)
        client = self.client
        response = client._call(client.stub.BatchUpdateOperations, request, retry=REPORT_RETRY)
        return batch_results(requests, response)

    def _unary(self, request: pb.UpdateOperationRequest) -> pb.ReportProgressResponse:
        try:
            return acked(request, self.client.report(request))
        except HeadwayError as exc:
            ack = rejected(request, exc)
            if ack is None:
                raise
            return ack


class OperationHandle(ProducerHandle):
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
        self._reports = client._reports
        super().__init__(
            client._reports,
            operation,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            streaming=streaming,
        )

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every report so far has been sent; raises a send error if one failed.

        Raises:
            TimeoutError: not all sent within `timeout` seconds.
        """
        self._reports.flush(self._state, timeout)

    # Ending

    def complete(
        self, *, result: Mapping[str, Any] | None = None, message: str = ""
    ) -> pb.Operation:
        """Sends what is pending, then completes the operation (safe to retry)."""
        self._reports.finish(self._state, raise_errors=True)
        self.operation = self.client.complete(self.id, result=result, message=message)
        return self.operation

    def fail(self, error: pb.OperationError | BaseException | str) -> pb.Operation:
        """Sends what is pending, then fails the operation; CANCELLED acknowledges a cancel."""
        self._reports.finish(self._state, raise_errors=False)
        self.operation = self.client.fail(self.id, error)
        return self.operation

    def __enter__(self) -> OperationHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state.closed:
            return
        ending = ending_for(exc)
        if ending is None:
            self.complete()
        else:
            self.fail(ending)
