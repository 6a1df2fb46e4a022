"""Headway's Python client: report progress in three lines, watch it live.

from headway_client import HeadwayClient

with HeadwayClient("127.0.0.1:50051") as client:
    with client.start(kind="ingest", project="acme", total=len(files)) as op:
        for f in files:
            process(f)
            op.advance(1)
"""

from headway_client._aio import AsyncHeadwayClient, AsyncOperationHandle
from headway_client._errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    HeadwayError,
    InvalidArgument,
    OperationCancelled,
    OperationNotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from headway_client._retry import RetryPolicy
from headway_client._sync import HeadwayClient, OperationHandle

__all__ = [
    "AlreadyExists",
    "AsyncHeadwayClient",
    "AsyncOperationHandle",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HeadwayClient",
    "HeadwayError",
    "InvalidArgument",
    "OperationCancelled",
    "OperationHandle",
    "OperationNotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
