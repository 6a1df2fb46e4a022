"""Client exceptions: one class per status a caller handles differently.

HeadwayError                 any failed call (.code, .details)
├── InvalidArgument          INVALID_ARGUMENT: the message names the field
├── OperationNotFound        NOT_FOUND
│   └── OperationDeleted     NOT_FOUND, and the server says it was deleted (not never seen)
├── AlreadyExists            ALREADY_EXISTS: same id, other parameters
├── FailedPrecondition       FAILED_PRECONDITION: e.g. the operation already ended
├── ResourceExhausted        RESOURCE_EXHAUSTED: the server's operation cap
├── Unavailable              UNAVAILABLE: server down or unreachable (retried first)
├── DeadlineExceeded         DEADLINE_EXCEEDED (retried first)
├── PermissionDenied / Unauthenticated
└── OperationCancelled       not a status: someone asked this producer to stop
"""

from __future__ import annotations

import grpc


class HeadwayError(Exception):
    """A call to Headway failed; `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgument(HeadwayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OperationNotFound(HeadwayError):
    code = grpc.StatusCode.NOT_FOUND


class OperationDeleted(OperationNotFound):
    """NOT_FOUND for an operation the server deleted (it still holds its tombstone),
    as opposed to one it never saw (e.g. a server restarted with an empty store)."""


class AlreadyExists(HeadwayError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(HeadwayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HeadwayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(HeadwayError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(HeadwayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(HeadwayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(HeadwayError):
    code = grpc.StatusCode.UNAUTHENTICATED


class OperationCancelled(HeadwayError):
    """Raised at a producer's next report when cancellation was requested
    (with raise_on_cancel=True)."""

    code = grpc.StatusCode.CANCELLED


# The one table from status codes to exception classes.
_ERROR_BY_CODE: dict[grpc.StatusCode, type[HeadwayError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        OperationNotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        PermissionDenied,
        Unauthenticated,
    )
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status of a failed call, sync (grpc.Call) or asyncio (AioRpcError) alike."""
    code = getattr(exc, "code", None)
    return code() if callable(code) else grpc.StatusCode.UNKNOWN


def error_for(code: grpc.StatusCode, details: str) -> HeadwayError:
    """The HeadwayError for a status, e.g. one carried in a ReportProgress ack."""
    return _ERROR_BY_CODE.get(code, HeadwayError)(details or str(code), code=code)


def from_rpc_error(exc: grpc.RpcError) -> HeadwayError:
    """The HeadwayError for a failed call; use as `raise from_rpc_error(exc) from exc`."""
    details = exc.details() if hasattr(exc, "details") else None
    code = status_of(exc)
    if code == grpc.StatusCode.NOT_FOUND and _says_deleted(exc):
        return OperationDeleted(details or str(code))
    return error_for(code, details or "")


# Trailing metadata the server adds to NOT_FOUND when the operation was deleted.
DELETED_KEY = "headway-deleted"


def _says_deleted(exc: grpc.RpcError) -> bool:
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # a call that never reached the server has none
        return False
    return any(key == DELETED_KEY and value == "true" for key, value in metadata or ())


def ack_error(code: grpc.StatusCode, details: str, *, deleted: bool) -> HeadwayError:
    """The HeadwayError a report's ack (ReportProgress, BatchUpdateOperations) carries."""
    if code == grpc.StatusCode.NOT_FOUND and deleted:
        return OperationDeleted(details or str(code))
    return error_for(code, details)


STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
