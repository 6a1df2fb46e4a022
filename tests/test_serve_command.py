"""`headway serve` as a user runs it: flags, environment, logs, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from headway_server.config import ServerConfig, from_arguments, parse, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0), ("1.5", 1.5)],
)
def test_durations_take_units(text, seconds):
    assert parse_duration(text) == seconds


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("HEADWAY_RETENTION", "2m")
    monkeypatch.setenv("HEADWAY_MAX_OPERATIONS", "7")
    config = parse(["--max-operations", "9"])
    assert config.retention == 120.0
    assert config.max_operations == 9
    assert config.bookmark_interval == ServerConfig().bookmark_interval


def test_bad_values_name_their_source():
    import argparse

    with pytest.raises(ValueError, match="HEADWAY_RETENTION"):
        from_arguments(argparse.Namespace(), {"HEADWAY_RETENTION": "soon"})
    with pytest.raises(ValueError, match="max_operations"):
        ServerConfig(max_operations=0)


def _serve(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HEADWAY_LOG_LEVEL": "INFO"}
    return subprocess.Popen(
        [sys.executable, "-m", "headway_server", "serve", "--listen", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _log_lines(
    process: subprocess.Popen[str], until: str, timeout: float = 10.0
) -> list[dict[str, Any]]:
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        entry = json.loads(line)  # every log line is one JSON object
        lines.append(entry)
        if entry["event"] == until:
            return lines
    raise AssertionError(f"no {until!r} log line; got {lines}")


def test_serve_logs_json_serves_health_and_stops_cleanly_on_sigterm():
    process = _serve("--shutdown-grace", "1s")
    try:
        serving = _log_lines(process, "serving")[-1]
        port = serving["port"]
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        events = [e["event"] for e in _log_lines(process, "stopped")]
        assert events.index("shutting down") < events.index("stopped")
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_serve_rejects_a_bad_flag_with_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--retention", "forever"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--retention" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_taken_port_says_so_without_a_traceback(grpc_server):
    result = subprocess.run(
        [sys.executable, "-m", "headway_server", "serve", "--listen", grpc_server.address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot listen on {grpc_server.address}" in result.stderr
    assert "Traceback" not in result.stderr
