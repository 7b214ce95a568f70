"""The hub: channel → subscribers, and one frame per notification for all of them.

Theory of operation
-------------------
The listener hands the hub every notification payload that one wake-up drained. The hub routes
each payload once (:func:`relay.envelope.route`), frames it once (:func:`relay.frames.text`),
groups the frames of the batch by channel and joins each group into one bytes object. Every
subscriber of that channel is then *offered* the same object: a client whose socket is idle
takes it in one non-blocking write, the others queue it (see :class:`relay.client.Client`).
So the work per notification is independent of the number of subscribers, and the work per
subscriber is one offer per channel per batch, not one per notification.

Rules this module keeps:

- It never awaits a client and never blocks: a slow client is the client's problem, decided
  by the client's own bound, and everyone else is served in the same pass.
- Order per channel is PostgreSQL's delivery order. A client on several channels may see a
  batch's channels one after another (upstream gives no order across channels either).
- It holds no socket; it knows clients only through :class:`Subscriber`.
- Its bookkeeping is per batch and per channel, never per subscriber: the counters and the
  delivery-time histogram cost the fan-out loop one branch per subscriber (did the offer
  queue?). A batch's delivery time runs from its arrival at the listener to its last write:
  at the end of the pass when every offer was written at once, otherwise when the last client
  that queued it has written (or dropped) it (:class:`Pending`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from relay import envelope, frames
from relay.stats import LatencyHistogram


class Subscriber(Protocol):
    """What the hub needs of a client."""

    def offer(self, frame: bytes) -> bool:
        """Take bytes to send, without blocking; a full client closes itself.

        True when (part of) the frame was queued: it will be written later, and the client
        then calls :meth:`Pending.done` on what :meth:`track` gave it.
        """

    def track(self, pending: Pending) -> None:
        """Call ``pending.done()`` once what was queued so far is written or dropped."""

    def close(self, code: int, reason: str) -> None:
        """Begin the close handshake, after what is already queued."""


class Pending:
    """A batch some subscribers queued: its delivery time is known when the last one wrote."""

    __slots__ = ("_arrived", "_events", "_histogram", "waiting")

    def __init__(self, arrived: float, histogram: LatencyHistogram) -> None:
        self._arrived = arrived
        self._histogram = histogram
        self._events = 0
        #: Subscribers that have not written their queued copy yet.
        self.waiting = 0

    def arm(self, events: int) -> None:
        """The fan-out pass is over: ``events`` notifications wait for :attr:`waiting` writes."""
        self._events = events
        if not self.waiting:
            self._observe()

    def done(self) -> None:
        self.waiting -= 1
        if not self.waiting and self._events:
            self._observe()

    def _observe(self) -> None:
        self._histogram.observe(time.monotonic() - self._arrived, self._events)
        self._events = 0


class Hub:
    """Routes notification payloads to the subscribers of their channel."""

    def __init__(self, listen_channel: str) -> None:
        self._listen_channel = listen_channel
        self._channels: dict[str, set[Subscriber]] = {}
        self._clients: set[Subscriber] = set()
        self._ping_counter = 0
        #: Notifications routed to at least one subscriber; frames and bytes offered in all.
        self.routed = 0
        self.offered = 0
        self.offered_bytes = 0
        #: Seconds from a notification's arrival at the listener to its last write.
        self.delivery_times = LatencyHistogram()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def add(self, client: Subscriber, channels: Iterable[str]) -> None:
        """Register a connection; it receives the channels given (none for write-only)."""
        self._clients.add(client)
        for channel in channels:
            self._channels.setdefault(channel, set()).add(client)

    def remove(self, client: Subscriber, channels: Iterable[str]) -> None:
        self._clients.discard(client)
        for channel in channels:
            subscribers = self._channels.get(channel)
            if subscribers is None:
                continue
            subscribers.discard(client)
            if not subscribers:
                del self._channels[channel]

    def publish(self, payloads: Sequence[bytes], arrived: float | None = None) -> None:
        """Deliver the payloads of one listener wake-up, in order, to their subscribers.

        ``arrived``: when the listener read them (``time.monotonic()``; default: now).
        """
        if arrived is None:
            arrived = time.monotonic()
        groups: dict[str, list[bytes]] = {}
        channels = self._channels
        for payload in payloads:
            channel = envelope.route(payload, self._listen_channel)
            if channel in channels:
                groups.setdefault(channel, []).append(frames.text(payload))
        pending: Pending | None = None
        routed = 0
        for channel, framed in groups.items():
            blob = framed[0] if len(framed) == 1 else b"".join(framed)
            subscribers = channels[channel]
            routed += len(framed)
            self.offered += len(framed) * len(subscribers)
            self.offered_bytes += len(blob) * len(subscribers)
            for client in subscribers:
                if client.offer(blob):
                    if pending is None:
                        pending = Pending(arrived, self.delivery_times)
                    pending.waiting += 1
                    client.track(pending)
        if not routed:
            return
        self.routed += routed
        if pending is None:
            self.delivery_times.observe(time.monotonic() - arrived, routed)
        else:
            pending.arm(routed)

    def ping_all(self) -> None:
        """Offer every client the next server ping (payload ``1``, ``2``, … as upstream)."""
        self._ping_counter += 1
        frame = frames.ping(str(self._ping_counter).encode())
        for client in self._clients:
            client.offer(frame)

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self._clients):
            client.close(code, reason)
