"""Idle connections without a task each: one epoll per worker waits on all of them.

Theory of operation
-------------------
Most of a relay's connections are idle most of the time: they receive what the hub writes to
their sockets without blocking (the hub's fast path needs no task), and they send nothing. A
Trio task per such connection, waiting in ``wait_readable``, costs its task object, cancel scopes
and coroutine frames: about half of what an idle connection cost the relay (docs/operations.md,
"Memory per connection"). So a WebSocket connection on a plain socket whose reader finds nothing
to read, nothing queued to write and nothing pending (no partial message, no close, no deadline
but its token's ``exp``) *rests* here instead: its reader returns, its task ends, and its socket
is registered with this worker's own epoll (:class:`IdleConnections`). One task, :meth:`run`,
waits for that epoll's descriptor to be readable through Trio, and for the earliest ``exp`` of
the resting connections.

A resting connection is woken (:meth:`IdleConnections.wake`) when its socket is readable (bytes,
or the peer's end) and it cannot :meth:`~Resting.settle` them without a task, when its ``exp``
comes, or when the hub gives it work that needs a task (bytes the socket did not take, a close):
it leaves the epoll and a task is started for it, in this class's nursery, which serves it as
the connection's own task did, until it rests again or ends. Settling is for pongs: every client
answers every server ping, and a task per pong cost 64.5 µs of the worker per ping and 3.4 KiB
more per connection (the tasks of a pong wave at once; bench/scenarios/million.py at 20,000
connections, pings every 5 s), where reading the pong where it rests costs a few µs.
Structured concurrency holds: every task has a nursery that owns it (this one), and a resting
connection's socket is owned by this object, which closes every resting socket when it stops.

Rules it keeps: resting and waking are synchronous (no await between deciding and doing); a
connection is in the epoll or has a task, never both and never neither; an event is never lost,
because the epoll is level-triggered and a woken connection reads before it waits again.
"""

from __future__ import annotations

import heapq
import logging
import select
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any, Protocol

import trio

from relay.core.stats import counters

log = logging.getLogger(__name__)

#: Events taken from the epoll per wake-up: enough for a burst of readable connections, and a
#: bound on what one pass starts before it yields.
_EVENTS_PER_PASS = 1024

#: Stale entries the timer heap may hold beyond twice the live ones before it is rebuilt.
_STALE_TIMERS = 1024

#: What a resting socket waits for: bytes, or its peer's end (hang-up, error: always reported).
_READABLE = select.EPOLLIN | select.EPOLLRDHUP


class Resting(Protocol):
    """What :class:`IdleConnections` needs of a connection."""

    def fileno(self) -> int:
        """The socket's descriptor."""

    def expiry(self) -> float:
        """When the connection must be woken regardless (Trio time; inf: never)."""

    def settle(self) -> bool:
        """Its socket is readable: take what came without a task if that is all it needs.

        Returns True when it may go on resting (called again at its next readability), False
        when it needs a task (it is then woken). Raises nothing.
        """


class IdleConnections:
    """This worker's resting connections (see the module's opening)."""

    def __init__(self, serve: Callable[[Any], Awaitable[None]],
                 abandon: Callable[[Any], None]) -> None:
        """``serve(connection)``: the task that takes over a woken connection;
        ``abandon(connection)``: close a resting one at once and end it, synchronously (the
        relay stops)."""
        self._serve = serve
        self._abandon = abandon
        self._epoll: select.epoll | None = None
        self._resting: dict[int, Resting] = {}
        #: When each connection with an ``exp`` must be woken, by descriptor (what counts), and
        #: the same as a heap of (expiry, descriptor) to find the next one. A connection that
        #: rests again (after every pong) keeps its entry; entries of connections that ended
        #: (:meth:`forget`: a descriptor is soon another connection's) are skipped when they
        #: come up, and the heap is rebuilt when they outnumber the rest, so it stays in
        #: proportion.
        self._timed: dict[int, tuple[Resting, float]] = {}
        self._timers: list[tuple[float, int]] = []
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        #: The run loop's wait, while it waits: an earlier ``exp`` moves its deadline.
        self._waiting: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._resting)

    @property
    def open(self) -> bool:
        """True while connections may rest here."""
        return self._nursery is not None and not self._stopping

    def rest(self, connection: Resting) -> None:
        """``connection`` has nothing to do: wait for it here, without a task."""
        assert self._epoll is not None and self._nursery is not None
        fd = connection.fileno()
        self._epoll.register(fd, _READABLE)
        self._resting[fd] = connection
        counters.resting += 1
        expiry = connection.expiry()
        if expiry < inf and self._timed.get(fd) != (connection, expiry):
            self._timed[fd] = (connection, expiry)
            if len(self._timers) > 2 * len(self._timed) + _STALE_TIMERS:
                self._timers = [(when, fd) for fd, (_, when) in self._timed.items()]
                heapq.heapify(self._timers)
            else:
                heapq.heappush(self._timers, (expiry, fd))
            if self._waiting is not None:
                self._waiting.deadline = min(self._waiting.deadline, expiry)

    def forget(self, connection: Resting) -> None:
        """``connection`` ended: its descriptor may be another connection's next."""
        fd = connection.fileno()
        timed = self._timed.get(fd)
        if timed is not None and timed[0] is connection:
            del self._timed[fd]

    def resting(self, connection: Resting) -> bool:
        return self._resting.get(connection.fileno()) is connection

    def wake(self, connection: Resting) -> None:
        """Give ``connection`` a task again (it has something to do); nothing if it is not
        resting."""
        fd = connection.fileno()
        if self._resting.get(fd) is not connection:
            return
        del self._resting[fd]
        counters.resting -= 1
        counters.woken += 1
        assert self._epoll is not None and self._nursery is not None
        self._epoll.unregister(fd)
        self._nursery.start_soon(self._serve, connection)
        if self._stopping and not self._resting and self._waiting is not None:
            self._waiting.cancel()

    def stop(self) -> None:
        """Take no more connections; :meth:`run` returns once none rests and every woken
        one has ended."""
        self._stopping = True
        if self._waiting is not None and not self._resting:
            self._waiting.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Wait on the resting connections until :meth:`stop` (or cancellation)."""
        self._epoll = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while not (self._stopping and not self._resting):
                    deadline = self._timers[0][0] if self._timers else inf
                    with trio.CancelScope(deadline=deadline) as self._waiting:
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                    self._waiting = None
                    for fd, _ in self._epoll.poll(0, _EVENTS_PER_PASS):
                        connection = self._resting.get(fd)
                        if connection is not None and not connection.settle():
                            self.wake(connection)
                    now = trio.current_time()
                    while self._timers and self._timers[0][0] <= now:
                        expiry, fd = heapq.heappop(self._timers)
                        timed = self._timed.get(fd)
                        if timed is None or timed[1] != expiry:
                            continue  # Stale: ended, or another expiry now.
                        del self._timed[fd]
                        connection = timed[0]
                        if self.resting(connection) and connection.expiry() <= now:
                            self.wake(connection)
        finally:
            self._nursery = None
            for connection in list(self._resting.values()):
                try:
                    self._abandon(connection)
                except Exception:  # One connection's end must not keep the others open.
                    log.exception("closing an idle connection failed")
            counters.resting -= len(self._resting)
            self._resting.clear()
            self._timers.clear()
            self._timed.clear()
            self._epoll.close()
