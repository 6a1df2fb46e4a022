"""Headway server processes on a private Redis, for tests that kill and restart them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def health(address: str, timeout: float = 1.0) -> int:
    """The server's overall health status (UNKNOWN when it does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(reply.status)


def wait_for_health(address: str, status: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(address) == status:
            return
        time.sleep(0.05)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    raise AssertionError(f"{address} did not turn {name} within {timeout}s")


class ServerProcess:
    """`headway serve --store <url>` in its own process, on a port of its own."""

    def __init__(self, store: str, port: int, *extra: str) -> None:
        self.store = store
        self.port = port
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, wait: bool = True) -> ServerProcess:
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'server'}:{ROOT / 'client'}")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headway_server",
                "serve",
                "--listen",
                self.address,
                "--store",
                self.store,
                "--log-level",
                "WARNING",
                "--sweep-interval",
                "0.1",
                "--bookmark-interval",
                "1s",
                "--shutdown-grace",
                "0.5",
                *self.extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            # A file, not a pipe: a pipe nobody reads until the end fills up,
            # and then the server blocks in its next log line.
            stderr=self._log,
        )
        if wait:
            wait_for_health(self.address, health_pb2.HealthCheckResponse.SERVING)
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or said goodbye."""
        self.stop(sig=signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stops the process; returns what it wrote to stderr."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self._log is None:
            return ""
        self._log.seek(0)
        err = self._log.read()
        self._log.close()
        self._log = None
        return err.decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
