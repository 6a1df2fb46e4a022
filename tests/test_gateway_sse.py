"""Live updates over HTTP (issue 13): the gateway's Server-Sent Events, read with
httpx-sse against a real server.

Many producers (over HTTP and over gRPC) drive operations to their ends while
several SSE watchers follow the project, some dropping the connection mid-way
and resuming with `Last-Event-ID` (or `?lastEventId=`) again and again. Each
watcher's recording, all its connections end to end, must show ordered
revisions, no (operation, revision) twice, every operation's end, and as last
state per operation what `GET /v1/operations/{id}` returns. Then: the
single-operation stream and its resume, ids and parameters that are refused
before a stream starts, authentication and project scoping as gRPC has them,
pacing, and keep-alive comments on quiet streams.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server import auth, gateway
from httpx_sse import ServerSentEvent, connect_sse

if TYPE_CHECKING:  # mypy knows the helpers as tests.*, pytest as top-level modules
    from tests import watch_checks as wc
    from tests.conftest import TEST_CONFIG, ServerThread
else:
    import watch_checks as wc
    from conftest import TEST_CONFIG, ServerThread

READ_TIMEOUT = 5.0  # no single read of a live stream may wait longer than this
TERMINAL_NAMES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


# --- reading SSE ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Received:
    """One SSE event as a client sees it: `event:`, `id:`, `data:` parsed, arrival."""

    name: str
    id: str
    event: pb.OperationEvent
    at: float

    @property
    def epoch(self) -> str:
        return self.id.rpartition(".")[0]

    @property
    def revision(self) -> int:
        return int(self.id.rpartition(".")[2])

    @property
    def operation_id(self) -> str:
        return self.event.operation.id

    @property
    def state(self) -> str:
        return pb.Operation.State.Name(self.event.operation.state)


def parse(sse: ServerSentEvent) -> Received | None:
    """The event, framing checked; None for the `retry:` preamble (no data)."""
    if not sse.data:
        assert sse.retry is not None, f"an event without data: {sse!r}"
        return None
    # Strict: a field the proto does not know is an error.
    event = json_format.Parse(sse.data, pb.OperationEvent())
    received = Received(sse.event, sse.id, event, time.monotonic())
    assert sse.event == wc.type_name(event).lower(), f"`event:` is not the data's type: {sse!r}"
    epoch, dot, number = sse.id.rpartition(".")
    assert dot and epoch and number.isdecimal(), f"`id:` is not epoch.revision: {sse!r}"
    assert received.revision == event.revision, f"`id:` is not the event's revision: {sse!r}"
    if event.epoch:
        assert event.epoch == epoch, f"`id:` names another epoch than the event: {sse!r}"
    return received


@contextlib.contextmanager
def sse(
    client: httpx.Client,
    path: str,
    *,
    params: dict[str, str] | None = None,
    last_event_id: str = "",
    headers: dict[str, str] | None = None,
) -> Iterator[Iterator[Received]]:
    """An open SSE stream (asserted 200 text/event-stream) as an iterator of events;
    leaving the block drops the connection, as a closed browser tab does."""
    sent = dict(headers or {})
    if last_event_id:
        sent["Last-Event-ID"] = last_event_id
    with connect_sse(client, "GET", path, params=params or {}, headers=sent) as source:
        response = source.response
        if response.status_code != 200:
            response.read()
            raise AssertionError(f"GET {path}: {response.status_code} {response.text}")
        assert response.headers["cache-control"] == "no-cache"
        yield (r for s in source.iter_sse() if (r := parse(s)) is not None)


def read_until(events: Iterator[Received], done: Callable[[Received], bool]) -> list[Received]:
    """Events read until one satisfies `done` (that one included)."""
    got: list[Received] = []
    for received in events:
        got.append(received)
        if done(received):
            return got
    raise AssertionError(f"the stream ended first: {describe(got)}")


def named(*names: str) -> Callable[[Received], bool]:
    return lambda r: r.name in names


def describe(received: list[Received]) -> str:
    return wc.describe(r.event for r in received)


def refusal(response: httpx.Response) -> tuple[int, str]:
    """(HTTP status, gRPC status name) of a JSON error, asserted to be one."""
    assert response.headers["content-type"].startswith("application/json"), (
        f"{response.status_code} {response.headers['content-type']}: {response.text[:200]}"
    )
    error = response.json()["error"]
    assert error["code"] == response.status_code and error["message"], error
    return response.status_code, str(error["status"])


def get_refused(client: httpx.Client, path: str, **kwargs: Any) -> tuple[int, str]:
    """What a watch request that must be refused answers, read without waiting
    for a stream (a 200 here would be a stream: it is closed at once)."""
    with client.stream("GET", path, **kwargs) as response:
        if response.status_code == 200:
            raise AssertionError(f"GET {path} was accepted ({response.headers['content-type']})")
        response.read()
        return refusal(response)


def stored(client: httpx.Client, operation_id: str, headers: dict[str, str] | None = None) -> Any:
    """GET /v1/operations/{id}, as the Operation message it encodes."""
    reply = client.get(f"/v1/operations/{operation_id}", headers=headers or {})
    assert reply.status_code == 200, reply.text
    return json_format.ParseDict(reply.json(), pb.Operation())


def http_base(server: ServerThread) -> str:
    assert server.server is not None and server.server.http_port
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def served() -> Iterator[ServerThread]:
    """One server for the tests that need no settings of their own (each works
    in projects of its own)."""
    server = ServerThread(dataclasses.replace(TEST_CONFIG, http_listen="127.0.0.1:0")).start()
    yield server
    server.close()


@pytest.fixture
def http(served: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=http_base(served), timeout=READ_TIMEOUT) as client:
        yield client


# --- many producers, many watchers ------------------------------------------------------

PRODUCERS = 8
OPERATIONS_EACH = 3
UPDATES = 12
ENDINGS = ("complete", "fail", "cancel", "cancel-queued")
WANT_STATE = {
    "complete": "SUCCEEDED",
    "fail": "FAILED",
    "cancel": "CANCELLED",
    "cancel-queued": "CANCELLED",
}
TIME_LIMIT = 20.0


class HttpProducer:
    """A producer that speaks the HTTP/JSON API."""

    def __init__(self, base: str) -> None:
        self.client = httpx.Client(base_url=base, timeout=READ_TIMEOUT)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.client.post(path, json=body)
        assert reply.status_code == 200, f"POST {path}: {reply.status_code} {reply.text}"
        answer: dict[str, Any] = reply.json()
        return answer

    def start(self, operation_id: str, project: str, index: int) -> None:
        self._post(
            "/v1/operations",
            {
                "operationId": operation_id,
                "kind": "sse-load",
                "project": project,
                "total": str(UPDATES),
                "labels": {"producer": str(index), "via": "http"},
            },
        )

    def update(self, operation_id: str, step: int) -> bool:
        """One report; whether cancellation was requested."""
        body = {
            "sequence": str(step),
            "completed": str(step),
            "counters": {"rows": "1"},
            "message": f"step {step}",
        }
        answer = self._post(f"/v1/operations/{operation_id}:update", body)
        assert answer.get("applied") is True, answer
        return bool(answer.get("cancelRequested", False))

    def cancel(self, operation_id: str) -> None:
        self._post(f"/v1/operations/{operation_id}:cancel", {"reason": "not needed"})

    def complete(self, operation_id: str) -> None:
        self._post(f"/v1/operations/{operation_id}:complete", {"message": "done"})

    def fail(self, operation_id: str, code: str) -> None:
        self._post(
            f"/v1/operations/{operation_id}:fail", {"error": {"code": code, "message": "stopped"}}
        )

    def close(self) -> None:
        self.client.close()


class GrpcProducer:
    """The same producer over the generated stubs."""

    def __init__(self, address: str) -> None:
        self._stub_context = wc.open_stub(address)
        self.stub = self._stub_context.__enter__()

    def start(self, operation_id: str, project: str, index: int) -> None:
        self.stub.StartOperation(
            pb.StartOperationRequest(
                operation_id=operation_id,
                kind="sse-load",
                project=project,
                total=UPDATES,
                labels={"producer": str(index), "via": "grpc"},
            ),
            timeout=5,
        )

    def update(self, operation_id: str, step: int) -> bool:
        response = self.stub.UpdateOperation(
            pb.UpdateOperationRequest(
                operation_id=operation_id,
                sequence=step,
                completed=step,
                counters={"rows": 1},
                message=f"step {step}",
            ),
            timeout=5,
        )
        assert response.applied
        return response.cancel_requested

    def cancel(self, operation_id: str) -> None:
        self.stub.CancelOperation(
            pb.CancelOperationRequest(operation_id=operation_id, reason="not needed"), timeout=5
        )

    def complete(self, operation_id: str) -> None:
        self.stub.CompleteOperation(
            pb.CompleteOperationRequest(operation_id=operation_id, message="done"), timeout=5
        )

    def fail(self, operation_id: str, code: str) -> None:
        error = pb.OperationError(code=code, message="stopped")
        self.stub.FailOperation(
            pb.FailOperationRequest(operation_id=operation_id, error=error), timeout=5
        )

    def close(self) -> None:
        self._stub_context.__exit__(None, None, None)


def drive(
    producer: HttpProducer | GrpcProducer, project: str, index: int, jobs: dict[str, str]
) -> None:
    """Runs this producer's operations side by side, each to its ending."""
    try:
        for operation_id in jobs:
            producer.start(operation_id, project, index)
        running = dict(jobs)
        for operation_id, ending in jobs.items():
            if ending == "cancel-queued":
                producer.cancel(operation_id)  # CANCELLED at once: never ran
                del running[operation_id]
        for step in range(1, UPDATES + 1):
            for operation_id, ending in list(running.items()):
                if producer.update(operation_id, step):
                    producer.fail(operation_id, "CANCELLED")  # acknowledges the cancel
                    del running[operation_id]
                elif ending == "cancel" and step == UPDATES // 2:
                    producer.cancel(operation_id)
            time.sleep(0.005)
        for operation_id, ending in running.items():
            assert ending != "cancel", f"{operation_id}: the cancellation never reached it"
            if ending == "complete":
                producer.complete(operation_id)
            else:
                producer.fail(operation_id, "BOOM")
    finally:
        producer.close()


@dataclasses.dataclass
class SseWatcher:
    """One project watcher over SSE: how it reads, and everything it received."""

    name: str
    min_interval: str | None = None  # the minInterval query; None = server default
    drop_after: tuple[int, int] | None = None  # drop the connection after so many events
    max_drops: int = 8  # then follow to the end
    by_query: bool = False  # resume with ?lastEventId= instead of the header
    start_after: float = 0.0
    segments: list[list[Received]] = dataclasses.field(default_factory=list)
    resumed_from: list[str] = dataclasses.field(default_factory=list)
    error: BaseException | None = None

    @property
    def received(self) -> list[Received]:
        return [r for segment in self.segments for r in segment]


def follow(watcher: SseWatcher, base: str, project: str, ids: set[str], deadline: float) -> None:
    """Watches the project until it holds every operation's end, dropping and
    resuming the connection as configured."""
    rng = random.Random(watcher.name)
    last_id = ""
    ended: set[str] = set()
    try:
        time.sleep(watcher.start_after)
        with httpx.Client(base_url=base, timeout=READ_TIMEOUT) as client:
            while ended < ids:
                assert time.monotonic() < deadline, f"{watcher.name}: not every end in time"
                params = {"project": project}
                if watcher.min_interval is not None:
                    params["minInterval"] = watcher.min_interval
                header = last_id
                if watcher.by_query and last_id:
                    params["lastEventId"], header = last_id, ""
                drops = len(watcher.segments)
                budget = -1
                if watcher.drop_after and drops < watcher.max_drops:
                    budget = rng.randint(*watcher.drop_after)
                segment: list[Received] = []
                watcher.segments.append(segment)
                watcher.resumed_from.append(last_id)
                with sse(client, "/v1/operations:watch", params=params, last_event_id=header) as s:
                    for received in s:
                        segment.append(received)
                        last_id = received.id
                        if received.state in TERMINAL_NAMES:
                            ended.add(received.operation_id)
                        if ended >= ids:
                            break
                        budget -= 1
                        if budget == 0:
                            break  # drop it mid-stream; resume from last_id
                    else:
                        raise AssertionError(f"{watcher.name}: the stream ended by itself")
    except BaseException as exc:  # reported by the test
        watcher.error = exc


def check_recording(watcher: SseWatcher, want: dict[str, str], stored_ops: dict[str, Any]) -> None:
    """What a watcher received, over all its connections, against the guarantees."""
    context = f"{watcher.name} (resumed from {watcher.resumed_from[1:]})"
    received = watcher.received
    assert received, context
    events = [r.event for r in received]
    # One epoch throughout: no RESET, every id in the server's epoch.
    epochs = {r.epoch for r in received}
    assert len(epochs) == 1, f"{context}: ids from several epochs {epochs}"
    assert all(r.name != "reset" for r in received), f"{context}: {describe(received)}"
    # Revisions ordered; across resumes nothing twice and nothing before the resume point.
    wc.check_revisions(events)
    pairs = [(r.operation_id, r.revision) for r in received if r.event.HasField("operation")]
    twice = {pair for pair, n in collections.Counter(pairs).items() if n > 1}
    assert not twice, f"{context}: delivered twice across resumes: {sorted(twice)}"
    first = watcher.segments[0]
    if any(r.name == "synced" for r in first):
        wc.split_initial_sync([r.event for r in first])  # snapshot, then SYNCED
    for resumed_at, segment in zip(watcher.resumed_from[1:], watcher.segments[1:], strict=True):
        # A resume is the changes since, never a snapshot again.
        assert all(r.name != "snapshot" for r in segment), f"{context}: {describe(segment)}"
        after = int(resumed_at.rpartition(".")[2])
        changes = [r for r in segment if r.event.HasField("operation")]
        assert all(r.revision > after for r in changes), f"{context}: {describe(segment)}"
    # Every end delivered; the last state held is what GET answers.
    delivered = wc.delivered_states(events)
    latest = wc.latest_states(events)
    for operation_id, state in want.items():
        ends = delivered.get(operation_id, set())
        assert pb.Operation.State.Value(state) in ends, (
            f"{context}: never saw {operation_id} {state} (saw states {sorted(ends)})"
        )
        last = latest.get(operation_id)
        assert last is not None, f"{context}: {operation_id} missing or deleted"
        wc.assert_same_operation(last, stored_ops[operation_id], f"{context}: {operation_id}")
    assert set(latest) == set(want), f"{context}: operations of another project"


@pytest.mark.timeout(60)
def test_many_producers_and_sse_watchers_that_drop_and_resume(
    served: ServerThread, http: httpx.Client
) -> None:
    base = http_base(served)
    project = wc.unique("sse")
    jobs: list[dict[str, str]] = [
        {
            f"{project}-p{p}-{j}": ENDINGS[(p * OPERATIONS_EACH + j) % len(ENDINGS)]
            for j in range(OPERATIONS_EACH)
        }
        for p in range(PRODUCERS)
    ]
    want = {op: WANT_STATE[ending] for mine in jobs for op, ending in mine.items()}
    # Noise in another project, busy meanwhile: no watcher of this one may see it.
    other = http.post("/v1/operations", json={"kind": "noise", "project": wc.unique("other")})
    assert other.status_code == 200, other.text
    noise = other.json()["id"]

    watchers = [
        SseWatcher("steady"),
        SseWatcher("every-state", min_interval="0"),
        SseWatcher("late", start_after=0.3),
        SseWatcher("resume-header", min_interval="0", drop_after=(3, 12)),
        SseWatcher("resume-query", min_interval="0.05", drop_after=(2, 6), by_query=True),
        SseWatcher("resume-paced", drop_after=(1, 4), start_after=0.1),
    ]
    began = time.monotonic()
    deadline = began + TIME_LIMIT
    threads = [
        threading.Thread(target=follow, args=(w, base, project, set(want), deadline))
        for w in watchers
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.1)

    errors: list[BaseException] = []

    def produce(index: int) -> None:
        producer: HttpProducer | GrpcProducer
        # Half over HTTP, half over gRPC: the same store, the same streams.
        producer = HttpProducer(base) if index % 2 == 0 else GrpcProducer(served.address)
        try:
            drive(producer, project, index, jobs[index])
        except BaseException as exc:  # reported below
            errors.append(exc)

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(PRODUCERS)]
    for thread in producers:
        thread.start()
    for step in range(1, 21):
        update(http, noise, step)
        time.sleep(0.01)
    for thread in producers:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in producers), "the producers did not finish in time"
    assert not errors, errors
    stored_ops = {operation_id: stored(http, operation_id) for operation_id in want}
    for operation_id, state in want.items():
        assert pb.Operation.State.Name(stored_ops[operation_id].state) == state, operation_id

    for thread in threads:
        thread.join(max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "the watchers did not finish in time"
    for watcher in watchers:
        assert watcher.error is None, f"{watcher.name}: {watcher.error!r}"
        check_recording(watcher, want, stored_ops)
    for watcher in watchers:
        if watcher.drop_after:
            assert len(watcher.segments) >= 3, f"{watcher.name} resumed fewer than twice"
    assert time.monotonic() - began < TIME_LIMIT


# --- one operation -----------------------------------------------------------------------


def update(client: httpx.Client, operation_id: str, completed: int) -> None:
    reply = client.post(
        f"/v1/operations/{operation_id}:update",
        json={"completed": str(completed), "sequence": str(completed)},
    )
    assert reply.status_code == 200, reply.text


def test_watching_one_operation_resumes_with_last_event_id(http: httpx.Client) -> None:
    op = http.post("/v1/operations", json={"kind": "k", "project": wc.unique("one")}).json()
    path = f"/v1/operations/{op['id']}:watch"
    params = {"minInterval": "0"}
    recorded: list[Received] = []
    with sse(http, path, params=params) as events:
        snapshot = next(events)
        assert snapshot.name == "snapshot" and snapshot.operation_id == op["id"]
        assert snapshot.event.epoch == snapshot.epoch  # the first event names the epoch
        update(http, op["id"], 1)
        update(http, op["id"], 2)
        seen = read_until(events, lambda r: r.event.operation.completed == 2)
        recorded += [snapshot, *seen]
    resume_at = recorded[-1].id
    # Away: three reports. A resume gets the latest state once, nothing older.
    for completed in (3, 4, 5):
        update(http, op["id"], completed)
    with sse(http, path, params=params, last_event_id=resume_at) as events:
        caught_up = next(events)
        assert caught_up.name == "changed", describe([caught_up])
        assert caught_up.event.operation.completed == 5
        assert caught_up.revision > int(resume_at.rpartition(".")[2])
        update(http, op["id"], 6)
        live = next(events)
        assert (live.name, live.event.operation.completed) == ("changed", 6)
        recorded += [caught_up, live]
    # Nothing new since: a BOOKMARK at the very position (here by ?lastEventId=).
    with sse(http, path, params={**params, "lastEventId": live.id}) as events:
        bookmark = next(events)
        assert (bookmark.name, bookmark.id) == ("bookmark", live.id)
        http.post(f"/v1/operations/{op['id']}:complete", json={})
        end = next(events)
        assert (end.name, end.state) == ("changed", "SUCCEEDED")
        # After the terminal state the stream ends (WatchOperation ends OK).
        assert list(events) == []
        recorded += [bookmark, end]
    wc.check_revisions([r.event for r in recorded])  # ordered, nothing twice
    wc.assert_same_operation(end.event.operation, stored(http, op["id"]), "last state")


def test_a_last_event_id_from_another_epoch_starts_over(http: httpx.Client) -> None:
    project = wc.unique("epoch")
    op = http.post("/v1/operations", json={"kind": "k", "project": project}).json()
    foreign = "0123456789abcdef.1"  # the server's epoch is random: never this one
    with sse(http, "/v1/operations:watch", params={"project": project}, last_event_id=foreign) as s:
        got = read_until(s, named("synced"))
    assert [r.name for r in got] == ["reset", "snapshot", "synced"], describe(got)
    assert got[1].operation_id == op["id"] and got[0].epoch != "0123456789abcdef"
    with sse(http, f"/v1/operations/{op['id']}:watch", last_event_id=foreign) as s:
        got = [next(s), next(s)]
    assert [r.name for r in got] == ["reset", "snapshot"], describe(got)


BOGUS_IDS = [
    pytest.param("garbage", id="no-revision"),
    pytest.param("abc.", id="empty-revision"),
    pytest.param("abc.-3", id="negative"),
    pytest.param("abc.1e3", id="not-an-integer"),
    pytest.param("abc.\u00b2", id="superscript-digit"),
    pytest.param("e" * 65 + ".1", id="epoch-over-64-characters"),
]


@pytest.mark.parametrize("last_event_id", BOGUS_IDS)
def test_a_bogus_last_event_id_is_a_400_before_any_stream(
    http: httpx.Client, last_event_id: str
) -> None:
    op = http.post("/v1/operations", json={"kind": "k", "project": wc.unique("bogus")}).json()
    for path in ("/v1/operations:watch", f"/v1/operations/{op['id']}:watch"):
        # As a header (Latin-1 on the wire), and as ?lastEventId=.
        header = {"headers": {"Last-Event-ID": last_event_id.encode("latin-1")}}
        query = {"params": {"lastEventId": last_event_id}}
        for how, kwargs in (("header", header), ("query", query)):
            answer = get_refused(http, path, **kwargs)
            assert answer == (400, "INVALID_ARGUMENT"), f"{path} by {how}: {answer}"


def test_grpc_refuses_the_epoch_of_over_64_characters_too(served: ServerThread) -> None:
    """Why the over-long epoch above is bogus: gRPC refuses it (guarantee 4)."""
    request = pb.WatchOperationsRequest(from_revision=1, from_epoch="e" * 65)
    assert grpc_watch_status(served.address, "", request) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("value", ["soon", "-1", "61", "nan", "inf"])
def test_a_bad_min_interval_is_a_400(http: httpx.Client, value: str) -> None:
    op = http.post("/v1/operations", json={"kind": "k", "project": wc.unique("pace")}).json()
    for path in ("/v1/operations:watch", f"/v1/operations/{op['id']}:watch"):
        refused = get_refused(http, path, params={"minInterval": value})
        assert refused == (400, "INVALID_ARGUMENT"), path


def test_an_unknown_or_deleted_operation_is_a_404_before_the_stream(http: httpx.Client) -> None:
    assert get_refused(http, "/v1/operations/op-nobody:watch") == (404, "NOT_FOUND")
    assert get_refused(http, "/v1/operations/bad%20id:watch") == (400, "INVALID_ARGUMENT")
    op = http.post("/v1/operations", json={"kind": "k", "project": wc.unique("gone")}).json()
    assert http.delete(f"/v1/operations/{op['id']}").status_code == 200
    assert get_refused(http, f"/v1/operations/{op['id']}:watch") == (404, "NOT_FOUND")
    # An unknown state in the filter of a project watch, likewise.
    refused = get_refused(http, "/v1/operations:watch", params={"states": "DONE"})
    assert refused == (400, "INVALID_ARGUMENT")


# --- authentication ----------------------------------------------------------------------


@pytest.fixture
def secured(tmp_path: Path, server_factory: Any) -> tuple[ServerThread, dict[str, str]]:
    path = tmp_path / "tokens.toml"
    tokens = {name: auth.new_token() for name in ("acme", "beta", "writer")}
    path.write_text(
        auth.token_block("acme", tokens["acme"], ["acme"], ["report", "read"])
        + auth.token_block("beta", tokens["beta"], ["beta"], ["report", "read"])
        + auth.token_block("writer", tokens["writer"], ["*"], ["report"])
    )
    server: ServerThread = server_factory(
        http_listen="127.0.0.1:0", auth_tokens=str(path), max_watch_streams_per_principal=1
    )
    return server, tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def grpc_watch_status(address: str, token: str, request: Any) -> grpc.StatusCode:
    """What gRPC answers a watch that the same token (if any) makes."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ProgressTrackerStub(channel)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        call: Any
        if isinstance(request, pb.WatchOperationRequest):
            call = stub.WatchOperation(request, metadata=metadata, timeout=5)
        else:
            call = stub.WatchOperations(request, metadata=metadata, timeout=5)
        try:
            next(iter(call))
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            call.cancel()
    return grpc.StatusCode.OK


def as_http(code: grpc.StatusCode) -> tuple[int, str]:
    return gateway.HTTP_STATUS[code], code.name


def test_sse_needs_a_token_and_sees_only_the_tokens_projects(
    secured: tuple[ServerThread, dict[str, str]],
) -> None:
    server, tokens = secured
    acme, beta = bearer(tokens["acme"]), bearer(tokens["beta"])
    with httpx.Client(base_url=http_base(server), timeout=READ_TIMEOUT) as http:
        theirs = http.post("/v1/operations", json={"kind": "k", "project": "beta"}, headers=beta)
        mine = http.post("/v1/operations", json={"kind": "k", "project": "acme"}, headers=acme)
        assert theirs.status_code == mine.status_code == 200, (theirs.text, mine.text)
        theirs_id, mine_id = theirs.json()["id"], mine.json()["id"]
        # No token, an unknown one: 401, on both routes.
        for headers in ({}, bearer("hw_not-a-token-anyone-was-given")):
            for path in ("/v1/operations:watch", f"/v1/operations/{mine_id}:watch"):
                answer = get_refused(http, path, headers=headers)
                assert answer == (401, "UNAUTHENTICATED"), (path, headers)
        # A token without the read role: refused as gRPC refuses it.
        writer = bearer(tokens["writer"])
        expected = grpc_watch_status(server.address, tokens["writer"], pb.WatchOperationsRequest())
        assert expected == grpc.StatusCode.PERMISSION_DENIED
        assert get_refused(http, "/v1/operations:watch", headers=writer) == as_http(expected)
        # Naming a foreign project: refused exactly as gRPC refuses it.
        foreign_filter = pb.WatchOperationsRequest(filter=pb.OperationFilter(project="beta"))
        expected = grpc_watch_status(server.address, tokens["acme"], foreign_filter)
        assert expected == grpc.StatusCode.PERMISSION_DENIED
        answer = get_refused(http, "/v1/operations:watch", params={"project": "beta"}, headers=acme)
        assert answer == as_http(expected)
        # A foreign operation is not found, exactly like one that does not exist.
        expected = grpc_watch_status(
            server.address, tokens["acme"], pb.WatchOperationRequest(operation_id=theirs_id)
        )
        assert expected == grpc.StatusCode.NOT_FOUND
        foreign = http.get(f"/v1/operations/{theirs_id}:watch", headers=acme)
        missing = http.get("/v1/operations/op-nobody:watch", headers=acme)
        assert refusal(foreign) == refusal(missing) == as_http(expected)
        said = [r.json()["error"]["message"] for r in (foreign, missing)]
        assert said[0].replace(theirs_id, "ID") == said[1].replace("op-nobody", "ID"), said

        # Without a project filter, acme's token sees acme's operations only,
        # while beta's is busy.
        with sse(http, "/v1/operations:watch", params={"minInterval": "0"}, headers=acme) as s:
            initial = read_until(s, named("synced"))
            for step in range(1, 11):
                update_as(http, theirs_id, step, beta)
            late = http.post("/v1/operations", json={"kind": "k", "project": "acme"}, headers=acme)
            http.post(f"/v1/operations/{theirs_id}:complete", json={}, headers=beta)
            update_as(http, mine_id, 1, acme)
            http.post(f"/v1/operations/{mine_id}:complete", json={}, headers=acme)
            rest = read_until(s, lambda r: r.operation_id == mine_id and r.state == "SUCCEEDED")
        assert [r.operation_id for r in initial if r.name == "snapshot"] == [mine_id]
        seen = {r.operation_id for r in initial + rest if r.event.HasField("operation")}
        assert seen == {mine_id, late.json()["id"]}, describe(initial + rest)
        assert {r.event.operation.project for r in initial + rest if r.operation_id} == {"acme"}


def update_as(client: httpx.Client, operation_id: str, step: int, headers: dict[str, str]) -> None:
    reply = client.post(
        f"/v1/operations/{operation_id}:update",
        json={"completed": str(step), "sequence": str(step)},
        headers=headers,
    )
    assert reply.status_code == 200, reply.text


def test_a_dropped_sse_stream_gives_its_slot_back(
    secured: tuple[ServerThread, dict[str, str]],
) -> None:
    """With --max-watch-streams-per-principal 1, a watcher that drops its stream
    and resumes, again and again, is admitted every time; a second stream held
    beside a live one is refused as gRPC refuses it."""
    server, tokens = secured
    acme = bearer(tokens["acme"])
    with httpx.Client(base_url=http_base(server), timeout=READ_TIMEOUT) as http:
        op = http.post("/v1/operations", json={"kind": "k", "project": "acme"}, headers=acme)
        op_id = op.json()["id"]
        last_id = ""
        for i in range(5):
            path = "/v1/operations:watch" if i % 2 else f"/v1/operations/{op_id}:watch"
            with admitted(http, path, acme, last_id) as s:
                last_id = next(s).id if i % 2 == 0 else read_until(s, named("synced"))[-1].id
            update_as(http, op_id, i + 1, acme)
        with admitted(http, "/v1/operations:watch", acme, "") as s:
            next(s)
            expected = grpc_watch_status(
                server.address, tokens["acme"], pb.WatchOperationsRequest()
            )
            assert expected == grpc.StatusCode.RESOURCE_EXHAUSTED
            for path in ("/v1/operations:watch", f"/v1/operations/{op_id}:watch"):
                assert get_refused(http, path, headers=acme) == as_http(expected), path
        with admitted(http, f"/v1/operations/{op_id}:watch", acme, "") as s:
            assert next(s).name == "snapshot"


@contextlib.contextmanager
def admitted(
    client: httpx.Client, path: str, headers: dict[str, str], last_event_id: str
) -> Iterator[Iterator[Received]]:
    """A stream opened as soon as the server admits it: the slot of a stream
    just dropped is freed once the server notices the disconnect (well within
    a second on loopback); a slot never freed fails here."""
    deadline = time.monotonic() + 3.0
    while True:
        sent = dict(headers)
        if last_event_id:
            sent["Last-Event-ID"] = last_event_id
        with connect_sse(client, "GET", path, headers=sent) as source:
            response = source.response
            if response.status_code == 200:
                yield (r for s in source.iter_sse() if (r := parse(s)) is not None)
                return
            response.read()
            assert refusal(response)[1] == "RESOURCE_EXHAUSTED", response.text
        assert time.monotonic() < deadline, f"{path}: the slot of a dropped stream stayed taken"
        time.sleep(0.05)


# --- pacing --------------------------------------------------------------------------------

BURST = 40
BURST_SECONDS = 1.0


@pytest.mark.parametrize("route", ["project", "operation"])
def test_min_interval_paces_the_same_burst_into_fewer_messages(
    served: ServerThread, http: httpx.Client, route: str
) -> None:
    project = wc.unique("burst")
    op = http.post(
        "/v1/operations", json={"kind": "k", "project": project, "total": str(BURST)}
    ).json()
    path = "/v1/operations:watch" if route == "project" else f"/v1/operations/{op['id']}:watch"
    base = http_base(served)
    recorded: dict[str, list[Received]] = {"0": [], "0.2": []}
    ready = threading.Barrier(3, timeout=10)
    errors: list[BaseException] = []

    def watch(interval: str) -> None:
        try:
            with httpx.Client(base_url=base, timeout=READ_TIMEOUT) as client:
                params = {"project": project, "minInterval": interval}
                with sse(client, path, params=params) as events:
                    if route == "project":
                        recorded[interval] += read_until(events, named("synced"))
                    else:
                        recorded[interval].append(next(events))
                    ready.wait()
                    recorded[interval] += read_until(events, lambda r: r.state == "SUCCEEDED")
        except BaseException as exc:  # reported below
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=watch, args=(i,)) for i in recorded]
    for thread in threads:
        thread.start()
    try:
        ready.wait()  # both past their first events
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(10)
        raise AssertionError(f"a watcher failed before the burst: {errors!r}") from None
    began = time.monotonic()
    with wc.open_stub(served.address) as stub:
        for step in range(1, BURST + 1):
            stub.UpdateOperation(
                pb.UpdateOperationRequest(operation_id=op["id"], completed=step, sequence=step),
                timeout=5,
            )
            time.sleep(max(0.0, began + step * BURST_SECONDS / BURST - time.monotonic()))
        stub.CompleteOperation(pb.CompleteOperationRequest(operation_id=op["id"]), timeout=5)
    burst = time.monotonic() - began
    for thread in threads:
        thread.join(10)
    assert not errors, errors
    final = stored(http, op["id"])
    changes: dict[str, list[Received]] = {}
    for interval, received in recorded.items():
        wc.check_revisions([r.event for r in received])
        changes[interval] = [r for r in received if r.name == "changed"]
        wc.assert_same_operation(changes[interval][-1].event.operation, final, interval)
    unpaced, paced = len(changes["0"]), len(changes["0.2"])
    # At most one message per 0.2 s (and one at once after the quiet start).
    assert paced <= burst / 0.2 + 2, f"{paced} paced messages in {burst:.2f}s"
    assert unpaced > 2 * paced, f"minInterval=0: {unpaced}, minInterval=0.2: {paced}"
    gaps = [b.at - a.at for a, b in zip(changes["0.2"], changes["0.2"][1:], strict=False)]
    assert statistics.median(gaps) >= 0.15, f"paced messages {gaps} apart"


# --- keep-alive ----------------------------------------------------------------------------


def raw_lines(response: httpx.Response) -> Iterator[tuple[float, str]]:
    for line in response.iter_lines():
        yield time.monotonic(), line


@pytest.mark.parametrize("route", ["project", "operation"])
def test_a_quiet_stream_gets_bookmarks_that_keep_it_open(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """Every KEEPALIVE a quiet SSE stream gets a bookmark event: traffic that
    keeps proxies from closing it, and an id: that moves the resume position."""
    monkeypatch.setattr(gateway, "KEEPALIVE", 0.3)
    # The server's own bookmarks are a minute apart: these are the stream's.
    server: ServerThread = server_factory(http_listen="127.0.0.1:0", bookmark_interval=60.0)
    with httpx.Client(base_url=http_base(server), timeout=READ_TIMEOUT) as http:
        project = wc.unique("quiet")
        op = http.post("/v1/operations", json={"kind": "k", "project": project}).json()
        path = "/v1/operations:watch" if route == "project" else f"/v1/operations/{op['id']}:watch"
        last = "event: synced" if route == "project" else "event: snapshot"
        with http.stream("GET", path, params={"project": project}) as response:
            assert response.status_code == 200
            lines = raw_lines(response)
            caught_up = next(at for at, line in lines if line == last)
            position = next(line for _, line in lines if line.startswith("id: "))
            quiet = []
            for at, line in lines:
                if line.startswith("event: "):
                    quiet.append((at, line))
                elif line.startswith("id: "):
                    assert line == position, "a bookmark of a quiet stream stays where it was"
                if len(quiet) == 2:
                    break
            assert [line for _, line in quiet] == ["event: bookmark"] * 2, quiet
            assert quiet[0][0] - caught_up >= 0.2, "a bookmark on a stream not yet quiet"
            assert quiet[1][0] - quiet[0][0] >= 0.2
            # The stream is still live after them.
            update(http, op["id"], 1)
            assert next(line for _, line in lines if line.startswith("event:")) == "event: changed"
