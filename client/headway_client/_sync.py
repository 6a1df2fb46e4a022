"""The synchronous client: HeadwayClient and the producer's OperationHandle."""

from __future__ import annotations

import logging
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
    FINISH_TIMEOUT,
    Call,
    CallKind,
    Ending,
    HandleState,
    ProducerHandle,
    ReportScheduler,
    Round,
    Route,
    StartPlan,
    acked,
    batch_results,
    ending_for,
)
from headway_client._retry import (
    ONCE,
    RECONNECT,
    REPORT_RETRY,
    RetryPolicy,
    call_with_retry,
    retryable,
)

T = TypeVar("T")
Metadata = Sequence[tuple[str, str]]
log = logging.getLogger("headway_client")


class HeadwayClient:
    """A connection to a Headway server.

    Args:
        target: "host:port" of the server.
        credentials: channel credentials for TLS; None for a plaintext channel.
        timeout: per-call deadline in seconds for unary calls.
        metadata: sent with every call (e.g. an authorization header).
        retry: how UNAVAILABLE and DEADLINE_EXCEEDED are retried (producer handles
            retry in the background with its backoff, without its attempt limit).
        strict: producer handles raise when the tracker fails (server unreachable,
            slow, restarted) instead of keeping their progress for later; a
            handle can override it (`start(strict=...)`).
        finish_timeout: seconds a best-effort complete()/fail() waits for the
            ending to reach the server (and start() for the server to answer)
            before the job goes on without it.
    """

    def __init__(
        self,
        target: str = _common.DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        metadata: Metadata = (),
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retry: RetryPolicy | None = None,
        strict: bool = False,
        finish_timeout: float = FINISH_TIMEOUT,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = _common.with_token(metadata, token)
        credentials = credentials or _common.tls_credentials(tls_ca, tls_cert, tls_key)
        self.retry = retry or RetryPolicy()
        self.strict = strict
        self.finish_timeout = finish_timeout
        options = _common.channel_options(self.retry)
        self._channel = (
            grpc.secure_channel(_common.channel_target(target), credentials, options)
            if credentials is not None
            else grpc.insecure_channel(_common.channel_target(target), options)
        )
        self.stub = pb_grpc.ProgressTrackerStub(self._channel)
        # One sender for every handle this client starts: it batches their reports.
        self._reports = ReportSender(self)

    def close(self) -> None:
        """Closes the channel; reports not sent yet fail their handles.

        Endings not delivered yet get up to finish_timeout while the server
        answers; then they are dropped, with one warning.
        """
        self._reports.close()
        self._channel.close()
        self._reports.join()

    def __enter__(self) -> HeadwayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """False while the background sender finds the server unreachable or too slow."""
        with self._reports.lock:
            return self._reports.core.connected

    def _call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> T:
        deadline = self.timeout if timeout is None else timeout

        def once() -> T:
            return method(request, timeout=deadline, metadata=self.metadata)

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
        measures: Mapping[str, str] | None = None,
        alert_rules: Mapping[str, Mapping[str, float]] | None = None,
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
        strict: bool | None = None,
    ) -> OperationHandle:
        """Starts an operation and returns the handle a producer reports through.

        `measures` declares how measures combine in roll-ups and statistics
        ({"cost_usd": "sum", "quality": "mean"}; undeclared ones are "last"), and
        `alert_rules` raises MEASURE_THRESHOLD alerts ({"quality": {"below": 0.8}}).
        Retried starts are safe: the operation has an id (chosen here unless
        given; with strict=True or a request_id, by the server), or a request_id.
        Best effort (the default): when the server does not answer within
        min(timeout, finish_timeout) seconds, or is already known to be down, the
        handle is returned anyway and registers the operation once the server answers.

        Raises:
            InvalidArgument, AlreadyExists: the request is wrong (in every mode).
            With strict=True, also ResourceExhausted, Unavailable, DeadlineExceeded.
        """
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
            measures=measures,
            alert_rules=alert_rules,
        )
        with self._reports.lock:
            plan = StartPlan.of(
                self._reports.core,
                request,
                strict=self.strict if strict is None else strict,
                caller_request_id=bool(request_id),
            )
        if plan.try_now:
            try:
                if plan.strict:
                    plan.operation = self._call(self.stub.StartOperation, request)
                else:
                    wait = min(self.timeout, self.finish_timeout)
                    plan.operation = self._call(
                        self.stub.StartOperation, request, retry=ONCE, timeout=wait
                    )
            except HeadwayError as exc:
                plan.failed(exc)
        return OperationHandle(
            self,
            plan.result(),
            request,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            streaming=streaming,
            strict=plan.strict,
            online=plan.online,
            start_error=plan.error,
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
        measures: Mapping[str, str] | None = None,
        alert_rules: Mapping[str, Mapping[str, float]] | None = None,
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
            measures=measures,
            alert_rules=alert_rules,
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
        loop raises. Best effort unless strict: the tracker never breaks the loop.
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

    def watch(
        self, operation_id: str, *, from_revision: int = 0, from_epoch: str = ""
    ) -> Iterator[pb.OperationEvent]:
        """Events of one operation until it ends; reconnects and resumes on UNAVAILABLE.

        Args:
            operation_id: The operation to follow.
            from_revision: Resume after this revision instead of starting with a
                SNAPSHOT (0).
            from_epoch: The epoch `from_revision` belongs to (the `epoch` of the
                latest event that carried one); a server in another epoch answers
                RESET and a SNAPSHOT. Empty: the revision is trusted as is.
        """
        resume = _common.ResumePoint(from_revision, from_epoch)

        def open_stream() -> Iterator[pb.OperationEvent]:
            request = resume.watch_operation(operation_id)
            return iter(self.stub.WatchOperation(request, metadata=self.metadata))

        yield from self._resuming(open_stream, resume, lambda event: [event])

    def watch_operations(
        self, *, from_revision: int = 0, from_epoch: str = "", **filter_fields: Any
    ) -> Iterator[pb.OperationEvent]:
        """Events of every operation matching the filter; reconnects and resumes on UNAVAILABLE.

        Runs until the caller stops iterating (close the generator to end the stream).
        `from_revision` and `from_epoch` resume from a saved position, as for watch().
        """
        resume = _common.ResumePoint(from_revision, from_epoch)
        where = _common.operation_filter(**filter_fields)

        def open_stream() -> Iterator[pb.WatchOperationsResponse]:
            request = resume.watch_operations(where)
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

    A broken stream is reopened and the unacknowledged report resent once: it
    keeps its sequence, so the server applies it once. Beyond that the error is
    raised (as a HeadwayError) for the sender's round: UNIMPLEMENTED makes it
    fall back to unary calls, an outage makes it retry later with backoff.
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
        while True:
            fresh = self._requests is None
            try:
                if self._requests is None:
                    self._open()
                assert self._requests is not None
                self._requests.put(request)
                ack: pb.ReportProgressResponse = next(self._acks)
            except (grpc.RpcError, StopIteration) as exc:
                self.close()
                if not fresh:
                    continue  # a stream the server ended earlier (e.g. on restart): reopen once
                if isinstance(exc, grpc.RpcError):
                    raise from_rpc_error(exc) from exc
                raise Unavailable("the report stream ended") from None
            return ack

    def close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._acks.cancel()
        self._requests, self._acks = None, None


class ReportSender:
    """The one background thread that makes the calls of all of a client's handles.

    The decisions (what is due, routes, answers, outages) are in _producer; this
    class only waits, on one Condition shared by the thread and every handle,
    and makes each call the round asks for. The thread starts with the first
    handle and ends when none is left.
    """

    def __init__(self, client: HeadwayClient) -> None:
        self.client = client
        self.core = ReportScheduler(client.target, backoff=client.retry)
        self.lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def register(self, state: HandleState, start_error: HeadwayError | None) -> None:
        with self.lock:
            self.core.register(state)
            if start_error is not None:
                self.core.start_failed(state, start_error, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(ReportStream(self.client),), daemon=True
                )
                self._thread.name = f"headway-reports-{id(self):x}"
                self._thread.start()
            self.lock.notify_all()

    def wake(self) -> None:
        self.lock.notify_all()

    def flush(self, state: HandleState, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while not state.idle and not state.flush_gives_up:
                state.begin_flush()  # sent at once, not at the end of its interval
                self.lock.notify_all()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if state.strict:
                        raise TimeoutError(f"reports of operation {state.id} not sent in time")
                    break
                self.lock.wait(remaining)
            state.raise_error()
            return state.delivered

    def finish(
        self, state: HandleState, ending: Ending, *, timeout: float, report_errors: bool
    ) -> None:
        with self.lock:
            if state.detached is not None:
                raise state.detached
            state.begin_finish(ending)
            self.lock.notify_all()
            deadline = None if state.strict else time.monotonic() + timeout
            while not state.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self.core.gave_up_waiting(state, timeout)
                    return
                self.lock.wait(remaining)
            self.lock.notify_all()  # the thread ends when this was the last handle
            state.raise_finish_error(report_errors=report_errors)

    def close(self) -> None:
        """Stops sending: reports not sent yet fail their handles. Call before closing
        the channel, then join()."""
        with self.lock:
            deadline = time.monotonic() + self.client.finish_timeout
            while self.core.undelivered() and self.core.connected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.lock.wait(remaining)
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
                            self.lock.notify_all()
                            return
                        self.lock.wait(step.wait)
                        step = self.core.next_step(time.monotonic())
                    round_ = self.core.begin_round(step.batch)
                self._deliver(round_, stream)
                with self.lock:
                    self.core.settle(round_, time.monotonic())
                    self.lock.notify_all()
        finally:
            stream.close()

    def _deliver(self, round_: Round, stream: ReportStream) -> None:
        """Makes the round's calls; each one's answer, or what it raised, goes back to it."""
        while (call := round_.next_call()) is not None:
            try:
                result: Any = self._send(call, stream)
            except Exception as exc:
                result = exc
            round_.record(result)

    def _send(self, call: Call, stream: ReportStream) -> Any:
        client, stub = self.client, self.client.stub
        # One attempt each: the round is retried whole, with backoff, by the scheduler.
        if call.kind is CallKind.START:
            return client._call(stub.StartOperation, call.start, retry=ONCE)
        if call.kind is CallKind.ENDING:
            if isinstance(call.ending, pb.CompleteOperationRequest):
                return client._call(stub.CompleteOperation, call.ending, retry=ONCE)
            return client._call(stub.FailOperation, call.ending, retry=ONCE)
        reports = call.reports
        if call.route is Route.BATCH:
            # Safe to retry whole: reports keep their sequence, so those the server
            # already applied come back applied=false and add nothing.
            request = pb.BatchUpdateOperationsRequest(updates=reports)
            response = client._call(stub.BatchUpdateOperations, request, retry=ONCE)
            return batch_results(reports, response)
        if call.route is Route.STREAM:
            return [stream.send(reports[0])]
        return [acked(reports[0], client._call(stub.UpdateOperation, reports[0], retry=ONCE))]


class OperationHandle(ProducerHandle):
    """A producer's handle on one operation; reports are coalesced and sent in the background.

    Use as a context manager: it completes on normal exit, and on an exception
    fails with the exception's type and message, then re-raises it unchanged.
    Best effort unless strict: see HeadwayClient.
    """

    def __init__(
        self,
        client: HeadwayClient,
        operation: pb.Operation,
        spec: pb.StartOperationRequest | None = None,
        *,
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
        strict: bool | None = None,
        online: bool = True,
        start_error: HeadwayError | None = None,
    ) -> None:
        self.client = client
        self._reports = client._reports
        super().__init__(
            client._reports,
            operation,
            spec or pb.StartOperationRequest(operation_id=operation.id),
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            streaming=streaming,
            strict=client.strict if strict is None else strict,
            finish_timeout=client.finish_timeout,
            online=online,
            start_error=start_error,
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Sends every report so far at once and waits until the server has them.

        Best effort: waits at most `timeout` (default finish_timeout) seconds, and
        no longer once a retry failed too (the server is out of reach: the
        progress is kept for later). Returns whether everything was delivered.

        Raises:
            A report's rejection (e.g. InvalidArgument). With strict=True, also
            its failure (Unavailable, ...), and TimeoutError when not all was sent
            within `timeout` seconds (default: no limit).
        """
        if timeout is None and not self.strict:
            timeout = self.finish_timeout
        return self._reports.flush(self._state, timeout)

    # Ending

    def complete(
        self, *, result: Mapping[str, Any] | None = None, message: str = ""
    ) -> pb.Operation:
        """Sends what is pending, then completes the operation (safe to retry).

        Best effort: returns after finish_timeout seconds at most; an ending the
        server has not taken by then is still sent in the background until the
        client is closed (one warning). Returns the operation as the server
        answered, or as last known here.

        Raises:
            A report's rejection (e.g. InvalidArgument), or the ending's. With
            strict=True, also Unavailable, DeadlineExceeded, OperationNotFound, ...
        """
        request = _common.complete_request(self.id, result, message, _common.new_request_id())
        self._reports.finish(self._state, request, timeout=self.finish_timeout, report_errors=True)
        return self.operation

    def fail(self, error: pb.OperationError | BaseException | str) -> pb.Operation:
        """Sends what is pending, then fails the operation; CANCELLED acknowledges a cancel.

        Waits and raises as complete(), except for earlier reports' rejections.
        """
        request = _common.fail_request(self.id, error, _common.new_request_id())
        self._reports.finish(self._state, request, timeout=self.finish_timeout, report_errors=False)
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
            return
        try:
            self.fail(ending)
        except HeadwayError as failure:
            if self.strict:
                raise
            # The job's own exception goes on unchanged.
            log.warning("headway: operation %s: could not record its failure: %s", self.id, failure)
