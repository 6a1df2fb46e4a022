"""The operations service: the domain's use cases, written against the store interface."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from headway_server import auth
from headway_server.domain import lifecycle, progress, timeline
from headway_server.domain import validation as v
from headway_server.domain.alerts import AlertThresholds
from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    Deleted,
    FailedPrecondition,
    HeadwayError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)
from headway_server.domain.model import (
    JsonObject,
    LogEntry,
    LogLevel,
    Operation,
    OperationError,
    OperationFilter,
    SharedSpecs,
    StartSpec,
    State,
    TimelineEntry,
    TimelineType,
    Update,
    evolve,
)
from headway_server.domain.stats import Stats, StatsAggregate
from headway_server.domain.validation import check_id
from headway_server.store.base import OperationStore, Page
from headway_server.store.journal import Journal

log = logging.getLogger("headway.operations")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Compare-and-set retries; only a Redis store shared by processes can race.
_CAS_ATTEMPTS = 16
MAX_LOG_ENTRIES_PER_CALL = 1000
# Expired operations deleted per store read in a sweep.
_SWEEP_BATCH = 1000


class Observer(Protocol):
    """What the service tells the outside world about (metrics implement it)."""

    def update_applied(self) -> None: ...

    def operation_finished(self, op: Operation) -> None: ...

    def alert_raised(self, alert_type: str) -> None: ...


class _NoObserver:
    def update_applied(self) -> None:
        pass

    def operation_finished(self, op: Operation) -> None:
        pass

    def alert_raised(self, alert_type: str) -> None:
        pass


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
        journal: Journal | None = None,
        thresholds: AlertThresholds | None = None,
        observer: Observer | None = None,
        max_active_per_project: int = 0,
    ) -> None:
        self.store = store
        self.retention = retention
        self._clock = clock
        # Logs and timelines live with the store's data, so every replica
        # sharing a store sees the same ones.
        self.journal: Journal = journal or store.journal
        # Statistics (and the ETA's per-kind history) live with the store's
        # data too: they outlive retention, and replicas share them. The store
        # records each operation's finish as it stores it, so that a finish is
        # recorded once whichever replica wrote it.
        self.aggregate: StatsAggregate = store.stats
        self.thresholds = thresholds or AlertThresholds()
        self.observer: Observer = observer or _NoObserver()
        # Server-generated ids derived from a request_id must not be guessable
        # from it, so they are keyed with the store's secret: the same on every
        # process sharing the store, so a retry that lands elsewhere (or after a
        # restart) finds the same operation.
        self._specs = SharedSpecs()
        # StartOperation's limit of active operations per project (0: none).
        self.max_active_per_project = max_active_per_project

    async def _generated_id(self, spec: StartSpec, request_id: str) -> str:
        if not request_id:
            return "op-" + secrets.token_hex(16)
        # Read each time (the memory store holds it; the Redis store caches it
        # and renews it if the keyspace was flushed, so replicas keep agreeing).
        digest = hmac.new(
            await self.store.secret(), f"{spec.project}\0{request_id}".encode(), hashlib.sha256
        ).hexdigest()
        return "op-" + digest[:32]

    async def _load(self, operation_id: str) -> Operation:
        op = await self.store.get(operation_id)
        if op is None or not auth.visible(op.project):
            # Only valid ids are ever stored: one found needs no check. One in
            # a project the caller may not use is answered as if it did not
            # exist: its existence must not leak.
            check_id("operation_id", operation_id)
            raise await self._not_found(operation_id, visible=op is None)
        return op

    async def _cached(self, operation_id: str) -> Operation:
        """This process's copy (for a compare-and-set write), else the stored one."""
        op = await self.store.get_cached(operation_id)
        if op is None or not auth.visible(op.project):
            return await self._load(operation_id)
        return op

    async def _not_found(
        self, operation_id: str, field: str = "", *, visible: bool = True
    ) -> NotFound:
        """The error for an operation the store does not hold. Off the hot path,
        it tells a producer "deleted, leave it" (Deleted) from "never seen" (a
        restarted store), which a best-effort client registers again."""
        tomb = await self.store.tombstone(operation_id) if visible else None
        deleted = tomb is not None and auth.visible(tomb.operation.project)
        prefix = f"{field}: " if field else ""
        return (Deleted if deleted else NotFound)(f"{prefix}operation {operation_id!r} not found")

    async def _modify(
        self, operation_id: str, change: Callable[[Operation], Operation | None]
    ) -> tuple[Operation, bool]:
        """Reads, changes and writes back with compare-and-set; (operation, changed)."""
        # The first read may be this process's copy: a report then costs the
        # store one round trip. A stale copy fails the compare-and-set.
        for attempt in range(_CAS_ATTEMPTS):
            if attempt == 0:
                op, new = await self._judged(operation_id, change)
            else:
                op = await self._load(operation_id)
                new = change(op)
            if new is None:
                return op, False
            try:
                stored = await self.store.replace(new, expected_revision=op.revision)
            except Conflict:
                continue
            await self._after_write(op, stored)
            return stored, True
        raise Conflict(f"operation {operation_id!r} is changing too fast to update")

    def _refresh(self, op: Operation, now: float, *, reported: bool = False) -> Operation:
        """Estimate and alerts of a value just built by a change (and changed in
        place); `reported`: the change was an applied report."""
        typical = self.aggregate.typical_throughput(op.kind) if op.kind else None
        history = self.aggregate.stage_history(op.kind) if op.planned else None
        return progress.refresh_built(
            op,
            now,
            self.thresholds,
            typical_throughput=typical,
            reported=reported,
            history=history,
        )

    @staticmethod
    def _rolls_up(old: Operation | None, new: Operation) -> bool:
        """Whether the parent's roll-up reads something this write changed."""
        return old is None or (
            old.state,
            old.percent,
            old.estimate,
            old.measures,
            old.children_measures,
        ) != (new.state, new.percent, new.estimate, new.measures, new.children_measures)

    async def _after_write(
        self, old: Operation | None, new: Operation, *, roll_up: bool = True
    ) -> None:
        """Timeline, statistics, metrics and the parent's roll-up of a stored change."""
        entries = timeline.entries(old, new)
        if entries:
            await self.journal.append_timeline(new.id, entries)
        if new.state.terminal and (old is None or not old.state.terminal):
            self.observer.operation_finished(new)
            await self.journal.seal(new.id)
        if new.alerts:
            for alert_type in progress.raised_alerts(old, new):
                self.observer.alert_raised(alert_type.name)
        if roll_up and new.parent_id and self._rolls_up(old, new):
            await self._roll_up(new.parent_id)

    async def _roll_up(self, parent_id: str) -> None:
        children = await self.store.children(parent_id)
        now = self._clock()
        try:
            await self._modify(parent_id, lambda parent: progress.roll_up(parent, children, now))
        except NotFound:
            pass  # the parent was deleted; its children carry on alone

    async def start(
        self, spec: StartSpec, *, operation_id: str = "", request_id: str = ""
    ) -> Operation:
        spec = self._specs.share(lifecycle.validate_start(spec, operation_id, request_id))
        auth.require_project(spec.project)
        operation_id = operation_id or await self._generated_id(spec, request_id)
        existing = await self.store.get(operation_id)
        if existing is None:
            limit = self.max_active_per_project
            if limit and await self.store.active_in(spec.project) >= limit:
                raise ResourceExhausted(
                    f"project {spec.project!r} has its maximum of {limit} active operations "
                    "(--max-active-operations-per-project)"
                )
            depth = await self._child_depth(spec.parent_id, spec.project)
            try:
                new = lifecycle.new_operation(operation_id, spec, self._clock())
                op = await self.store.create(evolve(new, depth=depth))
                log.info("operation started", extra={"operation_id": op.id, "kind": spec.kind})
                await self._after_write(None, op)
                return op
            except AlreadyExists:
                existing = await self.store.get(operation_id)
                if existing is None:
                    raise
        if not auth.visible(existing.project):
            # Ids are global: the id cannot be had, but nothing of the
            # operation holding it is told (not even that it differs).
            raise AlreadyExists(f"operation id {operation_id!r} is not available")
        if existing.spec != spec:
            raise AlreadyExists(
                f"operation {operation_id!r} already exists with different parameters"
            )
        return existing

    async def _child_depth(self, parent_id: str, project: str = "") -> int:
        """The depth a new child of `parent_id` gets; checks the nesting limits."""
        if not parent_id:
            return 0
        parent = await self.store.get(parent_id)
        if parent is None or not auth.visible(parent.project):
            raise await self._not_found(parent_id, "parent_id", visible=parent is None)
        if auth.current.get() is not None and parent.project != project:
            # A parent's roll-up shows its children's progress to whoever may
            # read the parent's project: under authentication, one project.
            raise InvalidArgument(
                "parent_id", f"is an operation of project {parent.project!r}, not {project!r}"
            )
        if parent.depth + 1 > progress.MAX_DEPTH:
            raise InvalidArgument(
                "parent_id", f"would nest operations deeper than {progress.MAX_DEPTH} levels"
            )
        if sum(parent.children.values()) >= progress.MAX_CHILDREN:
            raise ResourceExhausted(
                f"operation {parent_id!r} has its maximum of {progress.MAX_CHILDREN} children"
            )
        return parent.depth + 1

    def _report(self, op: Operation, update: Update) -> Operation | None:
        """The operation after an applied report, or None for a duplicate."""
        lifecycle.require_active(op, "UpdateOperation")
        if lifecycle.is_duplicate(op, update):
            return None
        now = self._clock()
        reported = lifecycle.apply_update(op, update, now)
        return self._refresh(reported, now, reported=True)

    async def update(self, operation_id: str, update: Update) -> UpdateResult:
        lifecycle.validate_update(update)
        op, applied = await self._modify(operation_id, lambda op: self._report(op, update))
        if applied:
            self.observer.update_applied()
        return UpdateResult(op, applied)

    async def _judged(
        self, operation_id: str, change: Callable[[Operation], Operation | None]
    ) -> tuple[Operation, Operation | None]:
        """(the operation, its changed value or None for nothing to change),
        judged on this process's copy; a refusal or a "nothing to change"
        judged on a copy is judged again on the stored value if that is newer
        (a refusal raises)."""
        op = await self._cached(operation_id)
        try:
            new = change(op)
        except HeadwayError:
            new, refused = None, True
        else:
            refused = False
            if new is not None:
                return op, new  # a stale copy fails the compare-and-set
        current = await self._load(operation_id)
        if refused or current.revision != op.revision:
            return current, change(current)
        return current, None

    async def update_many(
        self, reports: Sequence[tuple[str, Update]]
    ) -> list[UpdateResult | HeadwayError]:
        """Applies reports in order, each on its own, as `update` would one by
        one, but written to the store together (one round trip to a shared
        store, for a batch whose operations this process holds current copies
        of). A parent whose children changed is rolled up once per batch."""
        results: list[UpdateResult | HeadwayError | None] = [None] * len(reports)
        # Per operation written in this batch: the value its last planned write
        # stores, and that write's index in `writes` (the next one chains on it).
        latest: dict[str, Operation] = {}
        planned: dict[str, int] = {}
        # (report index, value before, value to write, expected revision or None)
        writes: list[tuple[int, Operation, Operation, int | None]] = []
        # Reports judged on a planned value (duplicates of it, or refused on
        # it), by report index: the planned write's index. If that write does
        # not land, they are judged again.
        depends: dict[int, int] = {}
        for i, (operation_id, update) in enumerate(reports):
            try:
                lifecycle.validate_update(update)
            except HeadwayError as exc:
                results[i] = exc
                continue
            try:
                value = latest.get(operation_id)
                if value is not None:  # judged on what this batch plans for it
                    op, new = value, self._report(value, update)
                else:
                    op, new = await self._judged(
                        operation_id, functools.partial(self._report, update=update)
                    )
            except StoreUnavailable:
                raise  # the whole batch: every other report would wait for it too
            except HeadwayError as exc:
                results[i] = exc
                if operation_id in planned:
                    depends[i] = planned[operation_id]
                continue
            if new is None:
                if operation_id in planned:
                    depends[i] = planned[operation_id]
                else:
                    results[i] = UpdateResult(op, False)
                continue
            writes.append((i, op, new, None if operation_id in planned else op.revision))
            latest[operation_id] = new
            planned[operation_id] = len(writes) - 1
        outcomes = await self.store.replace_many([(w[2], w[3]) for w in writes])
        stored: dict[int, Operation] = {}
        parents: set[str] = set()
        for (i, old, _, _), outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, Operation):
                stored[i] = outcome
                results[i] = UpdateResult(outcome, True)
                self.observer.update_applied()
                await self._after_write(old, outcome, roll_up=False)
                if outcome.parent_id and self._rolls_up(old, outcome):
                    parents.add(outcome.parent_id)
        for i, write in depends.items():
            landed = stored.get(writes[write][0])
            if landed is None:
                results[i] = None  # judged on a value never stored
            elif results[i] is None:
                results[i] = UpdateResult(landed, False)
        for parent_id in parents:
            await self._roll_up(parent_id)
        final: list[UpdateResult | HeadwayError] = []
        for i, result in enumerate(results):
            if result is None:
                # Not written together (a stale copy, a race lost to another
                # replica, or a duplicate of such a write): alone, as
                # UpdateOperation would.
                operation_id, update = reports[i]
                try:
                    result = await self.update(operation_id, update)
                except StoreUnavailable:
                    raise
                except HeadwayError as exc:
                    result = exc
            final.append(result)
        return final

    async def _finish(
        self, operation_id: str, call: str, request_id: str, **changes: Any
    ) -> Operation:
        def change(op: Operation) -> Operation | None:
            if lifecycle.repeat_of_finish(op, call, request_id):
                return None
            now = self._clock()
            ended = lifecycle.finish(op, now=now, call=call, request_id=request_id, **changes)
            return self._refresh(ended, now)

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
            # Cancelling a parent asks its running children (and theirs) to stop too.
            for child in await self.store.children(op.id):
                if child.state.active and not child.cancel_requested:
                    try:
                        await self.cancel(child.id, f"parent {op.id} cancelled: {reason}"[:4000])
                    except (NotFound, FailedPrecondition):
                        continue
        return op

    async def delete(self, operation_id: str, *, reason: str = "DeleteOperation") -> int:
        op = await self._load(operation_id)
        revision = await self.store.delete(operation_id)
        await self.journal.forget(operation_id)
        log.info(
            "operation deleted",
            extra={"operation_id": operation_id, "revision": revision, "reason": reason},
        )
        if op.parent_id:
            await self._roll_up(op.parent_id)
        return revision

    async def report_logs(
        self, operation_id: str, entries: Sequence[LogEntry]
    ) -> tuple[Operation, int]:
        """Stores log entries and counts errors/warnings; (operation, dropped so far)."""
        if len(entries) > MAX_LOG_ENTRIES_PER_CALL:
            raise InvalidArgument("entries", f"more than {MAX_LOG_ENTRIES_PER_CALL} per call")
        now = self._clock()
        stamped = []
        for i, entry in enumerate(entries):
            field = f"entries[{i}]"
            v.check_bytes(f"{field}.message", entry.message, v.MAX_MESSAGE_BYTES)
            v.check_name(f"{field}.stage", entry.stage, v.MAX_KEY_LENGTH)
            v.check_bytes(f"{field}.item", entry.item, v.MAX_MESSAGE_BYTES)
            v.check_name(f"{field}.code", entry.code)
            v.check_struct(f"{field}.details", entry.details)
            v.check_number(f"{field}.time", entry.time, low=0, high=1e12)
            stamped.append(entry if entry.time else evolve(entry, time=now))
        errors = sum(1 for e in stamped if e.level is LogLevel.ERROR)
        warnings = sum(1 for e in stamped if e.level is LogLevel.WARNING)

        def count(op: Operation) -> Operation | None:
            if not errors and not warnings:
                return None
            counted = evolve(
                op,
                error_count=op.error_count + errors,
                warning_count=op.warning_count + warnings,
                updated_at=now,
            )
            return self._refresh(counted, now)

        op, _ = await self._modify(operation_id, count)
        dropped = await self.journal.append_logs(operation_id, stamped)
        error_entries = [
            TimelineEntry(TimelineType.ERROR, e.time, op.revision, e.stage, _error_text(e))
            for e in stamped
            if e.level is LogLevel.ERROR
        ]
        if error_entries:
            await self.journal.append_timeline(operation_id, error_entries)
        return op, dropped

    async def list_logs(
        self,
        operation_id: str,
        *,
        min_level: LogLevel | None = None,
        stage: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[LogEntry], str, int]:
        """A page of log entries, oldest first; (entries, next token, dropped)."""
        await self._load(operation_id)
        if page_size < 0:
            raise InvalidArgument("page_size", f"must not be negative (got {page_size})")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        key = _key(f"logs\0{operation_id}\0{min_level}\0{stage}")
        after = _decode_page_token(page_token, key)
        held, dropped = await self.journal.logs(operation_id)
        matching = [
            e
            for e in held
            if e.index > after
            and (min_level is None or e.level >= min_level)
            and (not stage or e.stage == stage)
        ]
        page = matching[:limit]
        more = len(matching) > limit
        token = _encode_page_token(page[-1].index, key) if more else ""
        return page, token, dropped

    async def timeline(self, operation_id: str) -> tuple[list[TimelineEntry], int]:
        await self._load(operation_id)
        return await self.journal.timeline(operation_id)

    async def stats(self, where: OperationFilter, *, window: float | None = None) -> Stats:
        if window is not None:
            v.check_number("window", window, low=0, high=1e9)
        held = await self.store.scan()
        return self.aggregate.compute(held, where, window=window, now=self._clock())

    async def get(self, operation_id: str) -> Operation:
        return await self._load(operation_id)

    async def check_visible(self, operation_id: str) -> None:
        """Raises NotFound unless the caller may see the operation, live or
        (its tombstone) deleted; an unknown one is left to the caller."""
        op = await self.store.get(operation_id)
        if op is None:
            tomb = await self.store.tombstone(operation_id)
            if tomb is None:
                return
            op = tomb.operation
        if not auth.visible(op.project):
            raise NotFound(f"operation {operation_id!r} not found")

    async def list(
        self, where: OperationFilter, *, page_size: int = 0, page_token: str = ""
    ) -> tuple[Page, str]:
        """A page of operations and the token for the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must not be negative (got {page_size})")
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        key = _filter_key(where)
        after = _decode_page_token(page_token, key)
        page = await self.store.list_page(where, after=after, limit=limit)
        token = _encode_page_token(page.next_after, key) if page.next_after else ""
        return page, token

    async def sweep(self) -> int:
        """Marks operations whose heartbeat lease ran out as stalled and removes
        terminal ones past retention, from the store's indexes of lease
        deadlines and finish times. Returns how many operations it changed."""
        now = self._clock()
        changed = 0
        while True:
            expired = await self.store.finished_before(now - self.retention, limit=_SWEEP_BATCH)
            for operation_id in expired:
                try:
                    await self.delete(operation_id, reason="retention expired")
                except NotFound:
                    continue
                changed += 1
            if len(expired) < _SWEEP_BATCH:
                break

        def lapse(o: Operation) -> Operation | None:
            # Alerts other than STALLED are judged on reports, not on the clock,
            # so a quiet operation's state changes only when its lease runs out.
            stalled = lifecycle.mark_stalled(o, now)
            return None if stalled is None else self._refresh(stalled, now)

        for operation_id in await self.store.lapsed_leases(now):
            try:
                new, did = await self._modify(operation_id, lapse)
            except NotFound:
                continue
            if did:
                if new.stalled:
                    log.warning("operation stalled", extra={"operation_id": operation_id})
                changed += 1
        return changed

    async def counts(self) -> dict[tuple[str, str], int]:
        """Operations held, by (state name, kind)."""
        return await self.store.counts()


def _error_text(entry: LogEntry) -> str:
    text = f"{entry.code}: {entry.message}" if entry.code else entry.message
    return f"{text} ({entry.item})" if entry.item else text


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _filter_key(where: OperationFilter) -> str:
    """What a page token is tied to: the filter it pages through."""
    fields = dataclasses.asdict(where)
    fields["states"] = sorted(int(s) for s in where.states)
    fields["projects"] = None if where.projects is None else sorted(where.projects)
    return _key(json.dumps(fields, sort_keys=True, default=str))


def _encode_page_token(after: int, key: str) -> str:
    raw = json.dumps({"after": after, "filter": key}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, key: str) -> int:
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        after = data["after"]
        issued_for = data["filter"]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise InvalidArgument("page_token", "is not a token this server issued") from exc
    if not isinstance(after, int) or after < 0 or issued_for != key:
        raise InvalidArgument("page_token", "belongs to a different filter or is malformed")
    return after
