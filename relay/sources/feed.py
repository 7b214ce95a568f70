"""The feeder (``pgws-relay feed``): the database's log, read once, into a JetStream stream.

Theory of operation
-------------------
The feeder reads the WAL source's messages from its slot (:class:`relay.sources.wal.WalSource`,
with no hub: each batch goes to :meth:`Feeder.take`) and publishes each to the stream
``PGWS_NATS_STREAM`` on the subject of its channel (:func:`relay.sources.nats.subject_for`),
with its place in the log as ``Nats-Msg-Id`` (:func:`relay.sources.nats.message_id`).
Relays with ``PGWS_SOURCE=nats`` read the stream; the database serves the feeder alone.

Nothing is lost and nothing is stored twice, whenever the feeder is killed:

- The slot is told to let a message go only once JetStream acknowledged it and everything
  before it (``holding`` returns the oldest message not acknowledged, and binds even when
  PostgreSQL asks at a shutdown: it then waits for NATS). A feeder started again reads the
  unacknowledged messages again.
- What it reads again may already be stored (acknowledged, but the slot was not told yet; or
  PostgreSQL sends confirmed transactions again after a fast restart). Each time the slot is
  taken, the feeder reads the stream's last message and skips everything at or before its
  place; JetStream's duplicate window (2 minutes) catches the rest, by message id.

Publishing: messages wait in a queue bounded by :data:`_QUEUE_MESSAGES` (the WAL reader waits
for room); they go out in batches of :data:`_BATCH`, all in flight at once
(``publish_async``), and a batch counts as stored when every acknowledgement came. A failed
batch (NATS away, no acknowledgement within 2 s) is sent again half a second later: same ids, so
no duplicate.

Two feeders on one slot: PostgreSQL lets one process read a slot at a time. The second stands by
(its log says so once) and takes over within about a second of the first one's connection
ending. nats-py runs on an asyncio loop of its own thread
(:mod:`relay.sources.bridge`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import time
from typing import Any

import trio

from relay.config import Config
from relay.core import envelope
from relay.core.history import LOG_INDEX_BITS
from relay.sources import nats as nats_source
from relay.sources.base import SourceGaveUp, SourceMisconfigured
from relay.sources.bridge import AsyncioThread, asyncio_thread
from relay.sources.nats import NatsSettings
from relay.sources.outage import first_line, retry_window
from relay.sources.wal import WalSource

log = logging.getLogger(__name__)

#: Messages, and their bytes, read from the log and not yet stored, at most: the WAL reader
#: waits beyond either, so a NATS outage costs bounded memory (and the slot keeps the rest).
_QUEUE_MESSAGES = 20_000
_QUEUE_BYTES = 64 << 20

#: Messages published together, their acknowledgements awaited together.
_BATCH = 500

#: Seconds between attempts to store a batch that failed.
_RETRY = 0.5

#: Seconds a batch's acknowledgements are awaited before it is sent again (same ids): a healthy
#: stream acknowledges 500 messages in milliseconds; waiting longer for a leader that is gone or
#: a link that is cut only delays the batch (10 s made every client of the fleet bench wait
#: 11 s after a NATS server was cut off).
_ACK_TIMEOUT = 2.0

#: Bytes a message's headers and subject may add to its payload on the wire: the server's
#: ``max_payload`` must hold the largest payload plus this.
_HEADROOM = 512

_INDEX_MASK = (1 << LOG_INDEX_BITS) - 1


class _Publisher:
    """The asyncio side: the NATS connection, the stream, publishing with acknowledgements."""

    def __init__(self, settings: NatsSettings) -> None:
        self._settings = settings
        self.connection: Any = None

    async def open(self) -> int:
        """Connect (again, if the connection was closed for good) and make the stream if it is
        missing; the server's ``max_payload``."""
        if self.connection is None or self.connection.is_closed:
            self.connection = await nats_source.connect(self._settings, "pgws-relay feed")
        await nats_source.ensure_stream(self.connection, self._settings)
        return int(self.connection.max_payload)

    async def last_id(self) -> str | None:
        """The ``Nats-Msg-Id`` of the stream's last message (None: empty)."""
        js = self.connection.jetstream()
        info = await js.stream_info(self._settings.stream)
        if not info.state.last_seq:
            return None
        message = await js.get_msg(self._settings.stream, info.state.last_seq)
        return (message.headers or {}).get("Nats-Msg-Id")

    async def store(self, batch: list[tuple[str, bytes, str]]) -> None:
        """Publish every (subject, payload, id) at once; return when all are acknowledged."""
        import asyncio

        from nats.js.errors import NoStreamResponseError

        if self.connection is None or self.connection.is_closed:
            await self.open()  # Closed for good (nats-py gives up on some errors): again.
        js = self.connection.jetstream()
        futures = [await js.publish_async(subject, payload, headers={"Nats-Msg-Id": ident})
                   for subject, payload, ident in batch]
        try:
            await asyncio.wait_for(asyncio.gather(*futures), timeout=_ACK_TIMEOUT)
        except NoStreamResponseError:
            # The stream is gone (its store was lost): made again, and the batch sent again.
            await nats_source.ensure_stream(self.connection, self._settings)
            raise

    async def close(self) -> None:
        if self.connection is not None:
            try:
                await self.connection.drain()
            except Exception:  # Closing a connection that is already gone.
                with contextlib.suppress(Exception):
                    await self.connection.close()


class Feeder:
    """``pgws-relay feed`` (see the module's opening)."""

    def __init__(self, config: Config, connect_options: dict[str, Any]) -> None:
        assert config.wal_slot is not None  # The command requires it.
        self._config = config
        self._settings = NatsSettings.of(config)
        self._window = retry_window(config.retries)
        self._prefix = config.listen_channel
        #: (key, Unix second, payload) read and not yet stored, in log order.
        self._queue: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self._queued = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._queued_bytes = 0
        #: Places at or before this were stored already (from the stream's last message).
        self._skip_upto = -1
        self.stored = 0
        self.skipped = 0
        self.wal = WalSource(
            config.db_uri, connect_options, config.listen_channel, config.wal_slot,
            config.wal_publication, config.max_payload_bytes, self.take,
            config.heartbeat_interval, config.retries, holding=self.holding,
            holding_is_binding=True, room=self._wait_room, standby=True)

    # -- the WAL side (Trio) -------------------------------------------------------------------

    def take(self, payloads: list[bytes], arrived: float,
             places: list[tuple[int, int]] | None = None) -> None:
        """A batch from the log, in order: queued for NATS."""
        assert places is not None
        self._queue.extend((key, second, payload)
                           for (key, second), payload in zip(places, payloads, strict=True))
        self._queued_bytes += sum(map(len, payloads))
        self._queued.set()
        if not self._has_room():
            self._room = trio.Event()

    def _has_room(self) -> bool:
        return len(self._queue) < _QUEUE_MESSAGES and self._queued_bytes < _QUEUE_BYTES

    def holding(self) -> int | None:
        """The oldest message not stored yet: the slot must keep it."""
        return self._queue[0][0] if self._queue else None

    async def _wait_room(self) -> None:
        await self._room.wait()

    # -- the NATS side ------------------------------------------------------------------------

    async def run(self) -> None:
        """Feed until cancelled. Raises :class:`relay.sources.base.SourceGaveUp` and
        :class:`relay.sources.base.SourceMisconfigured` as the WAL reader does, and the latter
        when NATS cannot carry ``PGWS_MAX_PAYLOAD_BYTES``."""
        failed: list[Exception] = []
        async with asyncio_thread("pgws-feed") as loop:
            publisher = _Publisher(self._settings)
            try:
                await self._open(loop, publisher)
                async with trio.open_nursery() as nursery:

                    async def read_log() -> None:
                        try:
                            await self.wal.run()
                        except (SourceGaveUp, SourceMisconfigured) as exc:
                            failed.append(exc)  # Raised below, not as an exception group.
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(read_log)
                    await self._forward(loop, publisher)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await loop.run(publisher.close)
        if failed:
            raise failed[0]

    async def _open(self, loop: AsyncioThread, publisher: _Publisher) -> None:
        started = trio.current_time()
        while True:
            try:
                max_payload = await loop.run(publisher.open)
                break
            except Exception as exc:  # nats-py's errors have no common base.
                log.error("cannot reach NATS: %s", first_line(exc))
                if trio.current_time() - started + _RETRY > self._window:
                    raise SourceGaveUp(f"no NATS connection for "
                                       f"{trio.current_time() - started:.0f} s") from None
                await trio.sleep(_RETRY)
        need = self._config.max_payload_bytes + _HEADROOM
        if max_payload < need:
            raise SourceMisconfigured(
                f"PGWS_MAX_PAYLOAD_BYTES: {self._config.max_payload_bytes} bytes and their "
                f"headers do not fit the NATS server's max_payload ({max_payload}): lower it to "
                f"{max_payload - _HEADROOM}, or raise max_payload in the server's configuration")
        log.info("feeding NATS stream %r from slot %r", self._settings.stream,
                 self._config.wal_slot)

    async def _forward(self, loop: AsyncioThread, publisher: _Publisher) -> None:
        ready: trio.Event | None = None
        refresh = False
        while True:
            if ready is not self.wal.ready:
                # The slot was (re)taken: what the stream already holds is not sent again.
                await self.wal.ready.wait()
                ready = self.wal.ready
                refresh = True
            if refresh:
                try:
                    await loop.run(publisher.open)
                    await self._read_last(loop, publisher)
                    refresh = False
                except Exception as exc:  # NATS away: nothing is sent until it is back.
                    log.warning("cannot read the stream's last message yet (%s); retrying",
                                first_line(exc))
                    await trio.sleep(_RETRY)
                    continue
            if not self._queue:
                self._queued = trio.Event()
                with trio.move_on_after(1.0):  # Also looks at the slot's state now and then.
                    await self._queued.wait()
                continue
            batch = [self._queue[index] for index in range(min(_BATCH, len(self._queue)))]
            fresh = [item for item in batch if item[0] > self._skip_upto]
            if fresh:
                try:
                    await loop.run(publisher.store, [self._message(item) for item in fresh])
                except Exception as exc:  # A timeout, NATS away: the same ids again later.
                    log.warning("storing %d message(s) in NATS failed (%s); retrying",
                                len(fresh), first_line(exc))
                    # Some may be stored: what the stream holds is read again before the retry
                    # (the duplicate window alone is 2 minutes).
                    refresh = True
                    await trio.sleep(_RETRY)
                    continue
            for _ in batch:
                self._queued_bytes -= len(self._queue.popleft()[2])
            self.stored += len(fresh)
            self.skipped += len(batch) - len(fresh)
            if self._has_room():
                self._room.set()

    async def _read_last(self, loop: AsyncioThread, publisher: _Publisher) -> None:
        last = await loop.run(publisher.last_id)
        found = nats_source.place_of_id(last) if last is not None else None
        # Another origin (another timeline, a new slot's LSNs): nothing of ours to skip.
        self._skip_upto = found[1] if found is not None and found[0] == self._origin() else -1
        if self._skip_upto >= 0:
            log.info("the stream holds the log up to %x/%d already", found[1] >> LOG_INDEX_BITS,
                     found[1] & _INDEX_MASK)

    def _origin(self) -> str:
        return self._id(0).rsplit(".", 2)[0]

    def _id(self, key: int) -> str:
        """A message's id: the log it comes from (system identifier and timeline, database,
        prefix) and its place."""
        wal = self.wal
        return nats_source.message_id(f"{wal.system_identifier}-{wal.timeline}", wal.database,
                                      self._prefix, key >> LOG_INDEX_BITS, key & _INDEX_MASK)

    def _message(self, item: tuple[int, int, bytes]) -> tuple[str, bytes, str]:
        key, _, payload = item
        channel = envelope.channel_of(envelope.parse(payload), self._prefix)
        return nats_source.subject_for(self._settings.stream, channel), payload, self._id(key)


async def run_feed(config: Config, connect_options: dict[str, Any]) -> int:
    """The ``feed`` command's body: 0 after SIGINT or SIGTERM, 1 when the WAL reader gave up,
    2 when the database or NATS cannot serve the configuration."""
    feeder = Feeder(config, connect_options)
    started = time.monotonic()
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                nonlocal status
                try:
                    await feeder.run()
                except SourceMisconfigured as exc:
                    log.critical("%s", exc)
                    status = 2
                except SourceGaveUp as exc:
                    log.critical("the WAL reader gave up: %s; exiting", exc)
                    status = 1
                nursery.cancel_scope.cancel()

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(feed)
            nursery.start_soon(stop_on_signal)
    if status:
        return status
    log.info("stopped after %.0f s: %d message(s) stored, %d skipped as stored already",
             time.monotonic() - started, feeder.stored, feeder.skipped)
    return 0
