"""The HTTP/JSON gateway (issue 13, first part) with httpx against a real
server: the routes, the proto3 JSON mapping, the error mapping, idempotency,
and the same authentication and project scoping as gRPC."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from headway_server import auth

if TYPE_CHECKING:
    from tests.conftest import ServerThread
else:
    from conftest import ServerThread


@pytest.fixture
def http(server_factory: Any) -> Iterator[httpx.Client]:
    server: ServerThread = server_factory(http_listen="127.0.0.1:0")
    assert server.server is not None
    with httpx.Client(base_url=f"http://127.0.0.1:{server.server.http_port}", timeout=5) as client:
        yield client


def test_an_operation_from_start_to_finish_over_http(http: httpx.Client) -> None:
    started = http.post(
        "/v1/operations",
        json={"kind": "upload", "project": "web", "total": "10", "requestId": "r-1"},
    )
    assert started.status_code == 200, started.text
    op = started.json()
    assert (op["kind"], op["project"], op["state"]) == ("upload", "web", "QUEUED")
    # A retried start with the same request id is the same operation.
    again = http.post(
        "/v1/operations",
        json={"kind": "upload", "project": "web", "total": "10", "requestId": "r-1"},
    )
    assert again.json()["id"] == op["id"]
    update = http.post(
        f"/v1/operations/{op['id']}:update", json={"completed": "4", "sequence": "1"}
    )
    assert update.status_code == 200, update.text
    assert update.json()["applied"] is True
    duplicate = http.post(
        f"/v1/operations/{op['id']}:update", json={"completed": "5", "sequence": "1"}
    )
    assert duplicate.json().get("applied", False) is False
    logged = http.post(
        f"/v1/operations/{op['id']}/logs",
        json={"entries": [{"level": "ERROR", "message": "bad row", "item": "row 7"}]},
    )
    assert logged.status_code == 200, logged.text
    logs = http.get(f"/v1/operations/{op['id']}/logs").json()
    assert [e["message"] for e in logs["entries"]] == ["bad row"]
    got = http.get(f"/v1/operations/{op['id']}").json()
    assert (got["completed"], got["state"]) == ("4", "RUNNING")
    listed = http.get("/v1/operations", params={"project": "web", "states": "RUNNING"}).json()
    assert [o["id"] for o in listed["operations"]] == [op["id"]]
    done = http.post(f"/v1/operations/{op['id']}:complete", json={"message": "ok"})
    assert done.json()["state"] == "SUCCEEDED"
    timeline = http.get(f"/v1/operations/{op['id']}/timeline").json()
    assert [e["type"] for e in timeline["entries"]][-1] == "SUCCEEDED"
    stats = http.get("/v1/stats", params={"project": "web"}).json()
    assert int(stats["finished"]) == 1  # int64: a JSON string, as proto3 maps it
    assert http.delete(f"/v1/operations/{op['id']}").status_code == 200
    assert http.get(f"/v1/operations/{op['id']}").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/operations/op-missing", None, 404, "NOT_FOUND"),
        ("POST", "/v1/operations", {"kind": "x", "total": "-1"}, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/operations", "not json", 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/operations", {"noSuchField": 1}, 400, "INVALID_ARGUMENT"),
        ("GET", "/v1/operations?states=DONE", None, 400, "INVALID_ARGUMENT"),
        ("POST", "/v1/operations/op-x:explode", {}, 404, "NOT_FOUND"),
        ("GET", "/v1/operations/bad%20id", None, 400, "INVALID_ARGUMENT"),
    ],
)
def test_errors_map_to_http_status_and_a_json_body(
    http: httpx.Client, method: str, path: str, body: Any, status: int, code: str
) -> None:
    kwargs: dict[str, Any] = {}
    if isinstance(body, str):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    reply = http.request(method, path, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["code"], error["status"]) == (status, code)
    assert error["message"]


def test_finishing_twice_is_a_failed_precondition(http: httpx.Client) -> None:
    op = http.post("/v1/operations", json={"kind": "k"}).json()
    http.post(f"/v1/operations/{op['id']}:fail", json={"error": {"code": "E", "message": "x"}})
    again = http.post(f"/v1/operations/{op['id']}:update", json={"completed": "1"})
    assert again.status_code == 400
    assert again.json()["error"]["status"] == "FAILED_PRECONDITION"


def test_the_gateway_enforces_the_same_tokens_roles_and_projects(
    tmp_path: Path, server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="headway.auth")
    path = tmp_path / "tokens.toml"
    tokens = {n: auth.new_token() for n in ("acme", "beta")}
    path.write_text(
        auth.token_block("acme", tokens["acme"], ["acme"], ["report", "read"])
        + auth.token_block("beta", tokens["beta"], ["beta"], ["report", "read"])
    )
    server = server_factory(http_listen="127.0.0.1:0", auth_tokens=str(path))
    base = f"http://127.0.0.1:{server.server.http_port}"
    acme = {"Authorization": f"Bearer {tokens['acme']}"}
    beta = {"Authorization": f"Bearer {tokens['beta']}"}
    with httpx.Client(base_url=base, timeout=5) as http:
        anonymous = http.get("/v1/operations")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        theirs = http.post("/v1/operations", json={"kind": "k", "project": "beta"}, headers=beta)
        assert theirs.status_code == 200, theirs.text
        # Writes and denials are logged as for gRPC: by principal, never the token.
        logged = [(r.getMessage(), getattr(r, "principal", "")) for r in caplog.records]
        assert ("write", "beta") in logged and ("call denied", "") in logged
        assert not any(tokens["beta"] in r.getMessage() for r in caplog.records)
        foreign = http.get(f"/v1/operations/{theirs.json()['id']}", headers=acme)
        missing = http.get("/v1/operations/op-nobody", headers=acme)
        assert foreign.status_code == missing.status_code == 404
        assert (
            http.post("/v1/operations", json={"project": "beta"}, headers=acme).status_code == 403
        )
        cancel = http.post(f"/v1/operations/{theirs.json()['id']}:cancel", headers=beta)
        assert cancel.status_code == 403  # role admin required
        assert http.get("/v1/operations", headers=acme).json().get("operations", []) == []


def _events(lines: Iterator[str], until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """SSE events (type, id, data) read until one satisfies `until`."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for line in lines:
        if line.startswith((":", "retry:")):
            continue
        if not line:
            if current:
                events.append(current)
                if until(current):
                    return events
                current = {}
            continue
        field, _, value = line.partition(": ")
        current[field] = json.loads(value) if field == "data" else value
    raise AssertionError(f"stream ended: {events}")


def test_sse_watchers_get_changes_and_resume_with_last_event_id(http: httpx.Client) -> None:
    first = http.post("/v1/operations", json={"kind": "k", "project": "sse"}).json()
    params = {"project": "sse", "minInterval": "0"}
    with http.stream("GET", "/v1/operations:watch", params=params) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        initial = _events(lines, lambda e: e["event"] == "synced")
        assert [e["event"] for e in initial] == ["snapshot", "synced"]
        assert initial[0]["data"]["operation"]["id"] == first["id"]
        http.post(f"/v1/operations/{first['id']}:update", json={"completed": "3"})
        changed = _events(lines, lambda e: e["event"] == "changed")
        resume_at = changed[-1]["id"]
        assert changed[-1]["data"]["operation"]["completed"] == "3"
    # Changes while away, then a reconnect with Last-Event-ID: exactly those.
    second = http.post("/v1/operations", json={"kind": "k", "project": "sse"}).json()
    http.post(f"/v1/operations/{first['id']}:complete", json={})
    headers = {"Last-Event-ID": resume_at}
    with http.stream("GET", "/v1/operations:watch", params=params, headers=headers) as stream:
        caught_up = _events(stream.iter_lines(), lambda e: e["event"] == "synced")
    got = [(e["event"], e["data"]["operation"]["id"]) for e in caught_up if e["event"] != "synced"]
    assert got == [("changed", second["id"]), ("changed", first["id"])]
    revisions = [int(e["id"].rpartition(".")[2]) for e in caught_up]
    assert revisions == sorted(revisions) and revisions[0] > int(resume_at.rpartition(".")[2])


def test_sse_watch_of_one_operation_and_of_an_unknown_one(http: httpx.Client) -> None:
    assert http.get("/v1/operations/op-nobody:watch").status_code == 404
    op = http.post("/v1/operations", json={"kind": "k", "project": "one"}).json()
    with http.stream("GET", f"/v1/operations/{op['id']}:watch", params={"minInterval": "0"}) as s:
        lines = s.iter_lines()
        assert _events(lines, lambda e: True)[0]["event"] == "snapshot"
        http.post(f"/v1/operations/{op['id']}:complete", json={})
        ended = _events(lines, lambda e: e["data"]["operation"]["state"] == "SUCCEEDED")
        assert ended[-1]["event"] == "changed"


def test_me_says_who_the_caller_is_and_what_it_may_call(
    tmp_path: Path, server_factory: Any
) -> None:
    path = tmp_path / "tokens.toml"
    reader = auth.new_token()
    path.write_text(auth.token_block("viewer", reader, ["acme"], ["read"]))
    server = server_factory(http_listen="127.0.0.1:0", auth_tokens=str(path))
    base = f"http://127.0.0.1:{server.server.http_port}"
    with httpx.Client(base_url=base, timeout=5) as http:
        assert http.get("/v1/me").status_code == 401
        me = http.get("/v1/me", headers={"Authorization": f"Bearer {reader}"}).json()
    assert (me["name"], me["authenticated"], me["projects"]) == ("viewer", True, ["acme"])
    assert "WatchOperations" in me["methods"] and "CancelOperation" not in me["methods"]


def test_without_authentication_me_may_call_everything(http: httpx.Client) -> None:
    me = http.get("/v1/me").json()
    assert me["authenticated"] is False
    assert {"CancelOperation", "DeleteOperation", "StartOperation"} <= set(me["methods"])


def test_the_dashboard_is_served_at_the_root(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and "<title>Headway</title>" in page.text
    # It shows strings producers wrote: only its own scripts may run.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "script-src" not in page.headers["content-security-policy"]  # no inline scripts
    script = http.get("/app.js")
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    # Unknown API paths are JSON errors, not the dashboard.
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


def test_children_and_labels_filter_listings(http: httpx.Client) -> None:
    parent = http.post("/v1/operations", json={"kind": "p", "project": "f"}).json()
    child = http.post(
        "/v1/operations",
        json={"kind": "c", "project": "f", "parentId": parent["id"], "labels": {"team": "a"}},
    ).json()
    http.post("/v1/operations", json={"kind": "c", "project": "f", "labels": {"team": "b"}})
    children = http.get("/v1/operations", params={"parentId": parent["id"]}).json()
    assert [o["id"] for o in children["operations"]] == [child["id"]]
    labelled = http.get("/v1/operations", params={"project": "f", "label": "team=a"}).json()
    assert [o["id"] for o in labelled["operations"]] == [child["id"]]
    bad = http.get("/v1/operations", params={"label": "team"})
    assert bad.status_code == 400 and "label" in bad.json()["error"]["message"]


def test_cors_is_off_unless_origins_are_given(server_factory: Any) -> None:
    preflight = {
        "Origin": "https://ops.example.com",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    plain = server_factory(http_listen="127.0.0.1:0")
    allowed = server_factory(
        http_listen="127.0.0.1:0", http_cors_origins=("https://ops.example.com",)
    )
    with httpx.Client(timeout=5) as client:
        off = client.options(
            f"http://127.0.0.1:{plain.server.http_port}/v1/stats", headers=preflight
        )
        assert "access-control-allow-origin" not in off.headers
        url = f"http://127.0.0.1:{allowed.server.http_port}/v1/stats"
        on = client.options(url, headers=preflight)
        assert on.headers["access-control-allow-origin"] == "https://ops.example.com"
        assert "authorization" in on.headers["access-control-allow-headers"].lower()
        other = client.get(url, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_resuming_past_the_end_of_an_operation_is_204(http: httpx.Client) -> None:
    """204 is what stops a browser's EventSource from reconnecting for ever to
    the watch of an operation it has seen end."""
    op = http.post("/v1/operations", json={"kind": "k", "project": "end"}).json()
    with http.stream("GET", f"/v1/operations/{op['id']}:watch", params={"minInterval": "0"}) as s:
        lines = s.iter_lines()
        _events(lines, lambda e: True)
        http.post(f"/v1/operations/{op['id']}:complete", json={})
        ended = _events(lines, lambda e: e["data"]["operation"]["state"] == "SUCCEEDED")
    last = ended[-1]["id"]
    again = http.get(f"/v1/operations/{op['id']}:watch", headers={"Last-Event-ID": last})
    assert again.status_code == 204
    # From before the end, the stream still delivers the end.
    earlier = last.rpartition(".")[0] + ".1"
    with http.stream(
        "GET", f"/v1/operations/{op['id']}:watch", headers={"Last-Event-ID": earlier}
    ) as s:
        assert s.status_code == 200
        caught = _events(s.iter_lines(), lambda e: e["event"] == "changed")
        assert caught[-1]["data"]["operation"]["state"] == "SUCCEEDED"


def test_watchers_that_hang_up_at_once_give_their_stream_slot_back(
    tmp_path: Path, server_factory: Any
) -> None:
    """With one watch stream allowed per token, clients that send a watch
    request and hang up before reading anything leave no slot taken."""
    path = tmp_path / "tokens.toml"
    token = auth.new_token()
    path.write_text(auth.token_block("viewer", token, ["*"], ["read"]))
    server = server_factory(
        http_listen="127.0.0.1:0", auth_tokens=str(path), max_watch_streams_per_principal=1
    )
    port = server.server.http_port
    request = (
        f"GET /v1/operations:watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(request)
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 10
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        while True:
            with http.stream("GET", "/v1/operations:watch", headers=headers) as stream:
                if stream.status_code == 200:
                    break
                assert stream.status_code == 429
            assert time.monotonic() < deadline, "a hung-up watcher kept its stream slot"
            time.sleep(0.1)
