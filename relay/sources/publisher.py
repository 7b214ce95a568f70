"""Clients → database: client messages and meta events become NOTIFYs on the listen channel.

Theory of operation
-------------------
A message from a ``w``/``rw`` client becomes one envelope per allowed channel
(:func:`relay.core.envelope.build`), each sent with ``pg_notify(listen_channel, envelope)``. The
listener then receives them like any notification, which is how readers (the sender too, with
``rw``) get the echo. Unlike upstream, nothing fails silently: an envelope at or over
PostgreSQL's payload limit refuses the message with 1009 before anything is sent, and a failed
NOTIFY is logged and closes the client with 1011, so it knows to retry. With
``PGWS_MAX_WRITES_PER_SECOND`` set, a message beyond the client's allowance is not published
and the client is closed with 1008 ``write rate exceeded``.

Meta events (``ConnectionOpen``, ``ConnectionClose``) go the same way when a meta channel is
configured; their failures are logged and otherwise ignored (the client did nothing wrong).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from relay.auth.tokens import Grant
from relay.config import PG_NOTIFY_MAX_BYTES
from relay.core import envelope
from relay.core.limits import WriteBucket
from relay.core.stats import counters
from relay.sources.notifier import Notifier, NotifyFailed
from relay.wire.closecodes import (
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    POLICY_VIOLATION,
    MessageRefused,
)

log = logging.getLogger(__name__)


class Writer(Protocol):
    """What the publisher needs of a writing connection, whatever its transport."""

    grant: Grant
    #: Its publishing allowance (``PGWS_MAX_WRITES_PER_SECOND``), or None: no limit.
    write_bucket: WriteBucket | None
    #: Where it connects from, for the log.
    peer: str


class Publisher:
    """Client writes and meta events → envelopes → the notifier.

    ``max_bytes``: the largest envelope sent (NOTIFY's: under 8,000 bytes; with the WAL
    source, ``PGWS_MAX_PAYLOAD_BYTES``, since the notifier also writes it to the log).
    """

    def __init__(self, notifier: Notifier, listen_channel: str, meta_channel: str | None,
                 max_bytes: int = PG_NOTIFY_MAX_BYTES - 1) -> None:
        self._notifier = notifier
        self._listen_channel = listen_channel
        self._meta_channel = meta_channel
        self._max_bytes = max_bytes
        self._too_big = "message too big for NOTIFY" if max_bytes < PG_NOTIFY_MAX_BYTES \
            else "message too big"

    async def message(self, client: Writer, text: str) -> None:
        """Publish a client's message to each of its channels (``on_message`` of a
        connection). Raises :class:`relay.wire.closecodes.MessageRefused`."""
        bucket = client.write_bucket
        if bucket is not None and not bucket.take(time.monotonic()):
            counters.rate_limited += 1
            raise MessageRefused(POLICY_VIOLATION, "write rate exceeded")
        grant = client.grant
        now = time.time()
        # Duplicates in a `channels` claim would send the same envelope twice; once is meant.
        channels = dict.fromkeys(grant.channels)
        bodies = [envelope.build(channel, grant.claims, envelope.WEBSOCKET_MESSAGE, text, now)
                  for channel in channels]
        if any(len(body) > self._max_bytes for body in bodies):
            raise MessageRefused(MESSAGE_TOO_BIG, self._too_big)
        for body in bodies:
            try:
                await self._notifier.notify(self._listen_channel, body.decode())
            except NotifyFailed as exc:
                log.error("client write from %s failed: %s", client.peer, exc)
                counters.writes_failed += 1
                raise MessageRefused(INTERNAL_ERROR, "write failed") from None
            counters.writes_published += 1

    @property
    def publishes_meta(self) -> bool:
        """A meta channel is set: connections opening and closing are published."""
        return self._meta_channel is not None

    async def meta(self, event: str, grant: Grant) -> None:
        """Publish a ``ConnectionOpen``/``ConnectionClose`` event, if a meta channel is set."""
        if self._meta_channel is None:
            return
        body = envelope.build(self._meta_channel, grant.claims, event,
                              ",".join(grant.channels), time.time())
        if len(body) > self._max_bytes:
            log.warning("%s event not published: envelope over the size limit", event)
            return
        try:
            await self._notifier.notify(self._listen_channel, body.decode())
        except NotifyFailed as exc:
            log.warning("%s event not published: %s", event, exc)
