"""OperationService over MemoryStore with a fake clock (README guarantees 1, 2, 4, 7-9)."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from headway_server.app.service import OperationService
from headway_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from headway_server.domain.model import (
    OperationError,
    OperationFilter,
    StageSpec,
    StartSpec,
    State,
    Update,
)
from headway_server.store.memory import MemoryStore

T0 = 10_000.0


class Clock:
    def __init__(self) -> None:
        self.now = [T0]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, seconds: float) -> None:
        self.now[0] += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def service(store: MemoryStore, clock: Clock) -> OperationService:
    return OperationService(store, retention=60.0, clock=clock)


SPEC = StartSpec(kind="ingest", project="acme", total=10, labels={"team": "a"})


# --- start ------------------------------------------------------------------------------


async def test_operations_started_alike_share_the_parts_of_their_spec(
    service: OperationService,
) -> None:
    # A retained operation would otherwise carry its own copies (bench: retained memory).
    stages = [StageSpec("clone", 1.0), StageSpec("index", 4.0)]
    a = await service.start(
        StartSpec(kind="ingest", labels={"team": "a", "env": "prod"}, stages=tuple(stages))
    )
    b = await service.start(
        StartSpec(kind="ingest", labels={"env": "prod", "team": "a"}, stages=tuple(stages), total=5)
    )
    other = await service.start(StartSpec(kind="ingest", labels={"team": "b", "env": "prod"}))
    assert b.labels is a.labels
    assert b.spec.stages is a.spec.stages
    assert b.kind is a.kind
    assert (a.total, b.total) == (0, 5)
    assert other.labels is not a.labels
    assert other.labels == {"team": "b", "env": "prod"}


async def test_start_creates_queued_operation(service: OperationService) -> None:
    op = await service.start(SPEC, operation_id="op-1")
    assert op.id == "op-1"
    assert op.state is State.QUEUED
    assert op.revision == 1
    assert op.created_revision == 1
    assert op.created_at == T0
    assert await service.get("op-1") == op


async def test_start_same_spec_returns_existing(
    service: OperationService, store: MemoryStore, clock: Clock
) -> None:
    first = await service.start(SPEC, operation_id="op-1")
    clock.advance(5)
    again = await service.start(
        StartSpec(kind="ingest", project="acme", total=10, labels={"team": "a"}),
        operation_id="op-1",
    )
    assert again == first
    assert (await store.revision()) == 1


async def test_start_same_spec_after_progress_returns_current_state(
    service: OperationService,
) -> None:
    await service.start(SPEC, operation_id="op-1")
    await service.update("op-1", Update(completed=3))
    again = await service.start(SPEC, operation_id="op-1")
    assert again.completed == 3
    assert again.state is State.RUNNING


async def test_start_normalised_stage_weights_compare_equal(service: OperationService) -> None:
    spec = StartSpec(stages=(StageSpec("a", 0), StageSpec("b", 2)))
    first = await service.start(spec, operation_id="op-1")
    assert await service.start(spec, operation_id="op-1") == first
    explicit = StartSpec(stages=(StageSpec("a", 1), StageSpec("b", 2)))
    assert await service.start(explicit, operation_id="op-1") == first


@pytest.mark.parametrize(
    "other",
    [
        StartSpec(kind="ingest", project="acme", total=11, labels={"team": "a"}),
        StartSpec(kind="crawl", project="acme", total=10, labels={"team": "a"}),
        StartSpec(kind="ingest", project="acme", total=10, labels={"team": "b"}),
        StartSpec(kind="ingest", project="acme", total=10),
    ],
)
async def test_start_different_spec_is_already_exists(
    service: OperationService, store: MemoryStore, other: StartSpec
) -> None:
    first = await service.start(SPEC, operation_id="op-1")
    with pytest.raises(AlreadyExists):
        await service.start(other, operation_id="op-1")
    assert await store.get("op-1") == first
    assert (await store.revision()) == 1


async def test_generated_id_is_stable_for_a_request_id(service: OperationService) -> None:
    a = await service.start(SPEC, request_id="req-1")
    b = await service.start(SPEC, request_id="req-1")
    c = await service.start(SPEC, request_id="req-2")
    assert a.id.startswith("op-")
    assert a == b
    assert c.id != a.id
    assert "req-1" not in a.id


async def test_generated_id_same_request_id_different_spec(service: OperationService) -> None:
    await service.start(SPEC, request_id="req-1")
    with pytest.raises(AlreadyExists):
        await service.start(StartSpec(kind="other", project="acme"), request_id="req-1")


async def test_generated_ids_are_per_project(service: OperationService) -> None:
    a = await service.start(StartSpec(project="p1"), request_id="req")
    b = await service.start(StartSpec(project="p2"), request_id="req")
    assert a.id != b.id


async def test_generated_ids_without_request_id_are_unique(service: OperationService) -> None:
    ids = {(await service.start(SPEC)).id for _ in range(5)}
    assert len(ids) == 5


async def test_start_with_unknown_parent_is_not_found(
    service: OperationService, store: MemoryStore
) -> None:
    with pytest.raises(NotFound, match="parent_id"):
        await service.start(StartSpec(parent_id="nope"), operation_id="child")
    assert (await store.revision()) == 0
    await service.start(StartSpec(), operation_id="parent")
    child = await service.start(StartSpec(parent_id="parent"), operation_id="child")
    assert child.parent_id == "parent"


async def test_start_invalid_is_rejected_and_changes_nothing(
    service: OperationService, store: MemoryStore
) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await service.start(StartSpec(kind="k" * 129), operation_id="op-1")
    assert exc.value.field == "kind"
    with pytest.raises(InvalidArgument) as exc:
        await service.start(StartSpec(), operation_id="-bad")
    assert exc.value.field == "operation_id"
    assert (await store.revision()) == 0


async def test_start_when_store_is_full(clock: Clock) -> None:
    service = OperationService(MemoryStore(max_operations=1), clock=clock)
    await service.start(SPEC, operation_id="op-1")
    with pytest.raises(ResourceExhausted):
        await service.start(SPEC, operation_id="op-2")
    # Retrying the existing one still works.
    assert (await service.start(SPEC, operation_id="op-1")).id == "op-1"


# --- update -----------------------------------------------------------------------------


async def test_update_applies_and_runs(service: OperationService, clock: Clock) -> None:
    await service.start(SPEC, operation_id="op-1")
    clock.advance(2)
    result = await service.update("op-1", Update(sequence=1, completed=5, counters={"a": 1}))
    assert result.applied
    assert result.operation.state is State.RUNNING
    assert result.operation.percent == pytest.approx(50.0)
    assert result.operation.revision == 2
    assert result.operation.updated_at == T0 + 2


async def test_duplicate_sequence_is_not_applied(
    service: OperationService, store: MemoryStore
) -> None:
    await service.start(SPEC, operation_id="op-1")
    first = await service.update("op-1", Update(sequence=2, counters={"a": 1}, completed=4))
    for seq in (2, 1):
        retry = await service.update("op-1", Update(sequence=seq, counters={"a": 1}, completed=9))
        assert not retry.applied
        assert retry.operation == first.operation
    assert (await store.revision()) == first.operation.revision
    stored = await service.get("op-1")
    assert dict(stored.counters) == {"a": 1}
    assert stored.completed == 4
    nxt = await service.update("op-1", Update(sequence=3, counters={"a": 1}))
    assert nxt.applied
    assert dict(nxt.operation.counters) == {"a": 2}


async def test_unsequenced_updates_always_apply(service: OperationService) -> None:
    await service.start(SPEC, operation_id="op-1")
    await service.update("op-1", Update(sequence=5))
    r = await service.update("op-1", Update(counters={"a": 1}))
    assert r.applied
    r = await service.update("op-1", Update(counters={"a": 1}))
    assert r.applied
    assert dict(r.operation.counters) == {"a": 2}


async def test_update_unknown_and_bad_ids(service: OperationService) -> None:
    with pytest.raises(NotFound):
        await service.update("missing", Update())
    with pytest.raises(InvalidArgument) as exc:
        await service.update("", Update())
    assert exc.value.field == "operation_id"


async def test_invalid_update_changes_nothing(
    service: OperationService, store: MemoryStore
) -> None:
    await service.start(SPEC, operation_id="op-1")
    with pytest.raises(InvalidArgument) as exc:
        await service.update("op-1", Update(sequence=1, completed=11, counters={"a": 1}))
    assert exc.value.field == "completed"
    op = await service.get("op-1")
    assert op.last_sequence == 0
    assert dict(op.counters) == {}
    assert (await store.revision()) == 1


async def test_update_after_end_is_failed_precondition_even_when_duplicate(
    service: OperationService, store: MemoryStore
) -> None:
    await service.start(SPEC, operation_id="op-1")
    await service.update("op-1", Update(sequence=3))
    await service.complete("op-1")
    revision = await store.revision()
    for seq in (1, 4, 0):
        with pytest.raises(FailedPrecondition):
            await service.update("op-1", Update(sequence=seq))
    assert (await store.revision()) == revision


# --- complete / fail / cancel / delete -------------------------------------------------


async def test_complete_repeat_with_same_request_id(
    service: OperationService, store: MemoryStore, clock: Clock
) -> None:
    await service.start(SPEC, operation_id="op-1")
    done = await service.complete("op-1", result={"n": 1}, request_id="done-1")
    assert done.state is State.SUCCEEDED
    assert done.percent == 100.0
    clock.advance(1)
    assert await service.complete("op-1", request_id="done-1") == done
    assert (await store.revision()) == done.revision
    with pytest.raises(FailedPrecondition):
        await service.complete("op-1", request_id="done-2")
    with pytest.raises(FailedPrecondition):
        await service.complete("op-1")
    with pytest.raises(FailedPrecondition):
        await service.fail("op-1", OperationError(code="X"), request_id="done-1")


async def test_fail_and_cancel_ack(service: OperationService) -> None:
    await service.start(SPEC, operation_id="op-1")
    await service.update("op-1", Update(message="working"))
    requested = await service.cancel("op-1", "user")
    assert requested.cancel_requested
    assert requested.state is State.RUNNING
    r = await service.update("op-1", Update(message="winding down"))
    assert r.operation.cancel_requested
    ended = await service.fail("op-1", OperationError(code="CANCELLED", message="ok"))
    assert ended.state is State.CANCELLED
    assert ended.message == "ok"
    # Cancelling again is a no-op that returns the operation.
    assert await service.cancel("op-1") == ended


async def test_cancel_queued_and_terminal(service: OperationService, store: MemoryStore) -> None:
    await service.start(SPEC, operation_id="q")
    cancelled = await service.cancel("q", "not needed")
    assert cancelled.state is State.CANCELLED
    revision = await store.revision()
    assert await service.cancel("q") == cancelled
    assert (await store.revision()) == revision

    await service.start(SPEC, operation_id="f")
    await service.fail("f", OperationError(code="BOOM"))
    with pytest.raises(FailedPrecondition):
        await service.cancel("f")


async def test_delete(service: OperationService, store: MemoryStore) -> None:
    await service.start(SPEC, operation_id="op-1")
    revision = await service.delete("op-1")
    assert revision == (await store.revision()) == 2
    with pytest.raises(NotFound):
        await service.get("op-1")
    with pytest.raises(NotFound):
        await service.delete("op-1")


# --- sweep ------------------------------------------------------------------------------


async def test_sweep_marks_stalled_running_operations(
    service: OperationService, clock: Clock
) -> None:
    lease = StartSpec(heartbeat_timeout=30)
    await service.start(lease, operation_id="running")
    await service.start(lease, operation_id="queued")
    await service.start(lease, operation_id="paused")
    await service.start(StartSpec(), operation_id="no-lease")
    await service.update("running", Update())
    await service.update("paused", Update(paused=True))
    await service.update("no-lease", Update())
    clock.advance(29)
    assert await service.sweep() == 0
    clock.advance(1)
    assert await service.sweep() == 1
    assert (await service.get("running")).stalled
    for op_id in ("queued", "paused", "no-lease"):
        assert not (await service.get(op_id)).stalled
    # Already stalled: nothing more.
    assert await service.sweep() == 0
    r = await service.update("running", Update(message="alive"))
    assert not r.operation.stalled


async def test_expiry_is_logged_once_with_its_reason(
    service: OperationService, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await service.start(SPEC, operation_id="done")
    await service.complete("done")
    clock.advance(60)
    with caplog.at_level(logging.INFO, logger="headway"):
        assert await service.sweep() == 1
    lines = [r for r in caplog.records if getattr(r, "operation_id", "") == "done"]
    assert [(r.getMessage(), getattr(r, "reason", None)) for r in lines] == [
        ("operation deleted", "retention expired")
    ]


async def test_sweep_expires_terminal_operations_after_retention(
    service: OperationService, store: MemoryStore, clock: Clock
) -> None:
    await service.start(SPEC, operation_id="done")
    await service.start(SPEC, operation_id="failed")
    await service.start(SPEC, operation_id="queued")
    await service.start(SPEC, operation_id="running")
    await service.update("running", Update())
    await service.complete("done")
    await service.fail("failed", OperationError(code="X"))
    clock.advance(59.9)
    assert await service.sweep() == 0
    clock.advance(0.1)
    assert await service.sweep() == 2
    for op_id in ("done", "failed"):
        with pytest.raises(NotFound):
            await service.get(op_id)
        tomb = await store.tombstone(op_id)
        assert tomb is not None
        assert tomb.deleted
    # Active operations never expire.
    clock.advance(10 * 365 * 24 * 3600)
    assert await service.sweep() == 0
    assert (await service.get("queued")).state is State.QUEUED
    assert (await service.get("running")).state is State.RUNNING


async def test_retention_runs_from_finish_not_start(
    service: OperationService, clock: Clock
) -> None:
    await service.start(SPEC, operation_id="op-1")
    clock.advance(1_000)
    await service.complete("op-1")
    clock.advance(30)
    assert await service.sweep() == 0
    clock.advance(30)
    assert await service.sweep() == 1


# --- list -------------------------------------------------------------------------------


async def start_many(service: OperationService, n: int, project: str = "acme") -> list[str]:
    ids = [f"{project}-{i:02d}" for i in range(n)]
    for op_id in ids:
        await service.start(StartSpec(project=project), operation_id=op_id)
    return ids


async def test_list_pages_in_creation_order(service: OperationService) -> None:
    ids = await start_many(service, 7)
    await start_many(service, 3, project="other")
    # Changing an early operation does not move it.
    await service.update(ids[0], Update(message="moved?"))
    where = OperationFilter(project="acme")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = await service.list(where, page_size=3, page_token=token)
        pages += 1
        seen.extend(op.id for op in page.operations)
        assert page.revision == 11
        if not token:
            break
    assert seen == ids
    assert pages == 3


async def test_list_exact_page_has_no_token(service: OperationService) -> None:
    await start_many(service, 3)
    page, token = await service.list(OperationFilter(), page_size=3)
    assert len(page.operations) == 3
    assert token == ""


async def test_list_default_and_max_page_size(service: OperationService) -> None:
    await start_many(service, 101)
    page, token = await service.list(OperationFilter())
    assert len(page.operations) == 100
    assert token
    page, token = await service.list(OperationFilter(), page_size=10_000)
    assert len(page.operations) == 101
    assert token == ""


async def test_list_negative_page_size(service: OperationService) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await service.list(OperationFilter(), page_size=-1)
    assert exc.value.field == "page_size"


async def test_page_token_is_tied_to_the_filter(service: OperationService) -> None:
    await start_many(service, 5)
    where = OperationFilter(project="acme")
    _, token = await service.list(where, page_size=2)
    assert token
    # The same filter built again is accepted.
    page, _ = await service.list(OperationFilter(project="acme"), page_size=2, page_token=token)
    assert [op.id for op in page.operations] == ["acme-02", "acme-03"]
    for other in (
        OperationFilter(),
        OperationFilter(project="acme", active_only=True),
        OperationFilter(project="acme", states=frozenset({State.QUEUED})),
        OperationFilter(project="acme", labels={"x": "y"}),
    ):
        with pytest.raises(InvalidArgument) as exc:
            await service.list(other, page_size=2, page_token=token)
        assert exc.value.field == "page_token"


async def test_page_token_state_order_does_not_matter(service: OperationService) -> None:
    await start_many(service, 3)
    a = OperationFilter(states=frozenset({State.QUEUED, State.RUNNING}))
    b = OperationFilter(states=frozenset({State.RUNNING, State.QUEUED}))
    _, token = await service.list(a, page_size=1)
    page, _ = await service.list(b, page_size=1, page_token=token)
    assert [op.id for op in page.operations] == ["acme-01"]


def _token(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "garbage!!",
        "not-base64",
        "e30",  # {}
        _token([1, 2]),
        _token("x"),
        _token({"after": 1}),
        _token({"after": "1", "filter": "x"}),
        _token({"after": -1, "filter": "x"}),
        _token({"after": 1, "filter": "0123456789abcdef"}),
        base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
    ],
)
async def test_garbage_page_token(service: OperationService, token: str) -> None:
    await start_many(service, 3)
    with pytest.raises(InvalidArgument) as exc:
        await service.list(OperationFilter(), page_token=token)
    assert exc.value.field == "page_token"


async def test_list_filters(service: OperationService) -> None:
    await service.start(StartSpec(project="p", kind="a", labels={"t": "1"}), operation_id="a")
    await service.start(StartSpec(project="p", kind="b", labels={"t": "2"}), operation_id="b")
    await service.start(StartSpec(project="p", parent_id="a"), operation_id="c")
    await service.complete("b")

    async def ids(where: OperationFilter) -> list[str]:
        page, _ = await service.list(where)
        return [op.id for op in page.operations]

    assert await ids(OperationFilter(project="p")) == ["a", "b", "c"]
    assert await ids(OperationFilter(kind="b")) == ["b"]
    assert await ids(OperationFilter(labels={"t": "1"})) == ["a"]
    assert await ids(OperationFilter(parent_id="a")) == ["c"]
    assert await ids(OperationFilter(active_only=True)) == ["a", "c"]
    assert await ids(OperationFilter(states=frozenset({State.SUCCEEDED}))) == ["b"]
    assert await ids(OperationFilter(project="q")) == []


# --- ETA history (issue 14) -------------------------------------------------------------


async def test_finished_runs_of_a_kind_teach_the_eta_of_the_next(
    service: OperationService, clock: Clock
) -> None:
    """Equal weights, but stage c takes three times as long as a or b: after three
    runs the next one's ETA halfway through b expects it."""
    spec = StartSpec(
        kind="learned", stages=(StageSpec("a", 1), StageSpec("b", 1), StageSpec("c", 1))
    )

    async def run(until: float | None = None) -> float | None:
        op = await service.start(spec)
        sequence, elapsed = 0, 0.0
        for name, seconds in (("a", 10), ("b", 10), ("c", 30)):
            for i in range(seconds + 1):
                if until is not None and elapsed + i > until:
                    return (await service.get(op.id)).estimate.eta
                sequence += 1
                done = round(10 * i / seconds)
                update = Update(sequence=sequence, stage=name, stage_completed=done, stage_total=10)
                await service.update(op.id, update)
                clock.advance(1.0 if i < seconds else 0.0)
            elapsed += seconds
        await service.complete(op.id)
        return None

    before = await run(until=15)
    for _ in range(3):
        await run()
    after = await run(until=15)
    assert before is not None and after is not None
    assert abs(after - 35) < 0.15 * 35 < abs(before - 35)
