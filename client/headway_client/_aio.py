"""The asyncio client: AsyncHeadwayClient and AsyncOperationHandle, parallel to _sync."""

from __future__ import annotations

import asyncio
import contextlib
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
    STATUS_BY_NUMBER,
    FailedPrecondition,
    OperationCancelled,
    Unavailable,
    error_for,
    from_rpc_error,
    status_of,
)
from headway_client._reports import PendingReports
from headway_client._retry import RECONNECT, REPORT_RETRY, RetryPolicy, acall_with_retry, retryable

T = TypeVar("T")


class AsyncHeadwayClient:
    """An asyncio connection to a Headway server; same options as HeadwayClient."""

    def __init__(
        self,
        target: str = _common.DEFAULT_TARGET,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.metadata = tuple(metadata)
        self.retry = retry or RetryPolicy()
        self._channel = (
            grpc.aio.secure_channel(target, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(target)
        )
        self.stub: Any = pb_grpc.ProgressTrackerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncHeadwayClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(
        self, method: Callable[..., Awaitable[T]], request: Any, *, retry: RetryPolicy | None = None
    ) -> T:
        def once() -> Awaitable[T]:
            return method(request, timeout=self.timeout, metadata=self.metadata)

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
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
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
        )
        operation = await self._call(self.stub.StartOperation, request)
        return AsyncOperationHandle(
            self,
            operation,
            min_interval=min_interval,
            raise_on_cancel=raise_on_cancel,
            streaming=streaming,
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
        self, operation_id: str, *, from_revision: int = 0
    ) -> AsyncIterator[pb.OperationEvent]:
        """Events of one operation until it ends; reconnects and resumes on UNAVAILABLE."""
        resume = _common.ResumePoint(from_revision)

        def open_stream() -> Any:
            request = pb.WatchOperationRequest(
                operation_id=operation_id, from_revision=resume.revision
            )
            return self.stub.WatchOperation(request, metadata=self.metadata)

        return self._resuming(open_stream, resume, lambda event: [event])

    def watch_operations(
        self, *, from_revision: int = 0, **filter_fields: Any
    ) -> AsyncIterator[pb.OperationEvent]:
        """Events of every matching operation; reconnects and resumes on UNAVAILABLE."""
        resume = _common.ResumePoint(from_revision)
        where = _common.operation_filter(**filter_fields)

        def open_stream() -> Any:
            request = pb.WatchOperationsRequest(filter=where, from_revision=resume.revision)
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
        self.unary = False
        self._call: Any = None

    async def send(self, request: pb.UpdateOperationRequest) -> pb.UpdateOperationResponse:
        if self.unary:
            return await self.client.report(request)
        delays = REPORT_RETRY.delays()
        while True:
            try:
                if self._call is None:
                    self._call = self.client.stub.ReportProgress(metadata=self.client.metadata)
                await self._call.write(request)
                ack = await self._call.read()
                if ack is grpc.aio.EOF:  # type: ignore[attr-defined]
                    raise EOFError("the report stream ended")
            except (grpc.RpcError, EOFError) as exc:
                await self.close()
                status = status_of(exc) if isinstance(exc, grpc.RpcError) else None
                if status == grpc.StatusCode.UNIMPLEMENTED:
                    self.unary = True
                    return await self.client.report(request)
                delay = next(delays, None)
                if delay is None or (status is not None and not retryable(exc)):
                    if isinstance(exc, grpc.RpcError):
                        raise from_rpc_error(exc) from exc
                    raise Unavailable(str(exc)) from None
                await asyncio.sleep(delay)
                continue
            if ack.error_code:
                code = STATUS_BY_NUMBER.get(ack.error_code, grpc.StatusCode.UNKNOWN)
                raise error_for(code, ack.error_message)
            result: pb.UpdateOperationResponse = ack.result
            return result

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await call.done_writing()
            call.cancel()


class AsyncOperationHandle:
    """A producer's handle for asyncio code; reports are coalesced by a background task."""

    def __init__(
        self,
        client: AsyncHeadwayClient,
        operation: pb.Operation,
        *,
        min_interval: float = 0.1,
        raise_on_cancel: bool = False,
        streaming: bool = True,
    ) -> None:
        self.client = client
        self._stream = AsyncReportStream(client)
        self._stream.unary = not streaming
        self.id = operation.id
        self.operation = operation
        self.min_interval = min_interval
        self.raise_on_cancel = raise_on_cancel
        self.cancel_requested = operation.cancel_requested
        self.revision = operation.revision
        self.percent = operation.percent
        self.rpcs = 0
        self._completed = operation.completed
        self._stage = operation.stage
        self._stage_completed = 0
        self._pending = PendingReports(self.id, first_sequence=operation.last_sequence + 1)
        self._error: BaseException | None = None
        self._closed = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sender = asyncio.create_task(self._send_forever(), name=f"headway-{self.id}")

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed here")
        if self.raise_on_cancel and self.cancel_requested:
            raise OperationCancelled(f"cancellation of operation {self.id} was requested")

    def _report(self, **fields: Any) -> None:
        self._check()
        self._pending.add(**fields)
        self._idle.clear()
        self._wake.set()

    def advance(self, n: int = 1) -> None:
        """Adds n to completed (and to the current stage's); never waits."""
        self._completed += n
        if self._stage:
            self._stage_completed += n
            self._report(completed=self._completed, stage_completed=self._stage_completed)
        else:
            self._report(completed=self._completed)

    def update(self, *, stage: str | None = None, **fields: Any) -> None:
        """Reports absolute values and counter deltas, like OperationHandle.update."""
        if fields.get("completed") is not None:
            self._completed = fields["completed"]
        if stage is not None and stage != self._stage:
            self._stage, self._stage_completed = stage, 0
        if fields.get("stage_completed") is not None:
            self._stage_completed = fields["stage_completed"]
        self._report(stage=stage, **fields)

    def stage(self, name: str, *, total: int | None = None, message: str | None = None) -> None:
        self.update(stage=name, stage_total=total, stage_completed=0, message=message)

    async def _send_forever(self) -> None:
        last_sent = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = last_sent + self.min_interval - time.monotonic()
            if wait > 0 and not self._closed:
                # Coalesce until the interval has passed (or a flush/close wakes us).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            requests = self._pending.take()
            try:
                for request in requests:
                    response = await self._stream.send(request)
                    self.rpcs += 1
                    self.revision = max(self.revision, response.revision)
                    self.percent = response.percent
                    self.cancel_requested = response.cancel_requested
            except Exception as exc:  # delivered to the producer's next call
                self._error = exc
            last_sent = time.monotonic()
            if self._pending:
                self._wake.set()
            else:
                self._idle.set()
                if self._closed:
                    await self._stream.close()
                    return

    async def flush(self) -> None:
        """Waits until every report so far has been sent."""
        self._wake.set()
        while not self._idle.is_set():
            await self._idle.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _finish_reports(self, *, raise_errors: bool = True) -> None:
        if self._closed:
            raise FailedPrecondition(f"operation {self.id} was already completed or failed")
        self._closed = True
        self._wake.set()  # the sender sends what is pending, then returns
        await self._sender
        if self._error is not None and raise_errors:
            error, self._error = self._error, None
            raise error

    async def complete(
        self, *, result: Mapping[str, Any] | None = None, message: str = ""
    ) -> pb.Operation:
        await self._finish_reports()
        self.operation = await self.client.complete(self.id, result=result, message=message)
        return self.operation

    async def fail(self, error: pb.OperationError | BaseException | str) -> pb.Operation:
        await self._finish_reports(raise_errors=False)
        self.operation = await self.client.fail(self.id, error)
        return self.operation

    async def __aenter__(self) -> AsyncOperationHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._closed:
            return
        if exc is None:
            await self.complete()
        elif isinstance(exc, OperationCancelled):
            await self.fail(pb.OperationError(code="CANCELLED", message=str(exc)))
        else:
            await self.fail(exc)
