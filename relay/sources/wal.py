"""The WAL source: notifications read from PostgreSQL's write-ahead log through a logical slot.

Theory of operation
-------------------
Producers write ``SELECT pg_logical_emit_message(true, '<PGWS_LISTEN_CHANNEL>', payload)``
instead of ``pg_notify``. The message is part of its transaction: logical decoding hands it over
when the transaction commits, in commit order, and never when it rolls back. The relay reads it
through a replication slot of its own (``PGWS_WAL_SLOT``) with the built-in ``pgoutput`` plugin
(``messages 'true'``), which needs a publication: the relay creates ``PGWS_WAL_PUBLICATION``
when it is missing, publishing no table, so only messages come through. The protocol is
:mod:`relay.sources.replication`; this module is the I/O around it.

Why psycopg 3 at the libpq level (``psycopg.pq``): it is already the relay's driver, its
``get_copy_data`` reads a COPY_BOTH stream without blocking and its socket fits
``trio.lowlevel.wait_readable``, as the LISTEN source's does. psycopg2's ``ReplicationCursor``
answers the server's keepalives itself, so a client cannot see the one that matters at a fast
shutdown (below); the few replication messages are documented and short
(:mod:`relay.sources.replication`).

Start-up, at every connection: ``wal_level`` must be ``logical`` (else
:class:`relay.sources.base.SourceMisconfigured`: the relay exits 2 with one line saying so); the
publication is created when missing; the slot is looked up, and created when missing (logged),
dropped and created again when PostgreSQL invalidated it (``wal_status`` ``lost``, past
``max_slot_wal_keep_size``). A slot created after the first connection is a *gap*: what was
committed while there was none is not in it (counted, logged, ``on_gap``, and ``on_listening``
tells positioned clients ``lost``). A slot of another plugin or database is a start-up error.

Reading: every wake-up drains what libpq has, hands the committed transactions' payloads to the
hub as one batch (``publish``), and confirms. A transaction is delivered at most once: the
commit LSN of the last one delivered is remembered, and anything at or before it is skipped
(after a reconnection PostgreSQL starts at the slot's confirmed position, which a fast restart
may have moved back).

Confirming (the slot's ``confirmed_flush_lsn``): what was delivered, and, when the server's
keepalive says the stream is caught up and no transaction is half read, its end of WAL. The
second matters at a fast shutdown of PostgreSQL: the walsender exits only once the client has
confirmed everything it sent (it asks with a keepalive that wants a reply), so a client that
confirmed less would hold ``pg_ctl stop -m fast`` until it times out.

Liveness: every ``heartbeat_interval`` seconds (``PGWS_CHECK_LISTENER_INTERVAL``) the relay
sends a status update that asks for a reply; the walsender answers at once with a keepalive.
If nothing at all comes back within the timeout, the connection is lost, even if its socket
looks fine. A lost connection is opened again within ``PGWS_RETRIES``'s window
(:mod:`relay.sources.outage`) and resumes from the slot: no message lost, none twice, no gap.

Bounds: a message larger than ``max_payload_bytes`` (``PGWS_MAX_PAYLOAD_BYTES``) is not
delivered; it is counted (:attr:`WalSource.oversized`), logged with its transaction's LSN and
``on_loss`` is called, so positioned clients are told ``lost``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any

import psycopg
import trio
from psycopg import pq, sql

from relay.core.history import LOG_INDEX_BITS
from relay.sources import replication
from relay.sources.base import SourceGaveUp, SourceMisconfigured
from relay.sources.outage import RETRY_SPACING, Reconnecting, first_line
from relay.sources.replication import Keepalive, Transactions

log = logging.getLogger(__name__)

#: Seconds between status updates while deliveries move the confirmed position: the slot
#: releases WAL about this often. The walsender needs one at least every
#: ``wal_sender_timeout`` (60 s by default); the heartbeat sends them anyway.
_STATUS_INTERVAL = 1.0

#: A heartbeat must be answered within its period, but never less than this many seconds.
_HEARTBEAT_MIN_TIMEOUT = 1.0


#: What PostgreSQL says when another process reads the slot.
_IN_USE = "is active for PID"
_STANDBY = "standing by: the slot is read by another process"


class _Lost(Exception):
    """The replication connection stopped working; the message says how."""


class WalSource(Reconnecting):
    """The :class:`relay.sources.base.Source` of the write-ahead log (see the module's opening).

    ``on_listening`` is called at the first connection and whenever a new slot had to be made
    (a gap); a reconnection to the same slot is not a gap. ``on_loss`` is called when a message
    could not be delivered (over ``max_payload_bytes``).
    """

    role = "WAL reader"

    def __init__(
        self,
        db_uri: str,
        connect_options: dict[str, Any],
        prefix: str,
        slot: str,
        publication: str,
        max_payload_bytes: int,
        publish: Callable[..., None],
        heartbeat_interval: float,
        retries: int,
        on_gap: Callable[[float, float], None] | None = None,
        on_listening: Callable[[], None] | None = None,
        on_loss: Callable[[], None] | None = None,
        on_log: Callable[[int, int], None] | None = None,
        on_caught_up: Callable[[], None] | None = None,
        holding: Callable[[], int | None] | None = None,
        holding_is_binding: bool = False,
        room: Callable[[], Awaitable[None]] | None = None,
        standby: bool = False,
    ) -> None:
        """``holding``: the oldest key something still needs from the log (the history, the
        feeder's unacknowledged messages): the slot is not told to let it go; with
        ``holding_is_binding`` not even when the server asks at a shutdown (a feeder must not
        confirm what NATS has not stored). ``room``: awaited before each read (backpressure).
        ``standby``: a slot another process reads is waited for, not an outage."""
        super().__init__(retries)
        self._db_uri = db_uri
        self._connect_options = connect_options
        self._prefix = prefix
        self._slot = slot
        self._publication = publication
        self._publish = publish
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = max(heartbeat_interval, _HEARTBEAT_MIN_TIMEOUT)
        self._on_gap = on_gap
        self._on_listening = on_listening
        self._on_loss = on_loss
        self._on_log = on_log
        self._on_caught_up = on_caught_up
        self._holding = holding
        self._holding_is_binding = holding_is_binding
        self._room = room
        self._standby = standby
        #: The database's system identifier, timeline and name, once connected.
        self.system_identifier = ""
        self.timeline = 0
        self.database = ""
        #: The log's identity (:func:`log_identity`) once read; the end of WAL to read up to
        #: before the first start is caught up (None: it is).
        self.identity: int | None = None
        self._catch_up_to: int | None = None
        self._transactions = Transactions(prefix, max_payload_bytes)
        #: Whether a slot was read from yet (a slot made after that is a gap).
        self._started = False
        #: The log up to here was handed to the hub (or holds no message of ours); what the
        #: slot was last told it may let go of (:meth:`confirmable`).
        self.delivered = 0
        self.confirmed = 0
        #: The server's end of WAL, as it last said.
        self.wal_end = 0
        #: Unix time of the last message delivered (0: none yet).
        self.last_message_at = 0.0
        #: Messages handed to the hub; times the slot had to be made again (a gap); messages
        #: over the payload bound, not delivered.
        self.received = 0
        self.gaps = 0
        self.oversized = 0
        self.ready = trio.Event()

    @property
    def lag_bytes(self) -> int:
        """WAL the slot holds beyond what it confirmed (as the server last said)."""
        return max(0, self.wal_end - self.confirmed)

    def gauges(self) -> dict[str, tuple[str, float]]:
        """The slot's numbers, for /metrics."""
        since = time.time() - self.last_message_at if self.last_message_at else -1.0
        return {
            "pgws_wal_lag_bytes": ("Bytes of WAL the slot holds for this relay: the server's "
                                   "end of WAL less what the slot confirmed (the history "
                                   "window is kept on purpose).", self.lag_bytes),
            "pgws_wal_confirmed_lsn": ("The slot's confirmed position (an LSN as a number).",
                                       self.confirmed),
            "pgws_wal_delivered_lsn": ("The log up to here was handed to the hub.",
                                       self.delivered),
            "pgws_wal_seconds_since_message": ("Seconds since the last message was read "
                                               "(-1: none yet).", since),
            "pgws_wal_oversized_messages": ("Messages over PGWS_MAX_PAYLOAD_BYTES, not "
                                            "delivered.", self.oversized),
        }

    async def run(self) -> None:
        """Read the log until cancelled; raise :class:`SourceGaveUp` when an outage lasts too
        long, :class:`SourceMisconfigured` when the database cannot serve this source."""
        down: tuple[float, float] | None = None
        attempts = 0
        self._went_down(trio.current_time(), "not connected yet")
        while True:
            started = trio.current_time()
            try:
                begun = await trio.to_thread.run_sync(self._connect_and_start,
                                                      abandon_on_cancel=True)
            except psycopg.Error as exc:
                message = first_line(exc)
                if _IN_USE in message and self._standby:
                    # Another reader (an active feeder) holds the slot: wait to take over,
                    # for as long as it takes; this is not an outage.
                    if self.status != _STANDBY:
                        log.info("replication slot %r is read by another process; standing by "
                                 "to take over", self._slot, extra={"event": "standby"})
                    self.status = _STANDBY
                    await trio.sleep_until(started + RETRY_SPACING)
                    continue
                attempts += 1
                if down is None:
                    down = (started, time.time())
                outage = trio.current_time() - down[0]
                self.status = f"database unreachable: {message}"
                self._log_failure(message, attempts, outage)
                if started - down[0] + RETRY_SPACING > self._window:
                    raise SourceGaveUp(f"no replication connection for {outage:.0f} s "
                                       f"({attempts} attempts)") from None
                await trio.sleep_until(started + RETRY_SPACING)
                continue
            attempts = 0
            connection, made = begun.connection, begun.made
            if begun.fresh:
                self.delivered = self.confirmed = 0
                self._transactions.after = 0
            if begun.identity != self.identity:
                if self.identity is not None:
                    log.error("the log behind PGWS_DB_URI is another one now (another database, "
                              "or a promoted standby's timeline): positions of the old one are "
                              "unknown here")
                    self.gaps += 1
                self.identity = begun.identity
                if self._on_log is not None:
                    # What the slot confirmed is not read again: positions before it expired.
                    self._on_log(begun.identity, (begun.confirmed << LOG_INDEX_BITS) - 1
                                 if begun.confirmed else 0)
                if not self._started:
                    self._catch_up_to = begun.wal_at_start
            elif made and self._started:
                self.gaps += 1
                log.warning("replication slot %r was made again: what was committed while it "
                            "was missing is lost (gap %d)", self._slot, self.gaps,
                            extra={"event": "listener_gap", "gaps": self.gaps})
                if self._on_gap is not None:
                    self._on_gap(down[1] if down is not None else time.time(), time.time())
            if self._on_listening is not None and \
                    ((made and self._started) or (not self._started and self._on_log is None)):
                # A gap; or, without log positions, the first start (the history's break).
                self._on_listening()
            if down is None and not self._started:
                log.info("listening on channel %r through the write-ahead log (slot %r)",
                         self._prefix, self._slot)
            elif down is not None:
                log.info("reading slot %r again after %.1f s, from where it was", self._slot,
                         trio.current_time() - down[0])
            self._started = True
            down = None
            self._came_up()
            self.ready.set()
            try:
                await self._pump(connection)
            except _Lost as lost:
                down = (trio.current_time(), time.time())
                self._went_down(down[0], f"WAL reader reconnecting: {lost}")
                self.ready = trio.Event()
                log.error("replication connection lost (%s); reconnecting from the slot, "
                          "clients stay connected", lost)
            finally:
                self._transactions.reset()
                connection.close()

    # -- start-up (in a worker thread) ---------------------------------------------------------

    def _connect_and_start(self) -> _Started:
        """Check the database, make what is missing, start streaming."""
        made, confirmed, database = self._prepare()
        connection = psycopg.connect(self._db_uri, autocommit=True, replication="database",
                                     **self._connect_options)
        try:
            pgconn = connection.pgconn
            system = _command(pgconn, "IDENTIFY_SYSTEM", pq.ExecStatus.TUPLES_OK)
            self.system_identifier = (system.get_value(0, 0) or b"").decode()
            self.timeline = int(system.get_value(0, 1) or b"0")
            self.database = database
            identity = log_identity(f"{self.system_identifier}/{self.timeline}".encode(),
                                    database, self._prefix)
            wal_at_start = replication.parse_lsn((system.get_value(0, 2) or b"0/0").decode())
            if made:
                created = _command(pgconn, f'CREATE_REPLICATION_SLOT "{self._slot}" LOGICAL '
                                           "pgoutput NOEXPORT_SNAPSHOT", pq.ExecStatus.TUPLES_OK)
                confirmed = replication.parse_lsn((created.get_value(0, 1) or b"0/0").decode())
                log.info("created replication slot %r (kept: drop it with "
                         "`pgws-relay drop-slot` when this relay is retired)", self._slot,
                         extra={"event": "slot_created"})
            # A new slot, or another log (a promoted standby's timeline): its LSNs owe nothing
            # to where this process was, which may be ahead of them.
            fresh = made or identity != self.identity
            start = replication.format_lsn(confirmed if fresh else
                                           max(self.delivered, confirmed))
            _command(pgconn, f'START_REPLICATION SLOT "{self._slot}" LOGICAL {start} '
                             f"(proto_version '1', publication_names '\"{self._publication}\"', "
                             "messages 'true')", pq.ExecStatus.COPY_BOTH)
            pgconn.nonblocking = 1
        except BaseException:
            connection.close()
            raise
        return _Started(connection, made, identity, confirmed, wal_at_start, fresh)

    def _prepare(self) -> tuple[bool, int, str]:
        """Check ``wal_level`` and the slot, make the publication: whether the slot must be
        made, where it starts (its confirmed LSN), the database's name. Raises
        :class:`SourceMisconfigured` for what no retry cures."""
        with psycopg.connect(self._db_uri, autocommit=True, **self._connect_options) as conn:
            level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
            if level != "logical":
                raise SourceMisconfigured(
                    f"PGWS_SOURCE=wal needs wal_level = logical (the database has {level}): "
                    "set it in postgresql.conf and restart PostgreSQL")
            found = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                                 (self._publication,)).fetchone()
            if found is None:
                try:
                    conn.execute(sql.SQL("CREATE PUBLICATION {}").format(
                        sql.Identifier(self._publication)))
                except psycopg.errors.DuplicateObject:
                    pass  # Another relay made it meanwhile.
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise SourceMisconfigured(
                        f"PGWS_WAL_PUBLICATION: cannot create publication "
                        f"{self._publication!r} ({first_line(exc)}); create it once with "
                        f"CREATE PUBLICATION {self._publication}, or grant CREATE on the "
                        "database") from None
                log.info("created publication %r (it publishes no table: the relay reads "
                         "only messages)", self._publication)
            here = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            row = conn.execute(
                "SELECT slot_type, plugin, database, wal_status, confirmed_flush_lsn::text "
                "FROM pg_replication_slots WHERE slot_name = %s", (self._slot,)).fetchone()
            if row is None:
                return True, 0, here
            kind, plugin, database, status, confirmed = row
            if kind != "logical" or plugin != "pgoutput" or database != here:
                raise SourceMisconfigured(
                    f"PGWS_WAL_SLOT: slot {self._slot!r} exists as a {kind} slot of "
                    f"{plugin or 'no plugin'} on database {database!r}; the relay needs a "
                    f"logical pgoutput slot on {here!r}: choose another name")
            if status == "lost":
                log.error("replication slot %r was invalidated by PostgreSQL (the WAL it needed "
                          "is gone, see max_slot_wal_keep_size); dropping and making it again: "
                          "a gap", self._slot)
                conn.execute("SELECT pg_drop_replication_slot(%s)", (self._slot,))
                return True, 0, here
            return False, replication.parse_lsn(confirmed or "0/0"), here

    # -- reading -------------------------------------------------------------------------------

    async def _pump(self, connection: psycopg.Connection[Any]) -> None:
        """Read until the connection is lost; then raise :class:`_Lost`."""
        pgconn = connection.pgconn
        fd = pgconn.socket
        try:
            await self._read(pgconn, fd)
        finally:
            trio.lowlevel.notify_closing(fd)

    async def _read(self, pgconn: pq.abc.PGconn, fd: int) -> None:
        transactions = self._transactions
        now = trio.current_time()
        status_due = now + _STATUS_INTERVAL
        # The first status asks for an answer at once: its keepalive says where the server's
        # log ends, which tells whether the start is caught up without waiting for a message.
        heartbeat_due = now
        answer_due = inf  # When a heartbeat's answer is late.
        while True:
            if self._room is not None:
                await self._room()
            payloads: list[bytes] = []
            places: list[tuple[int, int]] = []
            everything = False  # The server asks for a status now: it may be stopping.
            heard = False
            # Why the stream ended during this pass: raised only once what the pass read is in
            # the hub, since ``delivered`` already counts it and the next connection starts
            # after it (dropping it here lost whole transactions, silently).
            ended: str | None = None
            while True:
                try:
                    size, data = pgconn.get_copy_data(1)
                except psycopg.Error as exc:
                    ended = first_line(exc)
                    break
                if size == 0:
                    break
                if size == -1:
                    ended = _ended(pgconn)
                    break
                heard = True
                try:
                    message = replication.read_copy_data(bytes(data))
                    if isinstance(message, Keepalive):
                        self.wal_end = max(self.wal_end, message.wal_end)
                        everything = everything or message.reply
                        if not transactions.in_transaction:
                            # Whole transactions up to it were sent: none holds a message.
                            self.delivered = max(self.delivered, message.wal_end)
                        continue
                    self.wal_end = max(self.wal_end, message.wal_end)
                    oversized = transactions.oversized
                    committed = transactions.feed(message.data)
                except replication.ProtocolError as exc:
                    ended = f"unreadable replication stream: {exc}"
                    break
                if transactions.oversized != oversized:
                    self._lost_oversized(transactions.oversized - oversized, message.start)
                if committed is not None:
                    second = committed.time // 1_000_000
                    base = committed.lsn << LOG_INDEX_BITS
                    places += [(base | index, second) for index in committed.indices]
                    payloads += committed.messages
                    self.delivered = max(self.delivered, committed.end)
            now = trio.current_time()
            if heard:
                answer_due = inf
            if payloads:
                self.received += len(payloads)
                self.last_message_at = time.time()
                self._publish(payloads, time.monotonic(), places=places)
            if ended is not None:
                raise _Lost(ended)
            if self._catch_up_to is not None and self.delivered >= self._catch_up_to:
                self._catch_up_to = None
                log.info("caught up with the log at %s", replication.format_lsn(self.delivered))
                if self._on_caught_up is not None:
                    self._on_caught_up()
            ask = now >= heartbeat_due
            if ask:
                heartbeat_due = now + self._heartbeat_interval if self._heartbeat_interval > 0 \
                    else inf
                if answer_due == inf:
                    answer_due = now + self._heartbeat_timeout
            if everything or ask or now >= status_due:
                await self._status(pgconn, fd, ask, everything)
                status_due = now + _STATUS_INTERVAL
            if now >= answer_due:
                raise _Lost(f"no answer from the walsender within {self._heartbeat_timeout:g} s")
            with trio.move_on_at(min(heartbeat_due, answer_due, status_due)):
                await trio.lowlevel.wait_readable(fd)
            try:
                pgconn.consume_input()
            except psycopg.Error as exc:
                raise _Lost(first_line(exc)) from None

    def confirmable(self, everything: bool = False) -> int:
        """What the slot may confirm now: what was delivered, but nothing the history still
        keeps (``holding``), so that a restarted relay reads it again; ``everything``: all that
        was delivered (the server asks, as it does before it stops)."""
        delivered = self.delivered
        if (everything and not self._holding_is_binding) or self._holding is None:
            return delivered
        oldest = self._holding()
        if oldest is None:
            return delivered
        return min(delivered, oldest >> LOG_INDEX_BITS)

    async def _status(self, pgconn: pq.abc.PGconn, fd: int, ask: bool,
                      everything: bool) -> None:
        """Confirm what may be confirmed; ``ask``: the walsender must answer at once."""
        confirming = max(self.confirmed, self.confirmable(everything))
        message = replication.standby_status(confirming, time.time_ns() // 1000, ask)
        try:
            if pgconn.put_copy_data(message) != 1:
                raise _Lost("cannot send a status update")
            while pgconn.flush() == 1:
                with trio.move_on_after(self._heartbeat_timeout) as waited:
                    await trio.lowlevel.wait_writable(fd)
                if waited.cancelled_caught:
                    raise _Lost("the walsender takes no status update")
        except psycopg.Error as exc:
            raise _Lost(first_line(exc)) from None
        self.confirmed = confirming

    def _lost_oversized(self, count: int, lsn: int) -> None:
        self.oversized += count
        log.warning("%d message(s) at %s over PGWS_MAX_PAYLOAD_BYTES (%d) not delivered; "
                    "positioned clients are told lost", count, replication.format_lsn(lsn),
                    self._transactions.max_bytes,
                    extra={"event": "payload_over_limit", "oversized": self.oversized})
        if self._on_loss is not None:
            self._on_loss()


class SlotNotDropped(Exception):
    """The slot could not be dropped; the message says why in one line."""


def drop_slot(db_uri: str, slot: str, connect_options: dict[str, Any]) -> None:
    """Drop a retired relay's slot, so that it no longer holds WAL. Raises
    :class:`SlotNotDropped` when there is none of that name, when a relay still reads it, or
    when the database refuses; psycopg.Error when it cannot be reached."""
    with psycopg.connect(db_uri, autocommit=True, **connect_options) as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
        if row is None:
            raise SlotNotDropped(f"there is no replication slot {slot!r}: nothing to drop")
        if row[0] is not None:
            raise SlotNotDropped(f"replication slot {slot!r} is being read (process {row[0]}): "
                                 "stop the relay that reads it first")
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        except psycopg.Error as exc:
            raise SlotNotDropped(f"cannot drop replication slot {slot!r}: "
                                 f"{first_line(exc)}") from None


def log_identity(system_identifier: bytes, database: str, prefix: str) -> int:
    """The 32 bits that name one log of messages: the cluster (its system identifier, kept by
    its physical standbys), the database (slots are per database) and the prefix. Every relay
    reading it computes the same; a position of another log names nothing in this one."""
    name = b"\0".join((system_identifier, database.encode(), prefix.encode()))
    return int.from_bytes(hashlib.blake2b(name, digest_size=4, person=b"pgws-log").digest(),
                          "big")


class _Started:
    """A replication connection that streams, and what its start said."""

    __slots__ = ("confirmed", "connection", "fresh", "identity", "made", "wal_at_start")

    def __init__(self, connection: psycopg.Connection[Any], made: bool, identity: int,
                 confirmed: int, wal_at_start: int, fresh: bool) -> None:
        self.connection = connection
        #: The slot was made now (a gap, unless this is the first start).
        self.made = made
        self.identity = identity
        #: Where the slot starts: what it confirmed (a new slot: its consistent point).
        self.confirmed = confirmed
        #: The server's end of WAL when streaming began: reading up to it is catching up.
        self.wal_at_start = wal_at_start
        #: Read from the slot's start, not from where this process was.
        self.fresh = fresh


def _command(pgconn: pq.abc.PGconn, command: str, expected: pq.ExecStatus) -> pq.abc.PGresult:
    """Run a replication command (simple query protocol); psycopg.Error when it fails."""
    result = pgconn.exec_(command.encode())
    if result.status != expected:
        message = (result.error_message or pgconn.error_message).decode("utf-8", "replace")
        raise psycopg.OperationalError(message.strip() or f"{command.split()[0]} failed")
    return result


def _ended(pgconn: pq.abc.PGconn) -> str:
    """Why the server ended the COPY stream (a terminated walsender, a shutdown)."""
    result = pgconn.get_result()
    if result is not None and result.error_message:
        return result.error_message.decode("utf-8", "replace").strip().splitlines()[0]
    return "the server ended the replication stream"
