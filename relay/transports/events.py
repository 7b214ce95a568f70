"""One Server-Sent Events connection's life after its response head: outbox, keep-alive, end.

Theory of operation
-------------------
An event stream is a response that never ends: the relay writes events, the client only reads
(a browser's ``EventSource``, or ``fetch`` reading the body). :class:`EventStreamClient` keeps
the WebSocket connection's outbox as it is (:class:`relay.transports.websocket.Client`: the
synchronous ``offer``, its fast path and writer task, the queue bound and send timeout that
close a slow consumer, replays outside the bound), so the hub serves both alike; what differs is
the rest of its life:

- Reading: the client sends nothing after its request. Its socket is watched for the end of the
  connection (a closed tab, a reconnecting ``EventSource``); anything it sends anyway is read
  and dropped within the inbound byte budget (beyond it: closed).
- Keep-alive: a comment line when the stream was quiet for :data:`KEEP_ALIVE` seconds, so that
  proxies keep an idle stream open (the hub's pings, every ``PGWS_PING_INTERVAL``, are comments
  too).
- Ending (:meth:`close`): there is no close frame. What is queued is written, then the
  connection is closed (FIN), within ``close_timeout``; the token's ``exp`` ends it the same
  way. A slow consumer's queue is dropped first, as for WebSocket. A client that reconnects
  resumes from its ``Last-Event-ID``.
"""

from __future__ import annotations

import os
from math import inf

import trio

from relay.auth.tokens import Grant
from relay.core.limits import InboundBudget
from relay.core.stats import counters
from relay.transports.websocket import Client, ClientSettings

#: Seconds of silence after which a comment line is sent (proxies commonly drop a connection
#: idle for 30 or 60 s; the spec's own example uses 15).
KEEP_ALIVE = 15.0

#: Bytes asked of the socket per read: a client has nothing to say, so this is only to notice
#: its end (or drop what it sends).
_RECEIVE_BYTES = 4096


_KEEP_ALIVE_LINE = b": keep-alive\n\n"


async def _nothing(client: Client, text: str) -> None:
    """An event stream carries no client messages."""


class EventStreamClient(Client):
    """A client of the event-stream transport (see the module's opening)."""

    __slots__ = ("_done", "_ended")

    def __init__(self, stream: trio.abc.Stream, grant: Grant, settings: ClientSettings,
                 peer: str) -> None:
        super().__init__(stream, grant, settings, _nothing, peer)
        self._done = trio.Event()
        #: The stream ended as it should (everything written), not aborted.
        self._ended = False

    def close(self, code: int, reason: str) -> None:
        """End the stream after what is queued (``code``, ``reason``: for the log only)."""
        if self._closing:
            return
        self._closing = True
        self._set_deadline(trio.current_time() + self._settings.close_timeout)
        if not self._backlog and not self._writing:
            self._done.set()

    async def _writer(self) -> None:
        await super()._writer()
        if self._closing and not self._backlog:
            self._done.set()

    async def run(self) -> bool:
        """Serve the stream until it ends; always returns (False: it never parks) with the
        socket finished."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.cancel_scope.deadline = self._deadline
                self._start_writer()
                self.expire_at(self.grant.expires_at)
                nursery.start_soon(self._watch)
                while not self._done.is_set():
                    with trio.move_on_at(min(self._expiry, trio.current_time() + KEEP_ALIVE)):
                        await self._done.wait()
                    if self._expiry <= trio.current_time():
                        self._expiry = inf
                        self.close(0, "JWT expired")
                    elif not self._done.is_set() and not self._queued:
                        self.offer(_KEEP_ALIVE_LINE)
                self._ended = True
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            await self._finish(not self._ended)
        return False

    async def _watch(self) -> None:
        """Until the client's end: read and drop, within the inbound byte budget."""
        budget = InboundBudget(0, self._settings.max_client_bytes_per_second,
                               self._settings.max_message_size, trio.current_time())
        while True:
            if self._fd >= 0:
                await trio.lowlevel.wait_readable(self._fd)
                try:
                    data = os.read(self._fd, _RECEIVE_BYTES)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
            else:
                try:
                    data = await self._stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            if not data:
                self._abort()  # Gone: nothing to finish.
                return
            if not budget.take_bytes(trio.current_time(), len(data)):
                counters.inbound_limited += 1
                self._abort()
                return
