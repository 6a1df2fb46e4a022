"""A pipelined Redis connection for the store's hot path: one socket, many
commands in flight, replies matched to callers in order.

redis-py takes a pooled connection per command and waits for its reply before
the connection serves another: ~120 µs of Python per report on this hardware
(bench: Redis store, py-spy), about half of a report's whole cost. Here a
command is its encoded bytes written to the socket (hiredis packs them) and a
future; the connection's protocol parses replies with hiredis as they arrive
and resolves the futures in order, in the event loop's callback for the
socket (no reader task, no StreamReader between them), so concurrent reports
share the socket's writes and reads.

Commands go out at the end of this turn of the event loop, together with the
others issued in it. Those sent with `execute_later` (the store's writes) may
wait longer: one issued sooner than FLUSH_INTERVAL after the socket was last
written waits for the interval to end (or for a command that does not wait),
with every other command issued meanwhile, unless its task has just had a
reply (a chain of commands, one after another, goes at the pace of Redis's
replies). A write to a TCP socket costs tens of µs of system time here, and
wakes Redis: under load (a report every ~0.5 ms; bench: Redis store, unary
reports) Redis then reads 0.75 times per report instead of 1.3, and answers
the writes that shared a read in one go (a 1 ms interval: 0.38, but a lone
client's calls, one after another ~1 ms apart, took 1.65 ms each instead of
1.08; at 0.5 ms they take 1.06-1.10).

Only what the store's scripts need: connect (TLS, AUTH, SELECT), execute,
subscribe, close. A connection that fails or stops answering fails every
command in flight with ConnectionError, and the next command connects again.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

# A command in flight longer than this means Redis (or the path to it) is gone.
DEFAULT_TIMEOUT = 5.0
# Commands sent with execute_later go out at most once per this many seconds
# (see above).
FLUSH_INTERVAL = 0.0005
# Bytes held beyond which they are written at once.
_HOLD_LIMIT = 1 << 16


class ReplyError(Exception):
    """Redis answered a command with an error (e.g. NOSCRIPT)."""


# (future, time issued, the task that issued it) of each command in flight.
_Pending = collections.deque[tuple["asyncio.Future[Any]", float, "asyncio.Task[Any] | None"]]


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

    def where(self) -> str:
        return self.path or f"{self.host}:{self.port}"


class _Connection(asyncio.Protocol):
    """One socket's protocol: replies (or pushed messages) parsed as they
    arrive and handed to `received`; commands written with `send`."""

    def __init__(self) -> None:
        # Held rather than looked up: asyncio.get_running_loop() costs a
        # getpid() system call in Python 3.11 (bench: Redis store, py-spy).
        self.loop = asyncio.get_running_loop()
        self.parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        # Why the connection ended (None while it is open).
        self.lost: BaseException | None = None
        self.paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        try:
            while (reply := self.parser.gets()) is not False:
                self.received(reply)
        except Exception as exc:  # a reply hiredis cannot parse, or none was asked for
            self.fail(ConnectionError(f"connection to Redis failed: {exc!r}"))
            return
        self.after_replies()

    def received(self, reply: Any) -> None:
        raise NotImplementedError

    def after_replies(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            ConnectionError(f"connection to Redis failed: {exc}")
            if exc is not None
            else ConnectionError("connection closed by Redis")
        )

    def fail(self, error: BaseException) -> None:
        """Ends the connection (idempotent); subclasses fail what waits on it."""
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.close()
        self._release()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._release()

    def _release(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self) -> None:
        """Returns once the socket's buffer is below its high-water mark (or
        the connection ended)."""
        if not self.paused or self.lost is not None:
            return
        if self._drained is None:
            self._drained = self.loop.create_future()
        # Shared by every writer waiting: one cancelled must not cancel it.
        await asyncio.shield(self._drained)


class _Replies(_Connection):
    """Replies to commands, in order; each resolves its command's future."""

    def __init__(self) -> None:
        super().__init__()
        # (future, time issued) of each command in flight, oldest first: the
        # written ones, then those in `held`.
        self.pending: _Pending = collections.deque()
        # Encoded commands not yet written, until a flush is due (see
        # FLUSH_INTERVAL), and when the socket was last written (loop time).
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.flushed_at = -FLUSH_INTERVAL
        # The flush scheduled, and whether at the end of this turn of the
        # loop (else when the interval ends).
        self.flush_due: asyncio.Handle | None = None
        self.flush_soon = False
        # The tasks whose replies came in the last read.
        self.replied: set[asyncio.Task[Any]] = set()

    def data_received(self, data: bytes) -> None:
        self.replied.clear()
        super().data_received(data)

    def received(self, reply: Any) -> None:
        future, _, task = self.pending.popleft()
        if not future.done():
            future.set_result(reply)
        if task is not None:
            self.replied.add(task)

    def send(self, command: bytes, future: asyncio.Future[Any], *, later: bool = False) -> None:
        loop = self.loop
        task = asyncio.current_task(loop)
        self.pending.append((future, time.monotonic(), task))
        self.held.append(command)
        self.held_bytes += len(command)
        if self.held_bytes > _HOLD_LIMIT:
            self.flush()
        elif not self.flush_soon:
            if not later or task in self.replied or loop.time() >= self.flushed_at + FLUSH_INTERVAL:
                if self.flush_due is not None:
                    self.flush_due.cancel()
                self.flush_soon = True
                self.flush_due = loop.call_soon(self.flush)
            elif self.flush_due is None:
                self.flush_due = loop.call_at(self.flushed_at + FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self.flush_due is not None:
            self.flush_due.cancel()  # when flushed before it was due
            self.flush_due = None
        self.flush_soon = False
        if not self.held or self.lost is not None or self.transport is None:
            return  # failed meanwhile: their futures have failed with it
        data = b"".join(self.held) if len(self.held) > 1 else self.held[0]
        self.held.clear()
        self.held_bytes = 0
        self.flushed_at = self.loop.time()
        self.transport.write(data)

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self.held.clear()
        self.held_bytes = 0
        pending = self.pending
        while pending:
            future, _, _ = pending.popleft()
            if not future.done():
                future.set_exception(error)


async def _connect(
    endpoint: Endpoint, connect_timeout: float, protocol: _Connection
) -> _Connection:
    """`protocol` on a new connection, authenticated and on its database.

    Raises:
        ConnectionError: Redis cannot be reached or refused the credentials.
    """
    loop = asyncio.get_running_loop()
    try:
        if endpoint.path:
            opening = loop.create_unix_connection(lambda: protocol, endpoint.path)
        else:
            opening = loop.create_connection(
                lambda: protocol, endpoint.host, endpoint.port, ssl=endpoint.tls
            )
        await asyncio.wait_for(opening, connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise ConnectionError(f"cannot connect to {endpoint.where()}: {exc}") from exc
    assert protocol.transport is not None
    hello: list[tuple[Any, ...]] = []
    if endpoint.password is not None:
        auth = (endpoint.username, endpoint.password)
        hello.append(("AUTH", *(a for a in auth if a is not None)))
    if endpoint.db:
        hello.append(("SELECT", endpoint.db))
    if not hello:
        return protocol
    greeter = _Replies()
    try:
        # The greeting's replies go to a protocol of its own; then `protocol`
        # takes the socket over (nothing else was sent on it meanwhile).
        greeter.connection_made(protocol.transport)
        protocol.transport.set_protocol(greeter)
        for command in hello:
            answer: asyncio.Future[Any] = loop.create_future()
            greeter.send(hiredis.pack_command(command), answer)
            greeter.flush()
            try:
                reply = await asyncio.wait_for(answer, connect_timeout)
            except TimeoutError as exc:
                raise ConnectionError(
                    f"{command[0]} got no answer in {connect_timeout:g}s"
                ) from exc
            if isinstance(reply, hiredis.ReplyError):
                raise ConnectionError(f"{command[0]} refused: {reply}")
        protocol.transport.set_protocol(protocol)
    except BaseException:
        protocol.transport.close()
        raise
    return protocol


class _Messages(_Connection):
    """A subscribed connection's pushed messages: each offered to `taken` as
    it arrives, and those it does not take queued for `Subscription.next`."""

    def __init__(self, taken: Callable[[bytes], bool] | None) -> None:
        super().__init__()
        self.taken = taken
        self.messages: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def received(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return
        if reply[0] == b"message":
            data = reply[-1]
            # In order: none is taken while earlier ones wait in the queue.
            if self.messages or self.taken is None or not self.taken(data):
                self.messages.append(data)
        elif reply[0] == b"subscribe":
            self.messages.append(b"")

    def after_replies(self) -> None:
        if self.messages:
            self._wake()

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class Subscription:
    """One channel's messages, on a connection of its own (a subscribed
    connection takes no other commands).

    `taken`, if given, is offered each message as it arrives, in the socket's
    callback (no task wakes for it): when it returns True the message is
    handled and `next` does not return it. It must not raise.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        channel: str,
        *,
        connect_timeout: float,
        taken: Callable[[bytes], bool] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._channel = channel
        self._connect_timeout = connect_timeout
        self._taken = taken
        self._connection: _Messages | None = None

    async def open(self) -> None:
        """Connects and subscribes; returns once Redis confirmed it."""
        self.close()
        connection = _Messages(self._taken)
        await _connect(self._endpoint, self._connect_timeout, connection)
        self._connection = connection
        assert connection.transport is not None
        command: tuple[Any, ...] = ("SUBSCRIBE", self._channel)
        connection.transport.write(hiredis.pack_command(command))
        confirmed = await self.next(self._connect_timeout)
        if confirmed is None:
            self.close()
            raise ConnectionError(f"SUBSCRIBE got no answer in {self._connect_timeout:g}s")

    async def next(self, wait: float | None) -> bytes | None:
        """The next message's data (b"" for the subscription's confirmation);
        None when `wait` seconds passed without one.

        Raises:
            ConnectionError: the connection failed (open() again).
        """
        connection = self._connection
        if connection is None:
            raise ConnectionError("not subscribed")
        while not connection.messages:
            if connection.lost is not None:
                raise ConnectionError(f"subscription lost: {connection.lost}")
            waiter = connection.waiter = connection.loop.create_future()
            try:
                async with asyncio.timeout(wait):
                    await waiter
            except TimeoutError:
                return None
            finally:
                connection.waiter = None
        return connection.messages.popleft()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.fail(ConnectionError("subscription closed"))
        self._connection = None


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
        self._connection: _Replies | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The current connection's event loop (that of the commands sent last)."""
        connection = self._connection
        return connection.loop if connection is not None else asyncio.get_running_loop()

    async def execute(self, *args: Any) -> Any:
        """Sends one command (at the end of this turn of the event loop) and
        returns its reply.

        Raises:
            ReplyError: Redis answered with an error.
            ConnectionError: Redis could not be reached, or the connection
                failed or stalled with the command in flight (which Redis may
                or may not have run).
        """
        return await self._execute(args, False)

    async def execute_later(self, *args: Any) -> Any:
        """As execute, for a command that may wait up to FLUSH_INTERVAL to
        share its write to the socket with others (see above)."""
        return await self._execute(args, True)

    async def _execute(self, args: tuple[Any, ...], later: bool) -> Any:
        connection = self._connection
        if connection is None or connection.lost is not None:
            connection = await self._connect()
        future: asyncio.Future[Any] = connection.loop.create_future()
        connection.send(hiredis.pack_command(args), future, later=later)
        if connection.paused:
            await connection.drain()
        reply = await future
        if isinstance(reply, hiredis.ReplyError):
            raise ReplyError(str(reply))
        return reply

    async def _connect(self) -> _Replies:
        if self._closed:
            raise ConnectionError("connection closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            connection = self._connection
            if connection is not None and connection.lost is None:
                return connection
            connection = _Replies()
            await _connect(self._endpoint, self._connect_timeout, connection)
            self._connection = connection
            self._arm_watchdog()
            return connection

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(min(1.0, self._timeout), self._check_stall)

    def _check_stall(self) -> None:
        self._watchdog = None
        connection = self._connection
        if connection is None or connection.lost is not None:
            return
        pending = connection.pending
        if pending and time.monotonic() - pending[0][1] > self._timeout:
            connection.fail(ConnectionError(f"Redis did not answer in {self._timeout:g}s"))
            return
        self._arm_watchdog()

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._connection is not None:
            self._connection.fail(ConnectionError("connection closed"))
