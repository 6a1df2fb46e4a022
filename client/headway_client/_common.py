"""Request building and stream bookkeeping shared by the sync and asyncio clients."""

from __future__ import annotations

import socket
import traceback
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from headway.v1 import progress_pb2 as pb

from headway_client._errors import InvalidArgument
from headway_client._reports import struct
from headway_client._retry import RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"
# Server events after which the stream's resume point moves on.
_ADVANCING = frozenset(
    {
        pb.OperationEvent.SNAPSHOT,
        pb.OperationEvent.SYNCED,
        pb.OperationEvent.CHANGED,
        pb.OperationEvent.DELETED,
        pb.OperationEvent.BOOKMARK,
    }
)
TERMINAL_STATES = frozenset({pb.Operation.SUCCEEDED, pb.Operation.FAILED, pb.Operation.CANCELLED})

StageArg = str | tuple[str, float]


def channel_options(retry: RetryPolicy) -> list[tuple[str, Any]]:
    """Channel settings: grpc's own reconnect backoff grows to 120 s by default, so
    after a long outage a channel would notice the server's return minutes late
    (calls fail at once while it waits); keep it near the client's own backoff."""
    return [("grpc.max_reconnect_backoff_ms", int(max(1.0, retry.max_backoff) * 1000))]


def channel_target(target: str) -> str:
    """The grpc target for "host:port" or several, comma-separated.

    Several addresses are replicas of one Headway (servers sharing a Redis
    store): the channel uses the first that answers and moves to the next when
    it goes away, so calls retried after UNAVAILABLE land on a live replica.
    grpc takes a list only as IP addresses ("ipv4:a:p,b:p"), so host names are
    resolved here, once. A target with a scheme ("dns:///", "unix:") is grpc's
    own syntax and passed through.
    """
    if "," not in target or "://" in target or target.startswith(("ipv4:", "ipv6:", "unix:")):
        return target
    v4: list[str] = []
    v6: list[str] = []
    for part in target.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {part.strip()!r} is not host:port")
        host = host.strip("[]")
        for family, _, _, _, address in socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        ):
            if family == socket.AF_INET:
                v4.append(f"{address[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{address[0]}]:{port}")
    if v4 and not v6:
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    if v6 and not v4:
        return "ipv6:" + ",".join(dict.fromkeys(v6))
    # grpc's list targets take one family; IPv4 is what mixed hosts all have.
    return "ipv4:" + ",".join(dict.fromkeys(v4))


def tls_credentials(
    tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files (None: none given, plaintext).

    `tls_ca`: the CA that signed the server's certificate (default: the system's);
    `tls_cert`/`tls_key`: this client's certificate, for a server that asks (mTLS).
    """
    if not (tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as pem:
            return pem.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca), private_key=read(tls_key), certificate_chain=read(tls_cert)
    )


def with_token(
    metadata: Iterable[tuple[str, str]], token: str | None
) -> tuple[tuple[str, str], ...]:
    """The call metadata, with `authorization: Bearer <token>` when a token is given."""
    pairs = tuple(metadata)
    if token:
        kept = tuple(p for p in pairs if p[0] != "authorization")
        pairs = (*kept, ("authorization", f"Bearer {token}"))
    return pairs


def new_request_id() -> str:
    """A request id that makes a retried start or finish return the first one's result."""
    return uuid.uuid4().hex


def _stage_spec(stage: StageArg) -> pb.StageSpec:
    """A stage plan entry from "name" (weight 1) or ("name", weight)."""
    if isinstance(stage, str):
        return pb.StageSpec(name=stage, weight=1.0)
    return pb.StageSpec(name=stage[0], weight=stage[1])


def start_request(
    *,
    kind: str,
    project: str,
    dataset: str,
    labels: Mapping[str, str] | None,
    total: int,
    unit: str,
    stages: Sequence[StageArg],
    heartbeat_timeout: float | None,
    parent_id: str,
    operation_id: str,
    request_id: str,
    measures: Mapping[str, str] | None = None,
    alert_rules: Mapping[str, Mapping[str, float]] | None = None,
) -> pb.StartOperationRequest:
    request = pb.StartOperationRequest(
        operation_id=operation_id,
        kind=kind,
        project=project,
        dataset=dataset,
        labels=dict(labels or {}),
        total=total,
        unit=unit,
        stages=[_stage_spec(s) for s in stages],
        parent_id=parent_id,
        request_id=request_id,
    )
    if heartbeat_timeout:
        request.heartbeat_timeout.FromNanoseconds(int(heartbeat_timeout * 1e9))
    for name, how in (measures or {}).items():
        request.measures.add(name=name, aggregation=_aggregation(name, how))
    for name, bounds in (alert_rules or {}).items():
        unknown = set(bounds) - {"below", "above"}
        if unknown or not bounds:
            raise InvalidArgument(
                f"alert_rules[{name!r}]: give 'below' and/or 'above' (got {sorted(bounds)})"
            )
        rule = request.alert_rules.add(measure=name)
        if "below" in bounds:
            rule.below = bounds["below"]
        if "above" in bounds:
            rule.above = bounds["above"]
    return request


def _aggregation(name: str, how: str) -> pb.MeasureSpec.Aggregation.ValueType:
    """ "last", "sum" or "mean" (any case) as the proto's aggregation."""
    try:
        return pb.MeasureSpec.Aggregation.Value(how.upper())
    except ValueError:
        raise InvalidArgument(f"measures[{how!r}]: aggregation must be last, sum or mean") from None


def operation_filter(
    *,
    project: str = "",
    dataset: str = "",
    kind: str = "",
    states: Iterable[int] = (),
    labels: Mapping[str, str] | None = None,
    parent_id: str = "",
    active_only: bool = False,
) -> pb.OperationFilter:
    return pb.OperationFilter(
        project=project,
        dataset=dataset,
        kind=kind,
        states=list(states),  # type: ignore[arg-type]
        labels=dict(labels or {}),
        parent_id=parent_id,
        active_only=active_only,
    )


def error_from_exception(exc: BaseException) -> pb.OperationError:
    """What a producer's context manager reports when its block raised."""
    return pb.OperationError(
        code=type(exc).__name__,
        message=str(exc)[:4000] or type(exc).__name__,
        details=struct({"traceback": "".join(traceback.format_exception(exc))[-8000:]}),
    )


def complete_request(
    operation_id: str, result: Mapping[str, Any] | None, message: str, request_id: str
) -> pb.CompleteOperationRequest:
    request = pb.CompleteOperationRequest(
        operation_id=operation_id, message=message, request_id=request_id
    )
    if result is not None:
        request.result.update(result)
    return request


def fail_request(
    operation_id: str, error: pb.OperationError | BaseException | str, request_id: str
) -> pb.FailOperationRequest:
    if isinstance(error, BaseException):
        error = error_from_exception(error)
    elif isinstance(error, str):
        error = pb.OperationError(code="ERROR", message=error)
    return pb.FailOperationRequest(operation_id=operation_id, error=error, request_id=request_id)


@dataclass
class ResumePoint:
    """Where a reconnecting watch resumes: the last revision the caller saw, and
    the store epoch it counts in (from the latest event that carried one), so a
    server whose store is not the one those revisions came from answers RESET."""

    revision: int = 0
    epoch: str = ""

    def saw(self, event: pb.OperationEvent) -> None:
        if event.epoch:
            self.epoch = event.epoch
        if event.type in _ADVANCING:
            self.revision = max(self.revision, event.revision)
        elif event.type == pb.OperationEvent.RESET:
            # A fresh snapshot follows; revisions after it may be lower.
            self.revision = 0

    def watch_operation(self, operation_id: str) -> pb.WatchOperationRequest:
        return pb.WatchOperationRequest(
            operation_id=operation_id, from_revision=self.revision, from_epoch=self.epoch
        )

    def watch_operations(self, where: pb.OperationFilter) -> pb.WatchOperationsRequest:
        return pb.WatchOperationsRequest(
            filter=where, from_revision=self.revision, from_epoch=self.epoch
        )
