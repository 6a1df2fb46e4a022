"""A pipelined Redis connection for the store's hot path: one socket, many
commands in flight, replies matched to callers in order.

redis-py takes a pooled connection per command and waits for its reply before
the connection serves another: ~120 µs of Python per report on this hardware
(bench: Redis store, py-spy), about half of a report's whole cost. Here a
command is its encoded bytes written to the socket (hiredis packs them) and a
future; one reader task parses replies with hiredis and resolves the futures
in order, so concurrent reports share the socket's writes and reads.

Only what the store's scripts need: connect (TLS, AUTH, SELECT), execute,
close. A connection that fails or stops answering fails every command in
flight with ConnectionError, and the next command connects again.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

# A command in flight longer than this means Redis (or the path to it) is gone.
DEFAULT_TIMEOUT = 5.0
_READ_SIZE = 65536
# Bytes buffered for the socket before writers wait for it to drain.
_HIGH_WATER = 1 << 20


class ReplyError(Exception):
    """Redis answered a command with an error (e.g. NOSCRIPT)."""


_Pending = collections.deque[tuple["asyncio.Future[Any]", float]]


class Endpoint:
    """Where and how to connect, from a redis://, rediss:// or unix:// URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.path = unquote(parts.path) if parts.scheme == "unix" else ""
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        db = query.get("db", [""])[-1]
        if not db and parts.scheme != "unix":
            db = parts.path.lstrip("/")
        self.db = int(db or 0)
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            self.tls = ssl.create_default_context()
            if query.get("ssl_cert_reqs", [""])[-1].lower() in ("none", "optional"):
                self.tls.check_hostname = False
                self.tls.verify_mode = ssl.CERT_NONE
            ca = query.get("ssl_ca_certs", [""])[-1]
            if ca:
                self.tls.load_verify_locations(ca)


async def open_connection(
    endpoint: Endpoint, connect_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, hiredis.Reader]:
    """A connection, authenticated and on its database, with a reply parser.

    Raises:
        ConnectionError: Redis cannot be reached or refused the credentials.
    """
    try:
        if endpoint.path:
            opening = asyncio.open_unix_connection(endpoint.path)
        else:
            opening = asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=endpoint.tls, limit=_READ_SIZE
            )
        reader, writer = await asyncio.wait_for(opening, connect_timeout)
    except (OSError, TimeoutError) as exc:
        where = endpoint.path or f"{endpoint.host}:{endpoint.port}"
        raise ConnectionError(f"cannot connect to {where}: {exc}") from exc
    parser = hiredis.Reader()
    try:
        hello: list[tuple[Any, ...]] = []
        if endpoint.password is not None:
            auth = (endpoint.username, endpoint.password)
            hello.append(("AUTH", *(a for a in auth if a is not None)))
        if endpoint.db:
            hello.append(("SELECT", endpoint.db))
        for command in hello:
            writer.write(hiredis.pack_command(command))
            try:
                reply = await asyncio.wait_for(read_reply(reader, parser), connect_timeout)
            except TimeoutError as exc:
                raise ConnectionError(
                    f"{command[0]} got no answer in {connect_timeout:g}s"
                ) from exc
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"{command[0]} refused: {reply}")
    except BaseException:
        writer.close()
        raise
    return reader, writer, parser


async def read_reply(reader: asyncio.StreamReader, parser: hiredis.Reader) -> Any:
    """The next reply (or pushed message) on a connection."""
    while (reply := parser.gets()) is False:
        data = await reader.read(_READ_SIZE)
        if not data:
            raise ConnectionError("connection closed by Redis")
        parser.feed(data)
    return reply


class Subscription:
    """One channel's messages, on a connection of its own (a subscribed
    connection takes no other commands)."""

    def __init__(self, endpoint: Endpoint, channel: str, *, connect_timeout: float) -> None:
        self._endpoint = endpoint
        self._channel = channel
        self._connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser: hiredis.Reader | None = None

    async def open(self) -> None:
        """Connects and subscribes; returns once Redis confirmed it."""
        self.close()
        reader, writer, parser = await open_connection(self._endpoint, self._connect_timeout)
        self._reader, self._writer, self._parser = reader, writer, parser
        command: tuple[Any, ...] = ("SUBSCRIBE", self._channel)
        writer.write(hiredis.pack_command(command))
        await asyncio.wait_for(self.next(None), self._connect_timeout)

    async def next(self, wait: float | None) -> bytes | None:
        """The next message's data; None when `wait` seconds passed without one.

        Raises:
            ConnectionError: the connection failed (open() again).
        """
        if self._reader is None or self._parser is None:
            raise ConnectionError("not subscribed")
        reader, parser = self._reader, self._parser
        while True:
            try:
                push = await asyncio.wait_for(read_reply(reader, parser), wait)
            except TimeoutError:
                return None
            except OSError as exc:
                raise ConnectionError(f"subscription lost: {exc}") from exc
            if isinstance(push, list) and push and push[0] in (b"message", b"subscribe"):
                return push[-1] if push[0] == b"message" else b""

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = self._parser = None


class PipelinedConnection:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float = 2.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # (future, time sent) of each command in flight on the current
        # connection, oldest first; each connection has its own.
        self._pending: _Pending = collections.deque()
        self._connecting: asyncio.Lock | None = None
        # Encoded commands not yet written (see execute).
        self._outgoing: list[bytes] = []
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        """Sends one command and returns its reply.

        Raises:
            ReplyError: Redis answered with an error.
            ConnectionError: Redis could not be reached, or the connection
                failed or stalled with the command in flight (which Redis may
                or may not have run).
        """
        writer = self._writer
        if writer is None or writer.is_closing():
            writer = await self._connect()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((future, time.monotonic()))
        # Commands issued in one turn of the event loop (concurrent reports)
        # go out in one write: one system call for all of them.
        self._outgoing.append(hiredis.pack_command(args))
        if len(self._outgoing) == 1:
            loop.call_soon(self._flush, writer)
        elif writer.transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if writer is self._writer:
            writer.write(data)
        # else: the connection failed meanwhile, and its commands with it

    async def _connect(self) -> asyncio.StreamWriter:
        if self._closed:
            raise ConnectionError("connection closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            reader, writer, parser = await open_connection(self._endpoint, self._connect_timeout)
            pending: _Pending = collections.deque()
            self._writer, self._pending = writer, pending
            self._reader_task = asyncio.create_task(self._read(reader, parser, writer, pending))
            self._arm_watchdog()
            return writer

    async def _read(
        self,
        reader: asyncio.StreamReader,
        parser: hiredis.Reader,
        writer: asyncio.StreamWriter,
        pending: _Pending,
    ) -> None:
        error: BaseException = ConnectionError("connection closed by Redis")
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = pending.popleft()
                    if not future.done():
                        future.set_result(reply)
        except asyncio.CancelledError:
            error = ConnectionError("connection closed")
        except Exception as exc:
            error = ConnectionError(f"connection to Redis failed: {exc}")
        finally:
            self._drop(writer, pending, error)

    def _drop(self, writer: asyncio.StreamWriter, pending: _Pending, error: BaseException) -> None:
        """Fails every command in flight on `writer` and forgets the connection."""
        if self._writer is writer:
            self._writer = None
            self._outgoing.clear()  # their futures fail below
        writer.close()
        while pending:
            future, _ = pending.popleft()
            if not future.done():
                future.set_exception(error)

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(min(1.0, self._timeout), self._check_stall)

    def _check_stall(self) -> None:
        self._watchdog = None
        writer = self._writer
        if writer is None:
            return
        pending = self._pending
        if pending and time.monotonic() - pending[0][1] > self._timeout:
            if self._reader_task is not None:
                self._reader_task.cancel()
            self._drop(
                writer, pending, ConnectionError(f"Redis did not answer in {self._timeout:g}s")
            )
            return
        self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer is not None:
            self._drop(self._writer, self._pending, ConnectionError("connection closed"))
