"""The ProgressTracker servicer: proto <-> domain, error -> status, stream loops."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc

from headway_server import auth, convert, handlers
from headway_server.app.service import OperationService, UpdateResult
from headway_server.app.watch import MAX_MIN_INTERVAL, ShuttingDown, WatchEvent, WatchHub
from headway_server.domain import errors
from headway_server.domain.model import LogLevel, Update
from headway_server.domain.validation import MAX_EPOCH_LENGTH, check_id, check_name

log = logging.getLogger("headway.servicer")

RESUME_REVISION_KEY = "headway-resume-revision"
# Trailing metadata on a NOT_FOUND for an operation that was deleted (not never
# seen); a report's ack says the same with `deleted`.
DELETED_KEY = "headway-deleted"
# A WatchOperationsResponse stays well under the 4 MiB a default client accepts.
_MAX_EVENTS_PER_MESSAGE = 500
_MAX_BYTES_PER_MESSAGE = 1 << 20

# Reports per BatchUpdateOperations call: bounds the work and the response of one call.
MAX_BATCH_UPDATES = 1000

# The one table from domain errors to status codes, looked up along the error's
# class hierarchy (status_of), so a subclass maps as its nearest listed base.
STATUS_BY_ERROR: dict[type[errors.HeadwayError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.HistoryCompacted: grpc.StatusCode.OUT_OF_RANGE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    auth.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    auth.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    # A domain error with no more specific entry: a server defect, not the caller's.
    errors.HeadwayError: grpc.StatusCode.INTERNAL,
}


def status_of(exc: errors.HeadwayError) -> grpc.StatusCode:
    """The status for a domain error: its own class's entry or its nearest base's."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL  # unreachable: HeadwayError is in the table


Request = TypeVar("Request")
Response = TypeVar("Response")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, errors.HeadwayError):
        code = status_of(exc)
        log.info("rejected", extra={"method": method, "code": code.name, "detail": str(exc)})
        if isinstance(exc, errors.Deleted):
            context.set_trailing_metadata(((DELETED_KEY, "true"),))
        await context.abort(code, str(exc))
    log.exception("unexpected error", extra={"method": method})
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


def unary(
    handler: Callable[[Any, Request, Any], Awaitable[Response]],
) -> Callable[[Any, Request, Any], Awaitable[Response]]:
    """Maps domain errors of a unary handler to statuses through STATUS_BY_ERROR."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Any) -> Response:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await _abort(context, exc, handler.__name__)
            raise  # unreachable: abort raises

    return wrapper


class ProgressTrackerServicer(pb_grpc.ProgressTrackerServicer):
    def __init__(
        self, service: OperationService, hub: WatchHub, *, max_streams_per_principal: int = 0
    ) -> None:
        self.service = service
        self.hub = hub
        self.max_streams_per_principal = max_streams_per_principal
        # Open watch streams by principal name (under authentication).
        self._streams: Counter[str] = Counter()

    def open_stream(self) -> str:
        """Counts a watch stream against its principal's limit; the name to
        release it with ("" when nothing is counted).

        Raises:
            ResourceExhausted: the principal holds its maximum already.
        """
        principal = auth.current.get()
        limit = self.max_streams_per_principal
        if principal is None or not limit:
            return ""
        if self._streams[principal.name] >= limit:
            raise errors.ResourceExhausted(
                f"{principal.name!r} holds its maximum of {limit} open watch streams "
                "(--max-watch-streams-per-principal)"
            )
        self._streams[principal.name] += 1
        return principal.name

    def close_stream(self, name: str) -> None:
        if name:
            self._streams[name] -= 1
            if self._streams[name] <= 0:
                del self._streams[name]

    @unary
    async def StartOperation(self, request: pb.StartOperationRequest, context: Any) -> pb.Operation:
        op = await self.service.start(
            convert.start_spec(request),
            operation_id=request.operation_id,
            request_id=request.request_id,
        )
        return convert.operation(op)

    @unary
    async def UpdateOperation(
        self, request: pb.UpdateOperationRequest, context: Any
    ) -> pb.UpdateOperationResponse:
        result = await self._update(request)
        return convert.update_response(
            pb.UpdateOperationResponse(), result.operation, result.applied
        )

    async def _update(self, request: pb.UpdateOperationRequest) -> UpdateResult:
        check_id("operation_id", request.operation_id)
        return await self.service.update(request.operation_id, convert.update(request))

    async def ReportProgress(
        self, request_iterator: AsyncIterator[pb.UpdateOperationRequest], context: Any
    ) -> AsyncIterator[pb.ReportProgressResponse]:
        # One stream per producer saves the per-call cost of unary reports; each
        # report goes through the same validation and idempotency as UpdateOperation.
        last_revision = 0
        async for request in request_iterator:
            if isinstance(request, handlers.Undecodable):
                # Nothing to acknowledge it by (no sequence): the stream ends.
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.problem)
            try:
                # A rejected report does not end the stream: the producer may
                # report on other operations through it.
                ack = await self._acknowledge(request)
            except Exception as exc:
                await _abort(context, exc, "ReportProgress")
            last_revision = max(last_revision, ack.result.revision)
            yield ack
            if self.hub.stopping:
                await _end_for_shutdown(context, ShuttingDown(last_revision))

    async def _acknowledge(
        self, request: pb.UpdateOperationRequest, ack: pb.ReportProgressResponse | None = None
    ) -> pb.ReportProgressResponse:
        """Applies one report and fills its ack (a new one unless given); a domain
        error becomes the ack's status, not an exception."""
        if ack is None:
            ack = pb.ReportProgressResponse()
        ack.sequence = request.sequence
        ack.operation_id = request.operation_id
        try:
            result = await self._update(request)
        except errors.HeadwayError as exc:
            _refuse(ack, exc)
        else:
            convert.update_response(ack.result, result.operation, result.applied)
        return ack

    @unary
    async def BatchUpdateOperations(
        self, request: pb.BatchUpdateOperationsRequest, context: Any
    ) -> pb.BatchUpdateOperationsResponse:
        if len(request.updates) > MAX_BATCH_UPDATES:
            raise errors.InvalidArgument(
                "updates",
                f"at most {MAX_BATCH_UPDATES} reports per call (got {len(request.updates)})",
            )
        # In order, each on its own: one rejected report never affects the others.
        # Applied together: one round trip to a shared store for the batch.
        # Each ack is filled where it lies in the response (no copy per report).
        response = pb.BatchUpdateOperationsResponse()
        acks = response.results
        valid: list[tuple[str, Update]] = []
        placed: list[pb.ReportProgressResponse] = []
        for update in request.updates:
            ack = acks.add()
            ack.sequence = update.sequence
            ack.operation_id = update.operation_id
            try:
                check_id("operation_id", update.operation_id)
                valid.append((update.operation_id, convert.update(update)))
            except errors.HeadwayError as exc:
                _refuse(ack, exc)
            else:
                placed.append(ack)
        for ack, result in zip(placed, await self.service.update_many(valid), strict=True):
            if isinstance(result, errors.HeadwayError):
                _refuse(ack, result)
            else:
                convert.update_response(ack.result, result.operation, result.applied)
        return response

    @unary
    async def CompleteOperation(
        self, request: pb.CompleteOperationRequest, context: Any
    ) -> pb.Operation:
        op = await self.service.complete(
            request.operation_id,
            result=(
                convert.struct_to_dict(request.result, "result")
                if request.HasField("result")
                else None
            ),
            message=request.message,
            request_id=request.request_id,
        )
        return convert.operation(op)

    @unary
    async def FailOperation(self, request: pb.FailOperationRequest, context: Any) -> pb.Operation:
        op = await self.service.fail(
            request.operation_id,
            convert.operation_error(request.error),
            request_id=request.request_id,
        )
        return convert.operation(op)

    @unary
    async def CancelOperation(
        self, request: pb.CancelOperationRequest, context: Any
    ) -> pb.Operation:
        return convert.operation(await self.service.cancel(request.operation_id, request.reason))

    @unary
    async def DeleteOperation(
        self, request: pb.DeleteOperationRequest, context: Any
    ) -> empty_pb2.Empty:
        await self.service.delete(request.operation_id)
        return empty_pb2.Empty()

    @unary
    async def GetOperation(self, request: pb.GetOperationRequest, context: Any) -> pb.Operation:
        return convert.operation(await self.service.get(request.operation_id))

    @unary
    async def ListOperations(
        self, request: pb.ListOperationsRequest, context: Any
    ) -> pb.ListOperationsResponse:
        page, token = await self.service.list(
            auth.scoped(convert.operation_filter(request.filter)),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListOperationsResponse(
            operations=[convert.operation(op) for op in page.operations],
            next_page_token=token,
            revision=page.revision,
        )

    @unary
    async def ReportLogs(
        self, request: pb.ReportLogsRequest, context: Any
    ) -> pb.ReportLogsResponse:
        check_id("operation_id", request.operation_id)
        entries = [
            convert.log_entry(entry, f"entries[{i}]") for i, entry in enumerate(request.entries)
        ]
        op, dropped = await self.service.report_logs(request.operation_id, entries)
        return pb.ReportLogsResponse(
            error_count=op.error_count,
            warning_count=op.warning_count,
            dropped=dropped,
            revision=op.revision,
        )

    @unary
    async def ListLogs(self, request: pb.ListLogsRequest, context: Any) -> pb.ListLogsResponse:
        min_level = None
        if request.min_level:
            try:
                min_level = LogLevel(request.min_level)
            except ValueError:
                raise errors.InvalidArgument(
                    "min_level", f"{request.min_level} is not a level"
                ) from None
        entries, token, dropped = await self.service.list_logs(
            request.operation_id,
            min_level=min_level,
            stage=request.stage,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListLogsResponse(
            entries=[convert.log_entry_message(e) for e in entries],
            next_page_token=token,
            dropped=dropped,
        )

    @unary
    async def GetTimeline(
        self, request: pb.GetTimelineRequest, context: Any
    ) -> pb.GetTimelineResponse:
        entries, dropped = await self.service.timeline(request.operation_id)
        return pb.GetTimelineResponse(
            entries=[convert.timeline_entry(e) for e in entries], dropped=dropped
        )

    @unary
    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.GetStatsResponse:
        window = request.window.ToNanoseconds() / 1e9 if request.HasField("window") else None
        where = auth.scoped(convert.operation_filter(request.filter))
        found = await self.service.stats(where, window=window)
        return convert.stats(found)

    async def WatchOperation(  # type: ignore[override]  # yields serialized events
        self, request: pb.WatchOperationRequest, context: Any
    ) -> AsyncIterator[bytes]:
        # Watch streams yield serialized messages (see handlers.serialize): the
        # operation's bytes are shared by every watcher of it.
        counted = ""
        try:
            counted = self.open_stream()
            check_id("operation_id", request.operation_id)
            _check_resume(request)
            if auth.current.get() is not None:
                # NOT_FOUND, as for every call, for an operation of a project
                # the caller may not use (a deleted one's tombstone included).
                await self.service.check_visible(request.operation_id)
            async for event in self.hub.watch_operation(
                request.operation_id,
                request.from_revision,
                from_epoch=request.from_epoch,
                min_interval=_min_interval(request),
            ):
                yield convert.event_bytes(event)
        except ShuttingDown as exc:
            await _end_for_shutdown(context, exc)
        except Exception as exc:
            await _abort(context, exc, "WatchOperation")
        finally:
            self.close_stream(counted)

    async def WatchOperations(  # type: ignore[override]  # yields serialized responses
        self, request: pb.WatchOperationsRequest, context: Any
    ) -> AsyncIterator[bytes]:
        counted = ""
        try:
            counted = self.open_stream()
            where = auth.scoped(convert.operation_filter(request.filter))
            _check_resume(request)
            async for batch in self.hub.watch_operations(
                where,
                request.from_revision,
                from_epoch=request.from_epoch,
                min_interval=_min_interval(request),
            ):
                for message in _messages(batch):
                    yield message
        except ShuttingDown as exc:
            await _end_for_shutdown(context, exc)
        except Exception as exc:
            await _abort(context, exc, "WatchOperations")
        finally:
            self.close_stream(counted)


def _refuse(ack: pb.ReportProgressResponse, exc: errors.HeadwayError) -> None:
    """A rejected report's ack: the status UpdateOperation would have returned."""
    ack.error_code = status_of(exc).value[0]
    ack.error_message = str(exc)
    ack.deleted = isinstance(exc, errors.Deleted)


def _check_resume(request: pb.WatchOperationRequest | pb.WatchOperationsRequest) -> None:
    """Checks a watch's resume position (from_revision, from_epoch)."""
    if request.from_revision < 0:
        raise errors.InvalidArgument(
            "from_revision", f"must not be negative (got {request.from_revision})"
        )
    check_name("from_epoch", request.from_epoch, MAX_EPOCH_LENGTH)


def _min_interval(request: pb.WatchOperationRequest | pb.WatchOperationsRequest) -> float | None:
    """The pacing a watch asked for; None (unset) means the server's default."""
    if not request.HasField("min_interval"):
        return None
    value = request.min_interval
    if value.seconds < 0 or value.nanos < 0 or value.nanos >= 1_000_000_000:
        raise errors.InvalidArgument("min_interval", "must be a valid, non-negative duration")
    seconds = value.seconds + value.nanos / 1e9
    if seconds > MAX_MIN_INTERVAL:
        raise errors.InvalidArgument(
            "min_interval", f"at most {MAX_MIN_INTERVAL:g}s (got {seconds:g}s)"
        )
    return seconds


def _messages(batch: list[WatchEvent]) -> list[bytes]:
    """Serialized WatchOperationsResponses of bounded count and size carrying
    `batch`: each is the concatenation of its framed events."""
    messages: list[bytes] = []
    parts: list[bytes] = []
    size = 0
    for watch_event in batch:
        event = convert.event_bytes(watch_event, framed=True)
        if parts and (
            len(parts) >= _MAX_EVENTS_PER_MESSAGE or size + len(event) > _MAX_BYTES_PER_MESSAGE
        ):
            messages.append(b"".join(parts))
            parts, size = [], 0
        parts.append(event)
        size += len(event)
    if parts:
        messages.append(b"".join(parts))
    return messages


async def _end_for_shutdown(context: Any, exc: ShuttingDown) -> None:
    context.set_trailing_metadata(((RESUME_REVISION_KEY, str(exc.revision)),))
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
