"""The Redis store: operations shared by every server process, kept across restarts.

Each write is one Lua script (store/redis_scripts.py): compare-and-set on the
operation's revision, the next value of the store-wide revision counter, the new
state, its indexes and the change index, in one round trip. The change index
holds each operation once, at its latest revision, as the memory store's
history does, so "what changed after N" is one range read and conflation holds
by construction.

Each process runs one tailer: it follows the namespace's notification channel
(every write publishes its revision) so that `wait_for_change` wakes within a
round trip of a write made through any process, and it feeds this process's
statistics with the operations other processes finished. The watch hub's one
pump then reads the change index once per round for all of its watchers.

An epoch, a random id created with the keyspace, tells a flushed or replaced
Redis from the one a revision came from: `changes()` refuses to answer across
epochs (HistoryCompacted), so no watcher resumes at a position that means
something else now.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from headway_server.domain.errors import (
    AlreadyExists,
    Conflict,
    Deleted,
    HeadwayError,
    HistoryCompacted,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)
from headway_server.domain.model import (
    Change,
    ChildProgress,
    HeldOperation,
    LogEntry,
    Operation,
    OperationFilter,
    State,
    TimelineEntry,
    evolve,
)
from headway_server.domain.stats import DEFAULT_MAX_SUMMARIES, StatsAggregate
from headway_server.store import redis_scripts as lua
from headway_server.store.base import Changes, Page, redacted
from headway_server.store.journal import MAX_LOG_ENTRIES, MAX_TIMELINE_ENTRIES, Journal
from headway_server.store.packing import (
    pack_entry,
    pack_record,
    unpack_log_entry,
    unpack_record,
    unpack_timeline_entry,
)
from headway_server.store.resp import Endpoint, PipelinedConnection, ReplyError, Subscription

log = logging.getLogger("headway.store.redis")

DEFAULT_NAMESPACE = "headway"
# Operations kept unpacked in this process, by id, at the revision last read or
# written: a report's read-modify-write then costs one round trip (the write's
# compare-and-set catches a stale copy), and watchers of an operation share one
# unpacked value.
CACHE_SIZE = 4096
# Ids read per round trip when listing.
_PAGE_CHUNK = 500
# The tailer reads the revision at least this often even if no notification
# came (a notification lost with a connection must not stall watchers).
_POLL = 1.0
# Writes are announced to other processes (notifications on the namespace's
# channel) by the write script itself at most once per this many seconds; those
# written meanwhile by the next write's script, or, when none comes, by a
# PUBLISH at most twice this long after they were stored (bench: watch delivery
# to another replica, CPU per report: a PUBLISH of its own cost a report ~50 µs).
ANNOUNCE_DELAY = 0.001
# Error replies that mean "this Redis cannot serve now", not "this call is wrong".
_NOT_SERVING = frozenset(
    {
        "LOADING",
        "BUSY",
        "READONLY",
        "MASTERDOWN",
        "MISCONF",
        "OOM",
        "NOAUTH",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
    }
)
# How long a failed store call may take before callers hear UNAVAILABLE.
_SOCKET_TIMEOUT = 5.0
_CONNECT_TIMEOUT = 2.0


_WRITE_KEYS = (
    "meta",
    "rec",
    "rev",
    "made",
    "idx",
    "changes",
    "created",
    "leases",
    "finished",
    "counts",
    "tombs",
    "finishes",
    "active",
)


def _lease(op: Operation) -> str:
    """The lease deadline a state holds, as the WRITE script takes it ('': none)."""
    if op.state is State.RUNNING and not op.stalled and op.heartbeat_timeout > 0:
        return repr(op.last_report_at + op.heartbeat_timeout)
    return ""


class Script:
    """A Lua script and its SHA1, by which EVALSHA runs it once Redis has it;
    `later`: it may wait to share a write to the socket with others (reports'
    writes: resp.FLUSH_INTERVAL), where reads that someone waits on do not."""

    def __init__(self, script: str, *, later: bool = False) -> None:
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.later = later


class RedisStore:
    """Operations, their journals and statistics in Redis, under one namespace."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        max_operations: int = 100_000,
        history_size: int = 10_000,
        max_summaries: int = DEFAULT_MAX_SUMMARIES,
    ) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        namespace = query.pop("namespace", [namespace])[-1]
        if not namespace or any(c in namespace for c in "{}"):
            raise ValueError(f"invalid Redis namespace {namespace!r}")
        self.name = redacted(url)
        # Every command goes through one pipelined connection (store/resp.py):
        # many in flight at once, none waiting for a pooled connection; the
        # tailer's subscription has a connection of its own.
        self._endpoint = Endpoint(urlunsplit(parts._replace(query=urlencode(query, doseq=True))))
        self._fast = PipelinedConnection(
            self._endpoint, connect_timeout=_CONNECT_TIMEOUT, timeout=_SOCKET_TIMEOUT
        )
        self._max_operations = max_operations
        self._history_size = history_size
        self._max_summaries = max_summaries
        # One hash tag for every key: one Cluster slot, so scripts may touch them all.
        prefix = "{" + namespace + "}:"
        self._prefix = prefix
        # The keys a WRITE script takes first, in its KEYS order (redis_scripts.py).
        self._write_keys = tuple(prefix + name for name in _WRITE_KEYS)
        self._k = {name: prefix + name for name in (*_WRITE_KEYS, "logsn", "timelinen")}
        self.channel = prefix + "notify"
        self._init = Script(lua.INIT)
        self._write_script = Script(lua.WRITE, later=True)
        self._delete = Script(lua.DELETE)
        self._changes = Script(lua.CHANGES)
        self._get = Script(lua.GET)
        self._tombstone = Script(lua.TOMBSTONE)
        self._read_members = Script(lua.MEMBERS)
        self._append = Script(lua.APPEND)
        self._entries = Script(lua.ENTRIES)
        self._epoch: str | None = None
        # The epoch as notifications end with it (those of writes that
        # finished nothing).
        self._epoch_note = b""
        self._secret = b""
        self._cache: OrderedDict[str, Operation] = OrderedDict()
        self._child_views: dict[str, ChildProgress] = {}
        # The highest revision this process knows the store has reached.
        self._known = 0
        self._changed = asyncio.Event()
        # Bumped when waiters must look again though no revision came (see _interrupt).
        self._generation = 0
        self.stats = StatsAggregate(max_summaries=max_summaries)
        # Finishes this process recorded itself (by stream entry id), which the
        # tailer then skips; and the last entry it has read.
        self._own_finishes: set[bytes] = set()
        self._finishes_read = b"0-0"
        self._tailer: asyncio.Task[None] | None = None
        # Announcements (see ANNOUNCE_DELAY): when a write may next ask its
        # script to announce (event loop time); the highest revision this
        # process wrote, and the highest that finished an operation; the
        # highest announced, and announced as a finish; the PUBLISH due for
        # what is owed, and the tasks sending them.
        self._next_announce = 0.0
        self._owed = self._owed_finish = 0
        self._owed_since: float | None = None
        self._announced = self._finish_announced = 0
        self._announce_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self.journal: Journal = RedisJournal(self)

    # --- plumbing -----------------------------------------------------------------------

    def key(self, name: str) -> str:
        return self._prefix + name

    async def _exec(self, *args: Any, later: bool = False) -> Any:
        """One command on the pipelined connection (`later`: it may wait to
        share a write with others, see resp.FLUSH_INTERVAL). An unreachable Redis, or
        one that cannot serve now (loading its data, busy, a read-only
        replica...), is StoreUnavailable. A command that failed with its
        connection is not sent again: Redis may have run it before the reply
        was lost, and the caller (its client's retry, with its sequence or
        request id) knows how to repeat it safely."""
        try:
            if later:
                return await self._fast.execute_later(*args)
            return await self._fast.execute(*args)
        except (ConnectionError, OSError) as exc:
            raise StoreUnavailable(f"store {self.name} is unavailable: {exc}") from exc
        except ReplyError as exc:
            if str(exc).split(" ", 1)[0] in _NOT_SERVING:
                raise StoreUnavailable(f"store {self.name} cannot serve now: {exc}") from exc
            raise

    async def _eval(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._exec(
                "EVALSHA", script.sha, len(keys), *keys, *args, later=script.later
            )
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # Redis restarted (its script cache is empty): load it, run it.
            await self._exec("SCRIPT", "LOAD", script.script)
            return await self._exec("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _run(
        self,
        script: Any,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        epoch_at: int = -1,
        again: bool = True,
    ) -> Any:
        """Runs a script; `epoch_at`: the index in `args` where it expects this
        process's epoch (scripts that write check it: a copy read from another
        keyspace must not be written into this one). When the keyspace turns
        out new, the script runs again in it if `again` (its arguments do not
        depend on what was read before), else its NO_EPOCH/OTHER_EPOCH result
        is returned for the caller to start over."""
        if self._epoch is None:
            await self.open()
        result = await self._eval(script, keys, self._with_epoch(args, epoch_at))
        if isinstance(result, list) and result and result[0] in (lua.NO_EPOCH, lua.OTHER_EPOCH):
            # The keyspace was flushed or replaced under us: it is a new store
            # now; what this process held of the old one is dropped.
            await self.open()
            if again:
                result = await self._eval(script, keys, self._with_epoch(args, epoch_at))
        return result

    def _with_epoch(self, args: Sequence[Any], at: int) -> Sequence[Any]:
        if at < 0:
            return args
        filled = list(args)
        filled[at] = self._epoch
        return filled

    async def open(self) -> None:
        """Creates the keyspace's epoch and secret if it has none, reads them,
        replays the statistics and starts the tailer (idempotent)."""
        epoch, secret, rev = await self._eval(
            self._init, [self._k["meta"]], [secrets.token_hex(8), secrets.token_bytes(32)]
        )
        new_epoch = epoch.decode()
        if self._epoch is not None and new_epoch != self._epoch:
            log.warning(
                "store keyspace replaced (flushed?): new epoch",
                extra={"old": self._epoch, "new": new_epoch},
            )
            self._forget_local()
            self._interrupt()
        self._epoch = new_epoch
        self._epoch_note = epoch
        self._secret = secret
        self._see(int(rev or 0))
        await self._read_finishes()
        if self._tailer is None and not self._closed:
            self._tailer = asyncio.create_task(self._tail(), name="headway-redis-tailer")

    def _forget_local(self) -> None:
        self._cache.clear()
        self._child_views.clear()
        self._known = 0
        # Revisions of the old keyspace are not announced in the new one.
        self._owed = self._owed_finish = self._announced = self._finish_announced = 0
        self._owed_since = None
        # Statistics stay: they summarize what finished, which stays true (and
        # a new stream's entry ids continue past the old ones: they are times).

    async def close(self) -> None:
        self._closed = True
        if self._tailer is not None:
            self._tailer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tailer
            self._tailer = None
        if self._announce_timer is not None:
            self._announce_timer.cancel()
            self._publish(now=True)  # the last writes' notification still goes out
        if self._background:
            await asyncio.wait(self._background, timeout=1.0)
        await self._fast.close()

    async def check(self) -> None:
        """Raises StoreUnavailable unless Redis answers now."""
        await self._exec("PING")

    def _interrupt(self) -> None:
        """Wakes every wait_for_change: the keyspace changed or Redis was lost,
        and waiters must look again (and meet the new epoch or the error)."""
        self._generation += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _see(self, revision: int) -> None:
        if revision > self._known:
            self._known = revision
            event, self._changed = self._changed, asyncio.Event()
            event.set()

    async def _tail(self) -> None:
        """Follows the notification channel: wakes waiters, feeds statistics."""
        subscription = Subscription(
            self._endpoint, self.channel, connect_timeout=_CONNECT_TIMEOUT, taken=self._noted
        )
        try:
            while not self._closed:
                try:
                    await subscription.open()
                    # Anything written before the subscription took hold, and
                    # whether the keyspace changed while it was down.
                    await self._poll()
                    await self._read_finishes()
                    while not self._closed:
                        note = await subscription.next(_POLL)
                        if note is None:
                            await self._poll()
                            continue
                        revision, epoch, *finished = note.split()
                        if epoch.decode() != self._epoch:
                            # Written into another keyspace: ours was flushed
                            # or replaced (open() tells which, and resets).
                            await self.open()
                            continue
                        self._see(int(revision))
                        if finished:
                            await self._read_finishes()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the tailer must outlive any failure
                    log.warning("store tailer lost Redis; retrying", extra={"error": str(exc)})
                    self._interrupt()
                    await asyncio.sleep(0.5)
        finally:
            subscription.close()

    def _noted(self, note: bytes) -> bool:
        """Takes in a notification as it arrives when that is all it asks for
        (a revision of this keyspace, no finish): the tailer is not woken for
        it (bench: Redis store, CPU per report; every write of every process
        is one). Anything else is left for the tailer."""
        revision, _, rest = note.partition(b" ")
        if rest != self._epoch_note or not revision.isdigit():
            return False
        self._see(int(revision))
        return True

    async def _poll(self) -> None:
        """What a quiet channel may hide: a revision whose notification was
        lost, or a keyspace flushed (no epoch, or another one)."""
        rev, epoch = await self._exec("HMGET", self._k["meta"], "rev", "epoch")
        if epoch is None or epoch.decode() != self._epoch:
            await self.open()
        else:
            self._see(int(rev or 0))

    async def _read_finishes(self) -> None:
        """Records in this process's statistics the finishes other processes wrote."""
        while True:
            entries = await self._exec(
                "XRANGE", self._k["finishes"], b"(" + self._finishes_read, "+", "COUNT", 1000
            )
            for entry_id, fields in entries:
                self._finishes_read = entry_id
                if entry_id in self._own_finishes:
                    self._own_finishes.discard(entry_id)
                    continue
                record = dict(zip(fields[::2], fields[1::2], strict=True)).get(b"r", b"")
                try:
                    self.stats.record_finished(unpack_record(record))
                except ValueError:
                    log.warning("unreadable finish record skipped", extra={"entry": entry_id})
            if len(entries) < 1000:
                return

    def _cached_op(
        self, op_id: str, record: bytes, revision: Any, created: Any, *, live: bool = True
    ) -> Operation:
        """The operation a record holds at `revision`, from the cache when it
        has it; a deleted one's last state is never cached (get_cached would
        answer with it)."""
        rev, made = int(revision), int(created)
        cached = self._cache.get(op_id)
        if cached is not None and cached.revision == rev and cached.created_revision == made:
            self._cache.move_to_end(op_id)
            return cached
        op = evolve(unpack_record(record), revision=rev, created_revision=made)
        if live:
            self._remember(op)
        else:
            self._cache.pop(op_id, None)
        return op

    def _read_here(self, operation_id: str, revision: int) -> bool:
        """Whether this process holds `operation_id` at `revision` from the
        current keyspace (the cache is emptied when the epoch changes)."""
        cached = self._cache.get(operation_id)
        return cached is not None and cached.revision == revision

    def _remember(self, op: Operation) -> None:
        self._cache[op.id] = op
        self._cache.move_to_end(op.id)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    # --- the store interface ------------------------------------------------------------

    async def revision(self) -> int:
        raw = await self._exec("HGET", self._k["meta"], "rev")
        revision = int(raw or 0)
        self._see(revision)
        return revision

    async def epoch(self) -> str:
        if self._epoch is None:
            await self.open()
        assert self._epoch is not None
        return self._epoch

    async def secret(self) -> bytes:
        if self._epoch is None:
            await self.open()
        return self._secret

    async def get(self, operation_id: str) -> Operation | None:
        k = self._k
        found = await self._run(
            self._get, [k["rec"], k["rev"], k["made"], k["idx"]], [operation_id]
        )
        record, revision, created = found
        if record is None:
            self._cache.pop(operation_id, None)
            return None
        return self._cached_op(operation_id, record, revision, created)

    async def get_cached(self, operation_id: str) -> Operation | None:
        """The operation as this process last saw it, else read: for
        compare-and-set writes, which catch a stale copy."""
        cached = self._cache.get(operation_id)
        if cached is not None:
            return cached
        return await self.get(operation_id)

    async def _write(
        self, writes: Sequence[tuple[Operation, str, int | None]]
    ) -> list[Operation | HeadwayError]:
        """Runs (operation, mode, expected revision; None: chained) writes in
        one script, in order; each stored operation or its error."""
        k = self._k
        keys = list(self._write_keys)
        now = self._fast.loop.time()
        announce = "0"
        if now >= self._next_announce:
            self._next_announce = now + ANNOUNCE_DELAY
            announce = "2" if self._owed_finish > self._finish_announced else "1"
        args: list[Any] = [None, self._max_operations, self._max_summaries, self.channel, announce]
        # (the epoch: see _run)
        for op, mode, expected in writes:
            if mode == "r" and expected is not None and not self._read_here(op.id, expected):
                # Judged on a value this process did not read in the current
                # keyspace (it was flushed since): revisions there may repeat
                # the old ones, so the script's compare-and-set could not tell.
                # Sent as a chained write with nothing before it: Conflict.
                expected = None
            parent = op.spec.parent_id
            keys.append(self.key("children:" + parent) if parent else k["created"])
            lease = _lease(op)
            if not lease and mode == "r" and expected is not None:
                if not _lease(self._cache[op.id]):
                    lease = "-"  # it had none (the value it replaces), and has none
            terminal = op.state.terminal
            finish = repr(op.finished_at) if terminal and op.finished_at is not None else ""
            args += (
                mode,
                op.id,
                "^" if expected is None else str(expected),
                # Its revisions are set on read, from the `rev` and `made` hashes.
                pack_record(op),
                "1" if terminal else "0",
                f"{op.state.name}\0{op.kind}",
                lease,
                finish,
                "1" if parent else "0",
                op.spec.project,
            )
        # Creates may run again in a new keyspace; replaces were judged on
        # values from the old one: they answer Conflict and are read again.
        creates_only = all(mode == "c" for _, mode, _ in writes)
        result = await self._run(self._write_script, keys, args, epoch_at=0, again=creates_only)
        if result and result[0] in (lua.NO_EPOCH, lua.OTHER_EPOCH):
            result = [lua.CONFLICT, 0, b""] * len(writes) + [0]
        outcomes: list[Operation | HeadwayError] = []
        wrote = finished = 0
        for i, (op, _, _) in enumerate(writes):
            code, created, entry = result[3 * i : 3 * i + 3]
            # A replace keeps its created revision: the script does not read it.
            created = created or op.created_revision
            if code < 0:
                if code in (lua.NOT_FOUND, lua.CONFLICT, lua.DELETED):
                    self._cache.pop(op.id, None)
                outcomes.append(self._error(code, op.id))
                continue
            stored = evolve(op, revision=code, created_revision=created)
            self._remember(stored)
            wrote = max(wrote, code)
            if entry:
                self._own_finishes.add(entry)
                self.stats.record_finished(stored)
                finished = max(finished, code)
            outcomes.append(stored)
        if wrote:
            self._see(wrote)  # once for the batch: it wakes every waiter
        announced = result[-1]
        if announced:
            # The script announced the store's revision after these writes
            # (and all before them), as a finish if asked or one finished.
            self._announced = max(self._announced, announced)
            if announce == "2" or finished:
                self._finish_announced = max(self._finish_announced, announced)
        self._owe(wrote, finished, covered_at=now if announced else None)
        return outcomes

    def _owing(self) -> bool:
        return self._owed > self._announced or self._owed_finish > self._finish_announced

    def _owe(self, revision: int, finished: int = 0, *, covered_at: float | None = None) -> None:
        """Notes a revision this process wrote (and, if not 0, the revision of
        a write that finished an operation), for the other processes' tailers
        to hear about: unless a write's script announces it first, a PUBLISH
        goes out 2 * ANNOUNCE_DELAY after it was owed. `covered_at`: a write
        sent then has just announced everything Redis held before it. A
        notification lost with a crash only delays the other processes until
        their tailer's next poll."""
        self._owed = max(self._owed, revision)
        self._owed_finish = max(self._owed_finish, finished)
        if not self._owing():
            self._owed_since = None
            return
        loop = self._fast.loop
        if self._owed_since is None:
            self._owed_since = loop.time()
        elif covered_at is not None:
            # What is still owed was written after that write was sent.
            self._owed_since = max(self._owed_since, covered_at)
        if self._announce_timer is None:
            self._announce_timer = loop.call_at(
                self._owed_since + 2 * ANNOUNCE_DELAY, self._publish
            )

    def _publish(self, *, now: bool = False) -> None:
        """PUBLISHes what this process owes the other processes' tailers, if
        it is due (or `now`)."""
        self._announce_timer = None
        if not self._owing() or self._owed_since is None:
            return  # a write's script announced it meanwhile
        loop = self._fast.loop
        due = self._owed_since + 2 * ANNOUNCE_DELAY
        if not now and loop.time() < due:
            # Partly announced meanwhile: the rest was owed later.
            self._announce_timer = loop.call_at(due, self._publish)
            return
        finished = self._owed_finish > self._finish_announced
        revision = max(self._owed, self._owed_finish, self._announced)
        self._announced = revision
        if finished:
            self._finish_announced = revision
        self._owed_since = None
        self._next_announce = loop.time() + ANNOUNCE_DELAY
        note = f"{revision} {self._epoch}{' f' if finished else ''}"
        task = self._fast.loop.create_task(self._send_note(note))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_note(self, note: str) -> None:
        try:
            await self._exec("PUBLISH", self.channel, note)
        except Exception as exc:  # the write is stored; others poll for it
            log.warning("could not notify other processes", extra={"detail": str(exc)})

    def _error(self, code: int, operation_id: str) -> HeadwayError:
        if code == lua.EXISTS:
            return AlreadyExists(f"operation {operation_id!r} already exists")
        if code == lua.FULL:
            return ResourceExhausted(
                f"the store holds its maximum of {self._max_operations} operations"
            )
        if code == lua.NOT_FOUND:
            return NotFound(f"operation {operation_id!r} not found")
        if code == lua.DELETED:
            # Deleted between the caller's read and this write (as the
            # service answers one deleted before its read).
            return Deleted(f"operation {operation_id!r} not found")
        return Conflict(f"operation {operation_id!r} changed concurrently")

    async def _write_one(self, op: Operation, mode: str, expected: int) -> Operation:
        (outcome,) = await self._write([(op, mode, expected)])
        if isinstance(outcome, HeadwayError):
            raise outcome
        return outcome

    async def create(self, operation: Operation) -> Operation:
        return await self._write_one(operation, "c", 0)

    async def replace(self, operation: Operation, *, expected_revision: int) -> Operation:
        return await self._write_one(operation, "r", expected_revision)

    async def replace_many(
        self, writes: Sequence[tuple[Operation, int | None]]
    ) -> list[Operation | HeadwayError]:
        if not writes:
            return []
        return await self._write([(op, "r", expected) for op, expected in writes])

    async def delete(self, operation_id: str) -> int:
        # The parent names the children index to leave (read fresh: the id
        # may have been deleted and started again elsewhere with another one).
        current = await self.get(operation_id)
        if current is None:
            raise NotFound(f"operation {operation_id!r} not found")
        k = self._k
        parent = current.spec.parent_id
        keys = [
            k["meta"],
            k["rec"],
            k["rev"],
            k["made"],
            k["idx"],
            k["changes"],
            k["created"],
            self.key("children:" + parent) if parent else self.key("children:"),
            k["leases"],
            k["finished"],
            k["counts"],
            k["tombs"],
            self.key("logs:" + operation_id),
            self.key("timeline:" + operation_id),
            k["logsn"],
            k["timelinen"],
            k["active"],
        ]
        result = await self._run(
            self._delete,
            keys,
            [operation_id, self._history_size, None, current.spec.project],
            epoch_at=2,
        )
        self._cache.pop(operation_id, None)
        self._child_views.pop(operation_id, None)
        if result[0] == lua.NOT_FOUND:
            raise NotFound(f"operation {operation_id!r} not found")
        revision: int = result[0]
        self._see(revision)
        self._owe(revision)
        return revision

    async def _read_changes(
        self, after: int, limit: int, live_only: bool
    ) -> tuple[int, list[Change]]:
        k = self._k
        epoch = await self.epoch()
        result = await self._run(
            self._changes,
            [k["meta"], k["changes"], k["rec"], k["rev"], k["made"], k["idx"]],
            [after, limit, "1" if live_only else "0", epoch],
        )
        code = result[0]
        if code == lua.OTHER_EPOCH:
            # Flushed, or another Redis: nothing this process holds is valid.
            await self.open()
            raise HistoryCompacted(
                f"the store's epoch changed ({epoch} -> {self._epoch}); start over"
            )
        if code == lua.OUT_OF_RANGE:
            raise HistoryCompacted(
                f"revision {after} is outside the history held ({result[2]}..{result[1]})"
            )
        revision = int(code)
        self._see(revision)
        found: list[Change] = []
        rows = result[3:]
        for i in range(0, len(rows), 6):
            op_id, at, record, state_rev, created, live = rows[i : i + 6]
            op = self._cached_op(op_id.decode(), record, state_rev, created, live=bool(live))
            found.append(Change(int(float(at)), op, deleted=not live))
        return revision, found

    async def changes(self, after: int, *, limit: int) -> Changes:
        revision, found = await self._read_changes(after, limit + 1, live_only=False)
        if len(found) > limit:
            del found[limit:]
            return Changes(found, found[-1].revision if found else after)
        return Changes(found, revision)

    async def snapshot(self, where: OperationFilter) -> Changes:
        revision, found = await self._read_changes(0, -1, live_only=True)
        return Changes([c for c in found if where.matches(c.operation)], revision)

    async def tombstone(self, operation_id: str) -> Change | None:
        k = self._k
        found = await self._run(
            self._tombstone, [k["rec"], k["rev"], k["made"], k["tombs"]], [operation_id]
        )
        if not found:
            return None
        deleted, record, revision, created = found
        op = self._cached_op(operation_id, record, revision, created, live=False)
        return Change(int(float(deleted)), op, deleted=True)

    async def _ops(self, ids: Iterable[str]) -> list[Operation]:
        """The live operations among `ids`, in that order, read at one revision."""
        wanted = list(ids)
        if not wanted:
            return []
        k = self._k
        rows = await self._run(self._get, [k["rec"], k["rev"], k["made"], k["idx"]], wanted)
        ops = []
        for i, op_id in enumerate(wanted):
            record, revision, created = rows[3 * i : 3 * i + 3]
            if record is not None:
                ops.append(self._cached_op(op_id, record, revision, created))
        return ops

    async def _members(
        self, index: str, after: float, limit: int
    ) -> tuple[int, list[tuple[str, int, int]]]:
        """(store revision, [(id, score, revision)]) of an index ZSET's members
        scored above `after`, in score order."""
        k = self._k
        result = await self._run(self._read_members, [k["meta"], index, k["rev"]], [after, limit])
        rows = result[1:]
        return int(result[0]), [
            (rows[i].decode(), int(float(rows[i + 1])), int(rows[i + 2] or 0))
            for i in range(0, len(rows), 3)
        ]

    async def list_page(self, where: OperationFilter, *, after: int = 0, limit: int = 100) -> Page:
        found: list[Operation] = []
        revision = 0
        cursor = after
        while len(found) <= limit:
            revision, members = await self._members(self._k["created"], cursor, _PAGE_CHUNK)
            if not members:
                break
            found.extend(op for op in await self._ops(m[0] for m in members) if where.matches(op))
            cursor = members[-1][1]
            if len(members) < _PAGE_CHUNK:
                break
        more = len(found) > limit
        del found[limit:]
        return Page(found, found[-1].created_revision if more else None, revision)

    async def children(self, parent_id: str) -> list[ChildProgress]:
        _, members = await self._members(self.key("children:" + parent_id), -1, -1)
        views: list[ChildProgress | None] = []
        missing = []
        for op_id, _, revision in members:
            view = self._child_views.get(op_id)
            if view is not None and view.revision == revision:
                views.append(view)
            else:
                views.append(None)
                missing.append(op_id)
        fresh = {op.id: ChildProgress.of(op) for op in await self._ops(missing)}
        self._child_views.update(fresh)
        result = []
        for (op_id, _, _), view in zip(members, views, strict=True):
            found = view or fresh.get(op_id)
            if found is not None:
                result.append(found)
        return result

    async def scan(self) -> list[HeldOperation]:
        # Statistics read this with the aggregate: bring it up to date first.
        await self._read_finishes()
        _, members = await self._members(self._k["created"], -1, -1)
        ops: list[HeldOperation] = []
        for start in range(0, len(members), _PAGE_CHUNK):
            chunk = members[start : start + _PAGE_CHUNK]
            ops.extend(await self._ops(m[0] for m in chunk))
        return ops

    async def wait_for_change(self, after: int) -> int:
        if self._tailer is None:
            await self.open()
        generation = self._generation
        while self._known <= after and self._generation == generation:
            await self._changed.wait()
        return self._known

    async def lapsed_leases(self, now: float) -> list[str]:
        ids = await self._exec("ZRANGEBYSCORE", self._k["leases"], "-inf", repr(now))
        return [i.decode() for i in ids]

    async def finished_before(self, cutoff: float, *, limit: int) -> list[str]:
        ids = await self._exec(
            "ZRANGEBYSCORE", self._k["finished"], "-inf", repr(cutoff), "LIMIT", 0, limit
        )
        return [i.decode() for i in ids]

    async def active_in(self, project: str) -> int:
        return int(await self._exec("HGET", self._k["active"], project) or 0)

    async def counts(self) -> dict[tuple[str, str], int]:
        raw = await self._exec("HGETALL", self._k["counts"])
        counts = {}
        for key, n in zip(raw[::2], raw[1::2], strict=True):
            state, _, kind = key.decode().partition("\0")
            if int(n) > 0:
                counts[state, kind] = int(n)
        return counts


class RedisJournal:
    """Logs and timelines as capped Redis lists beside the operations.

    A log entry's index is its position counted from the first ever appended
    (appended - held + position), so entries need not be rewritten when the
    oldest are dropped.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        max_logs: int = MAX_LOG_ENTRIES,
        max_timeline: int = MAX_TIMELINE_ENTRIES,
    ) -> None:
        self._store = store
        self._max = {"logs": max_logs, "timeline": max_timeline}

    async def _append(self, kind: str, operation_id: str, entries: Iterable[Any]) -> int:
        packed = [pack_entry(e) for e in entries]
        if not packed:
            return await self._dropped(kind, operation_id)
        store = self._store
        appended, held = await store._run(
            store._append,
            [store.key(f"{kind}:{operation_id}"), store.key(f"{kind}n")],
            [operation_id, self._max[kind], *packed],
        )
        return int(appended) - int(held)

    async def _read(self, kind: str, operation_id: str) -> tuple[int, list[bytes]]:
        store = self._store
        result = await store._run(
            store._entries,
            [store.key(f"{kind}:{operation_id}"), store.key(f"{kind}n")],
            [operation_id],
        )
        return int(result[0]), result[1:]

    async def _dropped(self, kind: str, operation_id: str) -> int:
        store = self._store
        appended, held = await asyncio.gather(
            store._exec("HGET", store.key(f"{kind}n"), operation_id),
            store._exec("LLEN", store.key(f"{kind}:{operation_id}")),
        )
        return int(appended or 0) - int(held)

    async def append_logs(self, operation_id: str, entries: Iterable[LogEntry]) -> int:
        return await self._append("logs", operation_id, entries)

    async def logs(self, operation_id: str) -> tuple[list[LogEntry], int]:
        appended, held = await self._read("logs", operation_id)
        first = appended - len(held)
        return [unpack_log_entry(e, first + i + 1) for i, e in enumerate(held)], first

    async def append_timeline(self, operation_id: str, entries: Iterable[TimelineEntry]) -> None:
        await self._append("timeline", operation_id, entries)

    async def timeline(self, operation_id: str) -> tuple[list[TimelineEntry], int]:
        appended, held = await self._read("timeline", operation_id)
        return [unpack_timeline_entry(e) for e in held], appended - len(held)

    async def seal(self, operation_id: str) -> None:
        pass  # entries are already held packed

    async def forget(self, operation_id: str) -> None:
        # The store's delete script drops them with the operation, atomically;
        # this covers an operation deleted by a version that did not.
        store = self._store
        await store._exec(
            "DEL", store.key(f"logs:{operation_id}"), store.key(f"timeline:{operation_id}")
        )
        await store._exec("HDEL", store.key("logsn"), operation_id)
        await store._exec("HDEL", store.key("timelinen"), operation_id)
