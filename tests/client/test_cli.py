"""The `headway` command run as a user runs it: a subprocess against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from headway.v1 import progress_pb2 as pb
from headway_client import HeadwayClient


def headway(
    target: str, *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEADWAY_TARGET": target}
    return subprocess.run(
        [sys.executable, "-m", "headway_client.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture
def target(grpc_server: Any) -> str:
    return str(grpc_server.address)


def test_start_update_complete_and_get_json(target):
    started = headway(target, "start", "--kind", "cli", "--project", "cli-p", "--total", "4")
    assert started.returncode == 0, started.stderr
    op_id = started.stdout.strip()
    updated = headway(
        target,
        "update",
        op_id,
        "--sequence",
        "1",
        "--completed",
        "3",
        "--counter",
        "files=3",
        "--message",
        "going",
    )
    assert json.loads(updated.stdout)["percent"] == 75.0
    assert headway(target, "complete", op_id).returncode == 0
    got = json.loads(headway(target, "get", op_id, "--json").stdout)
    assert got["id"] == op_id
    assert got["state"] == "SUCCEEDED"
    assert got["counters"] == {"files": "3"}  # int64 is a string in proto JSON
    assert got["message"] == "going"


def test_list_json_filters_by_project_and_activity(target):
    with HeadwayClient(target) as client:
        done = client.start_operation(kind="cli", project="cli-list")
        client.complete(done.id)
        active = client.start_operation(kind="cli", project="cli-list")
    listed = json.loads(headway(target, "list", "--project", "cli-list", "--json").stdout)
    assert {op["id"] for op in listed} == {done.id, active.id}
    only_active = json.loads(
        headway(target, "list", "--project", "cli-list", "--active", "--json").stdout
    )
    assert [op["id"] for op in only_active] == [active.id]
    table = headway(target, "list", "--project", "cli-list")
    assert active.id in table.stdout and "QUEUED" in table.stdout


@pytest.mark.parametrize(("ending", "status"), [("complete", 0), ("fail", 1), ("cancel", 2)])
def test_watch_exits_when_the_operation_ends_with_its_outcome(target, ending, status):
    with HeadwayClient(target) as client:
        op = client.start_operation(kind="cli", project="cli-watch", total=10, unit="files")
        watcher = subprocess.Popen(
            [sys.executable, "-m", "headway_client.cli", "watch", op.id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HEADWAY_TARGET": target},
        )
        try:
            # Produce only once the watch shows the snapshot (the command's
            # start-up time varies), so it follows the rest live.
            first = first_line(watcher, timeout=30)
            client.report(pb.UpdateOperationRequest(operation_id=op.id, sequence=1, completed=5))
            if ending == "complete":
                client.complete(op.id)
            elif ending == "fail":
                client.fail(op.id, "disk full")
            else:
                client.cancel(op.id, "stop")
                client.fail(op.id, pb.OperationError(code="CANCELLED"))
            rest, stderr = watcher.communicate(timeout=30)
        finally:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == status, stderr
    lines = [first, *rest.strip().splitlines()]
    assert lines[0].startswith(f"{op.id} QUEUED")
    assert any("5/10 files" in line for line in lines)
    assert pb.Operation.State.Name(client_state(target, op.id)) in lines[-1]


def first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The process's first stdout line, read in a thread so the wait is bounded."""
    lines: list[str] = []
    stdout = process.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"no output from the command within {timeout} s"
    return lines[0].rstrip("\n")


def client_state(target: str, op_id: str) -> pb.Operation.State.ValueType:
    with HeadwayClient(target) as client:
        return client.get(op_id).state


def test_watch_project_shows_one_line_per_change_and_exits_when_all_end(target):
    with HeadwayClient(target) as client:
        first = client.start_operation(kind="a", project="cli-proj")
        second = client.start_operation(kind="b", project="cli-proj")
        client.complete(first.id)
        timer = threading.Timer(0.5, lambda: client.fail(second.id, "broken"))
        timer.start()
        watched = headway(target, "watch", "--project", "cli-proj")
        timer.join()
    assert watched.returncode == 1  # one of them failed
    assert first.id in watched.stdout and second.id in watched.stdout
    assert "FAILED" in watched.stdout.splitlines()[-1]


def test_pipe_passes_lines_through_and_counts_them(target):
    text = "".join(f"line {i}\n" for i in range(250))
    piped = headway(target, "pipe", "--total", "250", "--project", "cli-pipe", stdin=text)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == text
    [op] = json.loads(headway(target, "list", "--project", "cli-pipe", "--json").stdout)
    assert op["state"] == "SUCCEEDED"
    assert (op["completed"], op["total"], op["unit"]) == ("250", "250", "lines")
    assert op["id"] in piped.stderr


def test_unreachable_server_is_one_line_without_traceback():
    result = headway("127.0.0.1:9", "list")
    assert result.returncode == 69
    assert "cannot reach a Headway server at 127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_id_and_invalid_argument_are_one_line_errors(target):
    missing = headway(target, "get", "no-such-operation")
    assert missing.returncode == 66
    assert missing.stderr.strip() == "headway: not found: operation 'no-such-operation' not found"
    invalid = headway(target, "update", "bad id!", "--completed", "1")
    assert invalid.returncode == 64
    assert "operation_id" in invalid.stderr and "Traceback" not in invalid.stderr


def test_measures_shown_by_get_and_watch_rows_and_reported_by_update(target):
    op_id = headway(target, "start", "--kind", "cli", "--project", "cli-measures").stdout.strip()
    updated = headway(
        target,
        "update",
        op_id,
        "--sequence",
        "1",
        "--measure",
        "quality=0.93",
        "--measure",
        "cost_usd=1.27",
    )
    assert updated.returncode == 0, updated.stderr
    got = headway(target, "get", op_id)
    assert "cost_usd=1.27 quality=0.93" in got.stdout
    bad = headway(target, "update", op_id, "--measure", "quality=high")
    assert bad.returncode != 0 and "--measure quality" in bad.stderr
    with HeadwayClient(target) as client:
        timer = threading.Timer(0.5, lambda: client.complete(op_id))
        timer.start()
        watched = headway(target, "watch", op_id)
        timer.join()
    assert watched.returncode == 0, watched.stderr
    assert all("cost_usd=1.27 quality=0.93" in line for line in watched.stdout.splitlines())
