"""Shared fixtures: the real grpc.aio Headway server on a real socket, for pytest-grpc.

pytest-grpc's own `grpc_server` builds a sync server around a servicer; we
override it (and `grpc_addr`, whose socket it never closes) so that every test
talks through generated stubs to the server that `headway serve` runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from headway.v1 import progress_pb2 as pb
from headway.v1 import progress_pb2_grpc as pb_grpc
from headway_server.config import ServerConfig
from headway_server.server import HeadwayServer, create_server
from headway_server.store import OperationStore

# Short enough that tests of bookmarks, stalls and retention end quickly.
TEST_CONFIG = ServerConfig(
    listen="127.0.0.1:0",
    bookmark_interval=0.5,
    sweep_interval=0.05,
    shutdown_grace=1.0,
    log_level="WARNING",
)


# HEADWAY_TEST_STORE=redis runs the servers of these tests on the Redis store
# (each in a namespace of its own on one private redis-server) instead of memory.
TEST_STORE = os.environ.get("HEADWAY_TEST_STORE", "memory")


def with_test_store(config: ServerConfig) -> ServerConfig:
    if config.store != "memory" or TEST_STORE == "memory":
        return config
    if TEST_STORE != "redis":
        raise ValueError(f"HEADWAY_TEST_STORE must be memory or redis (got {TEST_STORE!r})")
    if TYPE_CHECKING:
        from tests.redis_support import session_redis
    else:
        from redis_support import session_redis
    namespace = f"test-{secrets.token_hex(6)}"
    return dataclasses.replace(config, store=f"{session_redis().url}?namespace={namespace}")


class ServerThread:
    """Runs a HeadwayServer on its own event loop in a background thread."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
    ) -> None:
        self.config = with_test_store(config)
        self.interceptors = interceptors
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: HeadwayServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()

        self.port = self.run(self._serve(self.config, None))
        return self

    async def _serve(self, config: ServerConfig, store: OperationStore | None) -> int:
        server, port = create_server(config, store, interceptors=self.interceptors)
        await server.start()
        self.server = server
        return port

    def restart(self, store: OperationStore | None = None) -> None:
        """Shuts down gracefully and serves again on the same port with the same
        store, as a server backed by a persistent store would come back; or with
        `store`, as a memory server's process would come back (a new epoch)."""
        assert self.server is not None
        if store is None and self.config.store == "memory":
            store = self.server.service.store
        # (A shared store is opened again from the config, as a new process would.)
        self.shutdown()
        config = dataclasses.replace(self.config, listen=self.address)
        self.run(self._serve(config, store))

    def shutdown(self, grace: float | None = None) -> None:
        """Graceful shutdown, as on SIGTERM; blocks until the server stopped."""
        if self.server is not None:
            server, self.server = self.server, None
            try:
                self.run(server.shutdown(grace), timeout=30.0)
            except TimeoutError:
                # Say what the server's loop was still waiting on.
                for task in asyncio.all_tasks(self.loop):
                    frames = [
                        f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
                        for f in task.get_stack(limit=8)
                    ]
                    print(f"server task still running: {task!r}", *frames, sep="\n  ")
                raise

    def close(self) -> None:
        self.shutdown(0.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def headway_config() -> ServerConfig:
    """Override in a test module to run its server with other settings."""
    return TEST_CONFIG


@pytest.fixture(scope="module")
def grpc_server(headway_config: ServerConfig) -> Iterator[ServerThread]:
    thread = ServerThread(headway_config).start()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def grpc_addr(grpc_server: ServerThread) -> str:
    return grpc_server.address


@pytest.fixture(scope="module")
def grpc_stub_cls() -> type[pb_grpc.ProgressTrackerStub]:
    return pb_grpc.ProgressTrackerStub


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerThread]]:
    """Starts extra servers (own config, fixed port for restarts); all closed at teardown."""
    started: list[ServerThread] = []

    def factory(
        *, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (), **overrides: Any
    ) -> ServerThread:
        config = dataclasses.replace(TEST_CONFIG, **overrides)
        thread = ServerThread(config, interceptors=interceptors).start()
        started.append(thread)
        return thread

    yield factory
    for thread in started:
        thread.close()


class StreamRecorder:
    """Reads a server stream in a thread so each read can be bounded by a timeout."""

    _END = object()

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for item in self.call:
                self.items.put(item)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.items.put(self._END)

    def next(self, timeout: float = 5.0) -> Any:
        """The next message; raises EOFError at the end of the stream."""
        item = self.items.get(timeout=timeout)
        if item is self._END:
            self.items.put(self._END)
            raise EOFError("stream ended")
        return item

    def wait_end(self, timeout: float = 5.0) -> grpc.RpcError | None:
        """Drains until the stream ends; returns the error it ended with, if any."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not end in time"
        return self.error

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(5)


def events_of(message: Any) -> list[pb.OperationEvent]:
    """The events of a WatchOperations response or a single WatchOperation event."""
    if isinstance(message, pb.WatchOperationsResponse):
        return list(message.events)
    return [message]


@pytest.fixture
def record() -> Iterator[Callable[[Any], StreamRecorder]]:
    """Wraps stream calls in StreamRecorders and cancels them at teardown."""
    recorders: list[StreamRecorder] = []

    def wrap(call: Any) -> StreamRecorder:
        recorder = StreamRecorder(call)
        recorders.append(recorder)
        return recorder

    yield wrap
    for recorder in recorders:
        recorder.cancel()
