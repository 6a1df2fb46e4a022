"""A private redis-server for tests: on a free port in a temporary directory.

Tests never touch the machine's shared Redis: they start their
own, so they can kill it, restart it on the same port and data directory, and
flush it. Where redis-server is not installed the tests that need it are
skipped with a message saying how to get it, except under CI=true, where its
absence is a failure (the machine kind CI runs on has it).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

INSTALL_HINT = "install it with `apt-get install -y redis-server` (Debian) to run these tests"


def require_redis_server() -> str:
    """The redis-server executable, or a skip (a failure under CI=true)."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server is not on PATH; {INSTALL_HINT}")
        pytest.skip(f"redis-server is not on PATH; {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; `restart()` keeps its port and data directory."""

    def __init__(
        self, directory: Path, *, appendonly: bool = False, extra: Sequence[str] = ()
    ) -> None:
        self.executable = require_redis_server()
        self.directory = directory
        self.port = free_port()
        self.appendonly = appendonly
        # More redis-server options (a password, a TLS port...).
        self.extra = list(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0, *, first_start: bool = True) -> RedisServer:
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--protected-mode",
            "no",
            "--loglevel",
            "warning",
            *self.extra,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                if "already in use" in err and first_start:
                    # free_port() gave a port that another process took before
                    # this one bound it: take another.
                    self.port = free_port()
                    return self.start(timeout, first_start=False)
                raise RuntimeError(f"redis-server exited at start: {err}")
            if self._answers_as(self.process.pid):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def _answers_as(self, pid: int) -> bool:
        """Whether this server's port answers, and from this process: with
        tests running side by side, a port can be another test's server."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                conn.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
                    if reply.startswith(b"-NOAUTH"):
                        # Up and wanting a password: ours if our process is alive.
                        return True
        except OSError:
            return False
        found = re.search(rb"process_id:(\d+)", reply)
        return found is not None and int(found.group(1)) == pid

    def stop(self, *, kill: bool = False) -> None:
        """Stops it: SIGKILL (a crash) or SIGTERM (a clean shutdown)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def flush(self) -> None:
        """FLUSHALL: every key gone, as an operator's mistake would leave it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"FLUSHALL\r\n")
            assert conn.recv(16).startswith(b"+OK")

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start(first_start=False)  # the same port: clients reconnect to it


_session_server: RedisServer | None = None


def session_redis() -> RedisServer:
    """One private redis-server for the whole test session (started on first
    use, stopped at exit); tests on it use their own namespaces."""
    global _session_server
    if _session_server is None:
        directory = Path(tempfile.mkdtemp(prefix="headway-test-redis-"))
        server = RedisServer(directory).start()

        def stop() -> None:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)

        atexit.register(stop)
        _session_server = server
    return _session_server
