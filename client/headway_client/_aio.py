"""The asyncio client: AsyncHeadwayClient and AsyncOperationHandle, parallel to _sync."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
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
    error_for,
    from_rpc_error,
    status_of,
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
    acall_with_retry,
    retryable,
)

T = TypeVar("T")
log = logging.getLogger("headway_client")
_JOIN_TIMEOUT = 5.0  # seconds close() waits for the sender task


class AsyncHeadwayClient:
    """An asyncio connection to a Headway server; same options (and the same
    best-effort policy for producer handles) as HeadwayClient."""

    def __init__(
        self,
        target: str = _common.DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] = (),
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
            grpc.aio.secure_channel(_common.channel_target(target), credentials, options)
            if credentials is not None
            else grpc.aio.insecure_channel(_common.channel_target(target), options)
        )
        self.stub: Any = pb_grpc.ProgressTrackerStub(self._channel)
        # One sender for every handle this client starts: it batches their reports.
        self._reports = AsyncReportSender(self)

    async def close(self) -> None:
        """Closes the channel; reports not sent yet fail their handles (endings get
        up to finish_timeout while the server answers, as HeadwayClient.close)."""
        await self._reports.close()
        await self._channel.close(None)
        await self._reports.join()

    async def __aenter__(self) -> AsyncHeadwayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """False while the background sender finds the server unreachable or too slow."""
        return self._reports.core.connected

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        request: Any,
        *,
        retry: RetryPolicy | None = None,
        deadline: float | None = None,
    ) -> T:
        deadline = self.timeout if deadline is None else deadline

        def once() -> Awaitable[T]:
            return method(request, timeout=deadline, metadata=self.metadata)

        try:
            return await acall_with_retry(once, retry or self.retry)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    async def start(
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
    ) -> AsyncOperationHandle:
        """Starts an operation; see HeadwayClient.start."""
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
        plan = StartPlan.of(
            self._reports.core,
            request,
            strict=self.strict if strict is None else strict,
            caller_request_id=bool(request_id),
        )
        if plan.try_now:
            try:
                if plan.strict:
                    plan.operation = await self._call(self.stub.StartOperation, request)
                else:
                    wait = min(self.timeout, self.finish_timeout)
                    plan.operation = await self._call(
                        self.stub.StartOperation, request, retry=ONCE, deadline=wait
                    )
            except HeadwayError as exc:
                plan.failed(exc)
        return AsyncOperationHandle(
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

    async def track(
        self,
        iterable: Iterable[T] | AsyncIterable[T],
        total: int | None = None,
        *,
        kind: str = "",
        project: str = "",
        unit: str = "items",
        **start_options: Any,
    ) -> AsyncIterator[T]:
        """Yields the items of a (sync or async) iterable, reporting one unit per
        item, like tqdm: `async for row in client.track(rows, kind="export")`.

        The operation completes when the iterable is exhausted and fails if the
        loop raises.
        """
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        op = await self.start(
            kind=kind, project=project, total=total or 0, unit=unit, **start_options
        )
        async with op:
            if isinstance(iterable, AsyncIterable):
                async for item in iterable:
                    yield item
                    op.advance(1)
            else:
                for item in iterable:
                    yield item
                    op.advance(1)

    async def get(self, operation_id: str) -> pb.Operation:
        request = pb.GetOperationRequest(operation_id=operation_id)
        return await self._call(self.stub.GetOperation, request)

    async def list(self, **filter_fields: Any) -> list[pb.Operation]:
        request = pb.ListOperationsRequest(
            filter=_common.operation_filter(**filter_fields), page_size=1000
        )
        operations: list[pb.Operation] = []
        while True:
            page = await self._call(self.stub.ListOperations, request)
            operations.extend(page.operations)
            if not page.next_page_token:
                return operations
            request.page_token = page.next_page_token

    async def cancel(self, operation_id: str, reason: str = "") -> pb.Operation:
        request = pb.CancelOperationRequest(operation_id=operation_id, reason=reason)
        return await self._call(self.stub.CancelOperation, request)

    async def delete(self, operation_id: str) -> None:
        request = pb.DeleteOperationRequest(operation_id=operation_id)
        await self._call(self.stub.DeleteOperation, request)

    async def complete(
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
        return await self._call(self.stub.CompleteOperation, request)

    async def fail(
        self,
        operation_id: str,
        error: pb.OperationError | BaseException | str,
        *,
        request_id: str = "",
    ) -> pb.Operation:
        request = _common.fail_request(operation_id, error, request_id or _common.new_request_id())
        return await self._call(self.stub.FailOperation, request)

    async def report(self, request: pb.UpdateOperationRequest) -> pb.UpdateOperationResponse:
        return await self._call(self.stub.UpdateOperation, request, retry=REPORT_RETRY)

    def watch(
        self, operation_id: str, *, from_revision: int = 0, from_epoch: str = ""
    ) -> AsyncIterator[pb.OperationEvent]:
        """Events of one operation until it ends; reconnects and resumes on UNAVAILABLE.

        `from_revision` and `from_epoch` resume from a saved position, as in
        HeadwayClient.watch.
        """
        resume = _common.ResumePoint(from_revision, from_epoch)

        def open_stream() -> Any:
            request = resume.watch_operation(operation_id)
            return self.stub.WatchOperation(request, metadata=self.metadata)

        return self._resuming(open_stream, resume, lambda event: [event])

    def watch_operations(
        self, *, from_revision: int = 0, from_epoch: str = "", **filter_fields: Any
    ) -> AsyncIterator[pb.OperationEvent]:
        """Events of every matching operation; reconnects and resumes on UNAVAILABLE.

        `from_revision` and `from_epoch` resume from a saved position, as in
        HeadwayClient.watch.
        """
        resume = _common.ResumePoint(from_revision, from_epoch)
        where = _common.operation_filter(**filter_fields)

        def open_stream() -> Any:
            request = resume.watch_operations(where)
            return self.stub.WatchOperations(request, metadata=self.metadata)

        return self._resuming(open_stream, resume, lambda response: response.events)

    async def _resuming(
        self,
        open_stream: Callable[[], Any],
        resume: _common.ResumePoint,
        events_of: Callable[[Any], Any],
    ) -> AsyncIterator[pb.OperationEvent]:
        delays = RECONNECT.delays()
        while True:
            call = open_stream()
            try:
                async for message in call:
                    delays = RECONNECT.delays()
                    for event in events_of(message):
                        resume.saw(event)
                        yield event
                return
            except grpc.RpcError as exc:
                if not retryable(exc):
                    raise from_rpc_error(exc) from exc
                await asyncio.sleep(next(delays))
            finally:
                call.cancel()


class AsyncReportStream:
    """Reports over one ReportProgress stream; see _sync.ReportStream."""

    def __init__(self, client: AsyncHeadwayClient) -> None:
        self.client = client
        self._call: Any = None

    async def send(self, request: pb.UpdateOperationRequest) -> pb.ReportProgressResponse:
        stillborn = 0  # calls that ended before their first report could be written
        while True:
            fresh = self._call is None
            try:
                if self._call is None:
                    self._call = self.client.stub.ReportProgress(metadata=self.client.metadata)
                await self._call.write(request)
                async with asyncio.timeout(self.client.timeout):
                    ack = await self._call.read()
                if ack is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise EOFError("the report stream ended")
            except (grpc.RpcError, EOFError, TimeoutError) as exc:
                await self.close()
                if isinstance(exc, TimeoutError):
                    raise error_for(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "no ack on the report stream"
                    ) from None
                code = status_of(exc) if isinstance(exc, grpc.RpcError) else None
                if fresh and code == grpc.StatusCode.INTERNAL:
                    # A write racing the server's immediate end of the call (as
                    # UNIMPLEMENTED is sent) fails with INTERNAL "Internal error
                    # from Core", and grpc.aio then reports INTERNAL as the call's
                    # status, losing the server's. Twice in a row: treat the stream
                    # as unusable, so the sender falls back to unary calls (which
                    # report any real error plainly).
                    stillborn += 1
                    if stillborn < 2:
                        continue
                    raise error_for(
                        grpc.StatusCode.UNIMPLEMENTED, "ReportProgress calls end before a report"
                    ) from exc
                if not fresh:
                    continue  # a stream the server ended earlier (e.g. on restart): reopen once
                if isinstance(exc, grpc.RpcError):
                    raise from_rpc_error(exc) from exc
                raise Unavailable(str(exc)) from None
            result: pb.ReportProgressResponse = ack
            return result

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
            call.cancel()


class AsyncReportSender:
    """The one task that makes the calls of all of a client's handles; see
    _sync.ReportSender. Everything runs on the client's event loop, so there is
    no lock: the handles set an Event to wake the task, and wait for the next
    settled round on another."""

    def __init__(self, client: AsyncHeadwayClient) -> None:
        self.client = client
        self.core = ReportScheduler(client.target, backoff=client.retry)
        self.lock = contextlib.nullcontext()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # until they have closed their stream

    def register(self, state: HandleState, start_error: HeadwayError | None) -> None:
        self.core.register(state)
        if start_error is not None:
            self.core.start_failed(state, start_error, time.monotonic())
        if self._task is None:
            task = asyncio.get_running_loop().create_task(
                self._run(AsyncReportStream(self.client)), name=f"headway-reports-{id(self):x}"
            )
            self._task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def _next_round(self) -> None:
        """Returns once the sender has settled another round (or has stopped)."""
        await self._settled.wait()

    async def flush(self, state: HandleState, wait: float | None) -> bool:
        try:
            async with asyncio.timeout(wait):
                while not state.idle and not state.flush_gives_up:
                    state.begin_flush()  # sent at once, not at the end of its interval
                    self.wake()
                    await self._next_round()
        except TimeoutError:
            if state.strict:
                raise TimeoutError(f"reports of operation {state.id} not sent in time") from None
        state.raise_error()
        return state.delivered

    async def finish(
        self, state: HandleState, ending: Ending, *, wait: float, report_errors: bool
    ) -> None:
        if state.detached is not None:
            raise state.detached
        state.begin_finish(ending)
        self.wake()
        try:
            async with asyncio.timeout(None if state.strict else wait):
                while not state.done:
                    await self._next_round()
        except TimeoutError:
            self.core.gave_up_waiting(state, wait)
            return
        self.wake()  # the task ends when this was the last handle
        state.raise_finish_error(report_errors=report_errors)

    async def close(self) -> None:
        """Stops sending: reports not sent yet fail their handles. Then close the
        channel and await join()."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.client.finish_timeout):
                while self.core.undelivered() and self.core.connected and self._task is not None:
                    await self._next_round()
        self.core.shutdown(FailedPrecondition("the client was closed"))
        self.wake()

    async def join(self) -> None:
        tasks = set(self._tasks)
        if tasks:
            # A round in progress ends once it finds the channel closed.
            _, late = await asyncio.wait(tasks, timeout=_JOIN_TIMEOUT)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)

    def _signal_round(self) -> None:
        settled, self._settled = self._settled, asyncio.Event()
        settled.set()

    async def _run(self, stream: AsyncReportStream) -> None:
        try:
            while True:
                step = self.core.next_step(time.monotonic())
                if step.stop:
                    self._task = None
                    return
                if step.batch is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step.wait):
                            await self._wake.wait()
                    continue
                round_ = self.core.begin_round(step.batch)
                await self._deliver(round_, stream)
                self.core.settle(round_, time.monotonic())
                self._signal_round()
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            self._signal_round()  # no waiter is left behind if the task ends early
            await stream.close()

    async def _deliver(self, round_: Round, stream: AsyncReportStream) -> None:
        """Makes the round's calls; see _sync.ReportSender._deliver."""
        while (call := round_.next_call()) is not None:
            try:
                result: Any = await self._send(call, stream)
            except Exception as exc:
                result = exc
            round_.record(result)

    async def _send(self, call: Call, stream: AsyncReportStream) -> Any:
        client, stub = self.client, self.client.stub
        # One attempt each: the round is retried whole, with backoff, by the scheduler.
        if call.kind is CallKind.START:
            return await client._call(stub.StartOperation, call.start, retry=ONCE)
        if call.kind is CallKind.ENDING:
            if isinstance(call.ending, pb.CompleteOperationRequest):
                return await client._call(stub.CompleteOperation, call.ending, retry=ONCE)
            return await client._call(stub.FailOperation, call.ending, retry=ONCE)
        reports = call.reports
        if call.route is Route.BATCH:
            # Safe to retry whole: reports keep their sequence (see _sync.ReportSender._send).
            request = pb.BatchUpdateOperationsRequest(updates=reports)
            response = await client._call(stub.BatchUpdateOperations, request, retry=ONCE)
            return batch_results(reports, response)
        if call.route is Route.STREAM:
            return [await stream.send(reports[0])]
        response = await client._call(stub.UpdateOperation, reports[0], retry=ONCE)
        return [acked(reports[0], response)]


class AsyncOperationHandle(ProducerHandle):
    """A producer's handle for asyncio code; reports are coalesced and sent by the
    client's background task. Reporting, and the best-effort policy, are the same
    as OperationHandle's."""

    def __init__(
        self,
        client: AsyncHeadwayClient,
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

    async def flush(self) -> bool:
        """Sends every report so far at once and waits until the server has them;
        see OperationHandle.flush (best effort: up to finish_timeout; strict: no
        limit, bound it with `asyncio.timeout` if need be)."""
        wait = None if self.strict else self.finish_timeout
        return await self._reports.flush(self._state, wait)

    async def complete(
        self, *, result: Mapping[str, Any] | None = None, message: str = ""
    ) -> pb.Operation:
        """Sends what is pending, then completes the operation; see OperationHandle.complete."""
        request = _common.complete_request(self.id, result, message, _common.new_request_id())
        await self._reports.finish(
            self._state, request, wait=self.finish_timeout, report_errors=True
        )
        return self.operation

    async def fail(self, error: pb.OperationError | BaseException | str) -> pb.Operation:
        """Sends what is pending, then fails the operation; see OperationHandle.fail."""
        request = _common.fail_request(self.id, error, _common.new_request_id())
        await self._reports.finish(
            self._state, request, wait=self.finish_timeout, report_errors=False
        )
        return self.operation

    async def __aenter__(self) -> AsyncOperationHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state.closed:
            return
        ending = ending_for(exc)
        if ending is None:
            await self.complete()
            return
        try:
            await self.fail(ending)
        except HeadwayError as failure:
            if self.strict:
                raise
            # The job's own exception goes on unchanged.
            log.warning("headway: operation %s: could not record its failure: %s", self.id, failure)
