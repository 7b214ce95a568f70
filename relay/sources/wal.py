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

import logging
import time
from collections.abc import Callable, Sequence
from math import inf
from typing import Any

import psycopg
import trio
from psycopg import pq, sql

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
        publish: Callable[[Sequence[bytes], float], None],
        heartbeat_interval: float,
        retries: int,
        on_gap: Callable[[float, float], None] | None = None,
        on_listening: Callable[[], None] | None = None,
        on_loss: Callable[[], None] | None = None,
    ) -> None:
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
        self._transactions = Transactions(prefix, max_payload_bytes)
        #: Whether a slot was read from yet (a slot made after that is a gap).
        self._started = False
        #: The position the slot may confirm (everything before it was delivered or holds
        #: nothing of ours), and the one it was last told.
        self.confirmable = 0
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

    async def run(self) -> None:
        """Read the log until cancelled; raise :class:`SourceGaveUp` when an outage lasts too
        long, :class:`SourceMisconfigured` when the database cannot serve this source."""
        down: tuple[float, float] | None = None
        attempts = 0
        self._went_down(trio.current_time(), "not connected yet")
        while True:
            started = trio.current_time()
            try:
                connection, made = await trio.to_thread.run_sync(self._connect_and_start,
                                                                 abandon_on_cancel=True)
            except psycopg.Error as exc:
                attempts += 1
                if down is None:
                    down = (started, time.time())
                outage = trio.current_time() - down[0]
                message = first_line(exc)
                self.status = f"database unreachable: {message}"
                self._log_failure(message, attempts, outage)
                if started - down[0] + RETRY_SPACING > self._window:
                    raise SourceGaveUp(f"no replication connection for {outage:.0f} s "
                                       f"({attempts} attempts)") from None
                await trio.sleep_until(started + RETRY_SPACING)
                continue
            attempts = 0
            if made and self._started:
                self.gaps += 1
                log.warning("replication slot %r was made again: what was committed while it "
                            "was missing is lost (gap %d)", self._slot, self.gaps,
                            extra={"event": "listener_gap", "gaps": self.gaps})
                if self._on_gap is not None:
                    self._on_gap(down[1] if down is not None else time.time(), time.time())
            if (made or not self._started) and self._on_listening is not None:
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

    def _connect_and_start(self) -> tuple[psycopg.Connection[Any], bool]:
        """Check the database, make what is missing, start streaming: the replication
        connection, and whether the slot was made now."""
        made = self._prepare()
        connection = psycopg.connect(self._db_uri, autocommit=True, replication="database",
                                     **self._connect_options)
        try:
            pgconn = connection.pgconn
            if made:
                _command(pgconn, f'CREATE_REPLICATION_SLOT "{self._slot}" LOGICAL pgoutput '
                                 "NOEXPORT_SNAPSHOT", pq.ExecStatus.TUPLES_OK)
                log.info("created replication slot %r (kept: drop it with "
                         "`pgws-relay drop-slot` when this relay is retired)", self._slot,
                         extra={"event": "slot_created"})
            start = replication.format_lsn(self.confirmable)
            _command(pgconn, f'START_REPLICATION SLOT "{self._slot}" LOGICAL {start} '
                             f"(proto_version '1', publication_names '\"{self._publication}\"', "
                             "messages 'true')", pq.ExecStatus.COPY_BOTH)
            pgconn.nonblocking = 1
        except BaseException:
            connection.close()
            raise
        return connection, made

    def _prepare(self) -> bool:
        """Check ``wal_level`` and the slot, make the publication; whether the slot must be
        made. Raises :class:`SourceMisconfigured` for what no retry cures."""
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
            row = conn.execute(
                "SELECT slot_type, plugin, database, wal_status, current_database() "
                "FROM pg_replication_slots WHERE slot_name = %s", (self._slot,)).fetchone()
            if row is None:
                return True
            kind, plugin, database, status, here = row
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
                return True
            return False

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
        heartbeat_due = now + self._heartbeat_interval if self._heartbeat_interval > 0 else inf
        answer_due = inf  # When a heartbeat's answer is late.
        while True:
            payloads: list[bytes] = []
            reply = False
            heard = False
            while True:
                try:
                    size, data = pgconn.get_copy_data(1)
                except psycopg.Error as exc:
                    raise _Lost(first_line(exc)) from None
                if size == 0:
                    break
                if size == -1:
                    raise _Lost(_ended(pgconn))
                heard = True
                try:
                    message = replication.read_copy_data(bytes(data))
                    if isinstance(message, Keepalive):
                        self.wal_end = max(self.wal_end, message.wal_end)
                        reply = reply or message.reply
                        if not transactions.in_transaction:
                            self.confirmable = max(self.confirmable, message.wal_end)
                        continue
                    self.wal_end = max(self.wal_end, message.wal_end)
                    oversized = transactions.oversized
                    committed = transactions.feed(message.data)
                except replication.ProtocolError as exc:
                    raise _Lost(f"unreadable replication stream: {exc}") from None
                if transactions.oversized != oversized:
                    self._lost_oversized(transactions.oversized - oversized, message.start)
                if committed is not None:
                    payloads.extend(committed.messages)
                    self.confirmable = max(self.confirmable, committed.end)
            now = trio.current_time()
            if heard:
                answer_due = inf
            if payloads:
                self.received += len(payloads)
                self.last_message_at = time.time()
                self._publish(payloads, time.monotonic())
            ask = now >= heartbeat_due
            if ask:
                heartbeat_due = now + self._heartbeat_interval
                if answer_due == inf:
                    answer_due = now + self._heartbeat_timeout
            if reply or ask or (now >= status_due and self.confirmable != self.confirmed):
                await self._status(pgconn, fd, ask)
                status_due = now + _STATUS_INTERVAL
            if now >= answer_due:
                raise _Lost(f"no answer from the walsender within {self._heartbeat_timeout:g} s")
            deadline = min(heartbeat_due, answer_due,
                           status_due if self.confirmable != self.confirmed else inf)
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(fd)
            try:
                pgconn.consume_input()
            except psycopg.Error as exc:
                raise _Lost(first_line(exc)) from None

    async def _status(self, pgconn: pq.abc.PGconn, fd: int, ask: bool) -> None:
        """Confirm :attr:`confirmable`; ``ask``: the walsender must answer at once."""
        confirming = self.confirmable
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


def _command(pgconn: pq.abc.PGconn, command: str, expected: pq.ExecStatus) -> None:
    """Run a replication command (simple query protocol); psycopg.Error when it fails."""
    result = pgconn.exec_(command.encode())
    if result.status != expected:
        message = (result.error_message or pgconn.error_message).decode("utf-8", "replace")
        raise psycopg.OperationalError(message.strip() or f"{command.split()[0]} failed")


def _ended(pgconn: pq.abc.PGconn) -> str:
    """Why the server ended the COPY stream (a terminated walsender, a shutdown)."""
    result = pgconn.get_result()
    if result is not None and result.error_message:
        return result.error_message.decode("utf-8", "replace").strip().splitlines()[0]
    return "the server ended the replication stream"
