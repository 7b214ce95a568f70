"""The one LISTEN connection: drain notifications into the hub, prove liveness, recover.

Theory of operation
-------------------
One psycopg connection (autocommit) runs ``LISTEN`` on the listen channel and on a heartbeat
channel private to this process. Then it only waits: ``trio.lowlevel.wait_readable`` on libpq's
socket, ``consume_input()``, and every pending notification is drained with
``pgconn.notifies()`` and handed to the hub as one batch. No other statement ever runs on this
connection: a query would move pending notifications into a buffer this loop does not read.

Liveness: every ``heartbeat_interval`` seconds a heartbeat NOTIFY goes out through the notifier
pool; if it has not come back over this connection within the timeout, and nothing else came
either, the connection is declared lost, even if its socket looks fine (a half-open TCP
connection, a stopped server). Declaring a healthy connection lost loses what is committed
until LISTEN is back, so only this connection's silence counts, never the relay's own
lateness:

- The timeout runs from when the heartbeat's NOTIFY goes to the database (its worker thread
  says so), not from when it was due: a worker starved of CPU (the NOTIFY waits for a thread,
  the GIL, the pool) sends it late, which is not the connection's fault. A database that does
  not answer it, or a link that is cut, is still noticed one timeout after it was sent.
- Notifications arriving meanwhile prove it alive: a relay whose fan-out lags drains a
  backlog, with its heartbeat queued behind it, and must not drop the connection (and
  everything still queued on it) for being busy.
- A deadline noticed late (the loop woke more than :data:`_LATE_LOOP` of a timeout after it)
  proves nothing: the process was not running, the connection was not looked at; what it
  received meanwhile is read, and the deadline starts again. A connection that is really
  dead is then noticed one timeout later, as soon as the loop runs on time.

Recovery (:mod:`relay.sources.outage`, shared by the sources): a lost connection is closed and
a new one opened at once, retried every second within ``PGWS_RETRIES``'s window; past it the
listener gives up with :class:`SourceGaveUp`, and the process exits with status 1. Clients stay
connected throughout. Notifications committed while
no LISTEN was in place are lost (PostgreSQL keeps none for absent listeners); every such gap is
counted in :attr:`NotifySource.gaps`, logged with its length when LISTEN is back, and reported to
``on_gap`` (the meta channel's ``ListenerReconnected`` event). ``on_listening`` hears of every
time LISTEN is established, the first included: what was committed before is nobody's to
replay (the history takes a break there).

What the operator sees: :attr:`NotifySource.status` is None while LISTEN is in place, else one
line saying why not (the admin listener's ``/ready`` answer); :meth:`NotifySource.down_seconds`
adds up the time without LISTEN; failed attempts are logged as :mod:`relay.sources.outage` says.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from math import inf
from typing import Any

import psycopg
import trio
from psycopg import sql

from relay.sources.base import SourceGaveUp
from relay.sources.notifier import Notifier, NotifyFailed
from relay.sources.outage import RETRY_SPACING, Reconnecting, first_line

log = logging.getLogger(__name__)

#: A heartbeat must come back within its period, but never less than this many seconds, so a
#: busy database is not mistaken for a dead connection.
_HEARTBEAT_MIN_TIMEOUT = 1.0

#: A heartbeat's deadline noticed later than this share of the timeout after it passed means
#: the loop was not running (a starved worker), so the silence is not evidence.
_LATE_LOOP = 0.25

class _Lost(Exception):
    """The LISTEN connection stopped working; the message says how."""


class NotifySource(Reconnecting):
    """The :class:`relay.sources.base.Source` of LISTEN/NOTIFY: owns the LISTEN connection for
    the life of :meth:`run`. ``on_listening`` is called at every LISTEN (NOTIFY keeps nothing
    for a listener that was away, so each one after the first is a gap)."""

    def __init__(
        self,
        db_uri: str,
        connect_options: dict[str, Any],
        listen_channel: str,
        publish: Callable[[Sequence[bytes], float], None],
        notifier: Notifier,
        heartbeat_interval: float,
        retries: int,
        on_gap: Callable[[float, float], None] | None = None,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(retries)
        self._db_uri = db_uri
        self._connect_options = connect_options
        self._listen_channel = listen_channel
        self._publish = publish
        self._notifier = notifier
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = max(heartbeat_interval, _HEARTBEAT_MIN_TIMEOUT)
        self._on_gap = on_gap
        self._on_listening = on_listening
        # Private to this process, so other listeners and clients never see heartbeats.
        self._heartbeat_channel = f"pgws_heartbeat_{os.getpid()}_{secrets.token_hex(4)}"
        self._heartbeat_sent = 0
        self._heartbeat_seen = 0
        self._heartbeat_due: float | None = None
        #: Heartbeat deadlines noticed too late to count (:data:`_LATE_LOOP`): a starved process.
        self.late_deadlines = 0
        # The pump's current wait, so that a newly due heartbeat can shorten it.
        self._wait: trio.CancelScope | None = None
        #: Times LISTEN was re-established after a loss, or after a failed start (each one a
        #: window in which notifications were lost).
        self.gaps = 0
        #: Notifications received on the listen channel.
        self.received = 0
        self.ready = trio.Event()

    def gauges(self) -> dict[str, tuple[str, float]]:
        """LISTEN's numbers are the common ones (``pgws_listener_*``)."""
        return {}

    async def run(self) -> None:
        """Listen until cancelled; raise :class:`SourceGaveUp` when an outage lasts too long."""
        # When LISTEN stopped being in place (trio clock, wall clock); None while it is.
        down: tuple[float, float] | None = None
        attempts = 0
        self._went_down(trio.current_time(), "not connected yet")
        while True:
            started = trio.current_time()
            try:
                connection = await trio.to_thread.run_sync(self._connect_and_listen,
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
                    raise SourceGaveUp(f"no database connection for {outage:.0f} s "
                                         f"({attempts} attempts)") from None
                await trio.sleep_until(started + RETRY_SPACING)
                continue
            attempts = 0
            if down is None:
                log.info("listening on channel %r", self._listen_channel)
            else:
                self.gaps += 1
                log.warning("listening on channel %r again after %.1f s without LISTEN (gap %d); "
                            "notifications committed in between are lost",
                            self._listen_channel, trio.current_time() - down[0], self.gaps,
                            extra={"event": "listener_gap", "gaps": self.gaps,
                                   "gap_seconds": round(trio.current_time() - down[0], 3)})
                if self._on_gap is not None:
                    self._on_gap(down[1], time.time())
                down = None
            if self._on_listening is not None:
                self._on_listening()
            self._came_up()
            self.ready.set()
            try:
                await self._pump(connection)
            except _Lost as lost:
                down = (trio.current_time(), time.time())
                self._went_down(down[0], f"listener reconnecting: {lost}")
                self.ready = trio.Event()
                log.error("listener connection lost (%s); reconnecting, clients stay connected",
                          lost)
            finally:
                connection.close()

    def _connect_and_listen(self) -> psycopg.Connection[Any]:
        connection = psycopg.connect(self._db_uri, autocommit=True, **self._connect_options)
        try:
            # One statement for both: notifications arriving while a statement runs would be
            # read by psycopg into a buffer of its own, which the pump never looks at.
            connection.execute(sql.SQL("LISTEN {}; LISTEN {}").format(
                sql.Identifier(self._heartbeat_channel), sql.Identifier(self._listen_channel)))
        except BaseException:
            connection.close()
            raise
        return connection

    async def _pump(self, connection: psycopg.Connection[Any]) -> None:
        """Drain notifications until the connection is lost; then raise :class:`_Lost`."""
        fd = connection.pgconn.socket
        self._heartbeat_due = None
        async with trio.open_nursery() as nursery:
            if self._heartbeat_interval > 0:
                nursery.start_soon(self._send_heartbeats)
            try:
                reason = await self._drain(connection.pgconn, fd)
            finally:
                nursery.cancel_scope.cancel()
                trio.lowlevel.notify_closing(fd)
        raise _Lost(reason)

    async def _drain(self, pgconn: Any, fd: int) -> str:
        heartbeat = self._heartbeat_channel.encode()
        while True:
            due = self._heartbeat_due
            with trio.CancelScope(deadline=due if due is not None else inf) as wait:
                self._wait = wait
                await trio.lowlevel.wait_readable(fd)
            self._wait = None
            try:
                pgconn.consume_input()
            except psycopg.Error as exc:
                return first_line(exc)
            arrived = time.monotonic()
            payloads: list[bytes] = []
            while (notification := pgconn.notifies()) is not None:
                if notification.relname == heartbeat:
                    self._heartbeat_seen = max(self._heartbeat_seen, int(notification.extra))
                    if self._heartbeat_seen >= self._heartbeat_sent:
                        self._heartbeat_due = None
                else:
                    payloads.append(notification.extra)
            if payloads:
                self.received += len(payloads)
                self._publish(payloads, arrived)
                if self._heartbeat_due is not None:
                    # A backlog is draining: the connection is alive, and the heartbeat is
                    # queued behind what was committed before it. Only silence is a loss;
                    # dropping a busy connection would lose everything still queued on it.
                    self._heartbeat_due = trio.current_time() + self._heartbeat_timeout
            due = self._heartbeat_due
            now = trio.current_time()
            if due is not None and now >= due:
                if now - due <= _LATE_LOOP * self._heartbeat_timeout:
                    return f"heartbeat not back within {self._heartbeat_timeout:g} s"
                # Noticed late: this process was not running, so nobody looked. What came
                # meanwhile was read above; the connection gets a timeout of our attention.
                self.late_deadlines += 1
                log.debug("the listener's heartbeat deadline was noticed %.2f s late: the "
                          "process was starved, not the connection", now - due)
                self._arm(now + self._heartbeat_timeout)

    def _arm(self, due: float) -> None:
        """The heartbeat must be back by ``due`` (trio time)."""
        self._heartbeat_due = due
        if self._wait is not None:
            self._wait.deadline = min(self._wait.deadline, due)

    async def _send_heartbeats(self) -> None:
        token = trio.lowlevel.current_trio_token()
        while True:
            await trio.sleep(self._heartbeat_interval)
            self._heartbeat_sent += 1
            sent = self._heartbeat_sent

            def on_sent(sent: int = sent, token: Any = token) -> None:  # In the worker thread.
                token.run_sync_soon(self._sent, sent, time.monotonic())

            try:
                await self._notifier.notify(self._heartbeat_channel, str(sent), on_sent)
            except NotifyFailed as exc:
                # The pump decides: if the heartbeat cannot come back, the deadline expires.
                log.warning("heartbeat NOTIFY failed: %s", exc)
            if self._heartbeat_due is None and self._heartbeat_seen < sent:
                self._arm(trio.current_time() + self._heartbeat_timeout)  # Never sent.

    def _sent(self, sent: int, at: float) -> None:
        """Heartbeat ``sent`` went to the database at ``at`` (``time.monotonic``): it must be
        back one timeout later, unless a deadline is running already."""
        if self._heartbeat_due is None and self._heartbeat_seen < sent:
            self._arm(trio.current_time() - (time.monotonic() - at) + self._heartbeat_timeout)
