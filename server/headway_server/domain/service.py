"""The operations service: the domain's use cases, written against the store interface."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from headway_server.domain import lifecycle
from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
)
from headway_server.domain.model import (
    JsonObject,
    Operation,
    OperationError,
    OperationFilter,
    StartSpec,
    State,
    Update,
)
from headway_server.domain.validation import check_id
from headway_server.store.base import OperationStore, Page

log = logging.getLogger("headway.operations")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Compare-and-set retries; only a Redis store shared by processes can race.
_CAS_ATTEMPTS = 16


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateResult:
    operation: Operation
    applied: bool


class OperationService:
    """Start, report, finish, cancel, delete, read and sweep operations."""

    def __init__(
        self,
        store: OperationStore,
        *,
        retention: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.retention = retention
        self._clock = clock
        # Server-generated ids derived from a request_id must not be guessable
        # from it, so they are keyed with a per-process secret.
        self._id_key = secrets.token_bytes(32)

    def _generated_id(self, spec: StartSpec, request_id: str) -> str:
        if not request_id:
            return "op-" + secrets.token_hex(16)
        digest = hmac.new(
            self._id_key, f"{spec.project}\0{request_id}".encode(), hashlib.sha256
        ).hexdigest()
        return "op-" + digest[:32]

    async def _load(self, operation_id: str) -> Operation:
        check_id("operation_id", operation_id)
        op = await self.store.get(operation_id)
        if op is None:
            raise NotFound(f"operation {operation_id!r} not found")
        return op

    async def _modify(
        self, operation_id: str, change: Callable[[Operation], Operation | None]
    ) -> tuple[Operation, bool]:
        """Reads, changes and writes back with compare-and-set; (operation, changed)."""
        for _ in range(_CAS_ATTEMPTS):
            op = await self._load(operation_id)
            new = change(op)
            if new is None:
                return op, False
            try:
                return await self.store.replace(new, expected_revision=op.revision), True
            except Conflict:
                continue
        raise Conflict(f"operation {operation_id!r} is changing too fast to update")

    async def start(
        self, spec: StartSpec, *, operation_id: str = "", request_id: str = ""
    ) -> Operation:
        spec = lifecycle.validate_start(spec, operation_id, request_id)
        if spec.parent_id and await self.store.get(spec.parent_id) is None:
            raise NotFound(f"parent_id: operation {spec.parent_id!r} not found")
        operation_id = operation_id or self._generated_id(spec, request_id)
        existing = await self.store.get(operation_id)
        if existing is None:
            try:
                op = await self.store.create(
                    lifecycle.new_operation(operation_id, spec, self._clock())
                )
                log.info("operation started", extra={"operation_id": op.id, "kind": spec.kind})
                return op
            except AlreadyExists:
                existing = await self.store.get(operation_id)
                if existing is None:
                    raise
        if existing.spec != spec:
            raise AlreadyExists(
                f"operation {operation_id!r} already exists with different parameters"
            )
        return existing

    async def update(self, operation_id: str, update: Update) -> UpdateResult:
        lifecycle.validate_update(update)

        def change(op: Operation) -> Operation | None:
            lifecycle.require_active(op, "UpdateOperation")
            if lifecycle.is_duplicate(op, update):
                return None
            return lifecycle.apply_update(op, update, self._clock())

        op, applied = await self._modify(operation_id, change)
        return UpdateResult(op, applied)

    async def _finish(
        self, operation_id: str, call: str, request_id: str, **changes: Any
    ) -> Operation:
        def change(op: Operation) -> Operation | None:
            if lifecycle.repeat_of_finish(op, call, request_id):
                return None
            now = self._clock()
            return lifecycle.finish(op, now=now, call=call, request_id=request_id, **changes)

        op, changed = await self._modify(operation_id, change)
        if changed:
            log.info("operation ended", extra={"operation_id": op.id, "state": op.state.name})
        return op

    async def complete(
        self,
        operation_id: str,
        *,
        result: JsonObject | None = None,
        message: str = "",
        request_id: str = "",
    ) -> Operation:
        lifecycle.validate_complete(message, result, request_id)
        return await self._finish(
            operation_id,
            "CompleteOperation",
            request_id,
            state=State.SUCCEEDED,
            result=result,
            message=message or None,
        )

    async def fail(
        self, operation_id: str, error: OperationError, *, request_id: str = ""
    ) -> Operation:
        lifecycle.validate_fail(error, request_id)
        return await self._finish(
            operation_id,
            "FailOperation",
            request_id,
            state=lifecycle.fail_state(error),
            error=error,
            message=error.message or None,
        )

    async def cancel(self, operation_id: str, reason: str = "") -> Operation:
        op, changed = await self._modify(
            operation_id, lambda op: lifecycle.request_cancel(op, reason, self._clock())
        )
        if changed:
            log.info("cancel requested", extra={"operation_id": op.id, "state": op.state.name})
        return op

    async def delete(self, operation_id: str) -> int:
        await self._load(operation_id)
        revision = await self.store.delete(operation_id)
        log.info("operation deleted", extra={"operation_id": operation_id, "revision": revision})
        return revision

    async def get(self, operation_id: str) -> Operation:
        return await self._load(operation_id)

    async def list(
        self, where: OperationFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[Page, str]:
        """A page of operations and the token for the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must not be negative (got {page_size})")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token, where)
        page = await self.store.list_page(where, after=after, limit=limit)
        token = _encode_page_token(page.next_after, where) if page.next_after else ""
        return page, token

    async def sweep(self) -> int:
        """Marks operations whose heartbeat lease ran out as stalled and removes
        terminal ones past retention. Returns how many operations it changed."""
        now = self._clock()
        changed = 0
        for op in await self.store.scan():
            if op.state.terminal:
                if op.finished_at is not None and now - op.finished_at >= self.retention:
                    try:
                        await self.store.delete(op.id)
                    except NotFound:
                        continue
                    log.info("operation expired", extra={"operation_id": op.id})
                    changed += 1
            elif lifecycle.mark_stalled(op, now) is not None:
                try:
                    _, did = await self._modify(op.id, lambda o: lifecycle.mark_stalled(o, now))
                except NotFound:
                    continue
                if did:
                    log.warning("operation stalled", extra={"operation_id": op.id})
                    changed += 1
        return changed


def _filter_key(where: OperationFilter) -> str:
    fields = dataclasses.asdict(where)
    fields["states"] = sorted(int(s) for s in where.states)
    encoded = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _encode_page_token(after: int, where: OperationFilter) -> str:
    raw = json.dumps({"after": after, "filter": _filter_key(where)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, where: OperationFilter) -> int:
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["after"]
        key = data["filter"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidArgument("page_token", "is not a token this server issued") from exc
    if not isinstance(after, int) or after < 0 or key != _filter_key(where):
        raise InvalidArgument("page_token", "belongs to a different filter or is malformed")
    return after
