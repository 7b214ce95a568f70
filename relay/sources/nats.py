"""The NATS source: notifications read from a JetStream stream that the feeder fills.

Theory of operation
-------------------
``pgws-relay feed`` (:mod:`relay.sources.feed`) reads the database's log once and publishes
every message to a JetStream stream (``PGWS_NATS_STREAM``), one subject per channel
(:func:`subject_for`). Relays with ``PGWS_SOURCE=nats`` read that stream instead of the
database: however many relays there are, the database serves one reader.

A relay reads the whole stream with an *ordered consumer* (nats-py recreates it from the next
sequence when a message is missed or the connection comes back), so it sees every message in
the stream's order; which client receives what is decided by the hub's own channel and filter
rules, never by subject filters on the server. A position is a place in the stream: its
sequence, with the stream's identity as epoch (its name and creation time: a stream deleted and
made again starts at 1 again and is another stream), the same on every relay. At start a relay
reads back the last ``history_seconds`` of the stream into its history, and clients wait until
it has caught up (as with the WAL source), so a restarted relay or a client that moves to another
relay resumes from anything that window holds.

nats-py speaks asyncio: it runs on a loop of its own thread (:mod:`relay.sources.bridge`) and
hands the Trio side batches of messages, which go to the hub in stream order. The Trio side
asks for the next batch only once the last one is in the hub, so a busy relay slows its own
consumer (the server buffers, with flow control), never the other relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import ssl
import time
from collections.abc import Callable
from math import inf
from typing import TYPE_CHECKING, Any

import trio

from relay.core.history import LOG_INDEX_BITS
from relay.sources.base import SourceGaveUp
from relay.sources.bridge import AsyncioThread, asyncio_thread
from relay.sources.outage import REPEAT_LOG_INTERVAL, RETRY_SPACING, Reconnecting, first_line

if TYPE_CHECKING:
    from relay.config import Config

log = logging.getLogger(__name__)

#: Messages handed to the hub at most per batch: enough to amortise the thread hop, small
#: enough that one batch is a few milliseconds of fan-out.
_BATCH = 1000

#: Seconds the Trio side waits for a first message before it looks at the connection again.
_IDLE_WAIT = 1.0

#: Seconds between NATS pings (see :func:`connect`): a server cut off is left after 3 of them.
_PING_INTERVAL = 1.0

#: Seconds without a message, while the stream holds more, after which a relay's consumer is
#: taken for lost and made again from the next sequence: a healthy one delivers in
#: milliseconds. nats-py finds a lost ordered consumer itself only after missed heartbeats and
#: API timeouts: 35 s when the server holding it was killed (bench/scenarios/nats_fleet.py).
_STALLED = 2.0

#: Steps of resumes older than the history read from the stream at once, and resumes in
#: progress (and as many again waiting to start), at most: each step holds up to half a
#: client's queue bound of messages while it is read.
_BACKFILLS_AT_ONCE = 2
_BACKFILLS_WAITING = 64

#: Messages read again for one step of a resume, at most (the hub's own bound).
_BACKFILL_MESSAGES = 20_000

#: Messages read again for one resume in all, at most (beyond: ``expired``): what one read
#: token can make a relay read, about 3 s of the reader's thread at the 14 µs a message of
#: bench/micro/nats_reader.py. At 300 messages a second it is 11 minutes of a stream.
_BACKFILL_TOTAL = 200_000

#: Bytes a message read again is counted for beyond its payload: its frame, position and line
#: feed (WebSocket: ``relay.config.DELIVERY_OVERHEAD``, 62) or its ``id:`` and ``data:`` lines
#: (an event stream: 64 and 6 a line more), so that a step of small messages fits the client's
#: queue bound too.
_DELIVERY_OVERHEAD = 80

#: Seconds a client may take to write one step before the resume is given up (``expired``):
#: the send timeout closes a client that stops reading sooner.
_STEP_WRITE_WAIT = 60.0

#: Seconds between two attempts to read a step of a resume.
_RETRY = 0.5

#: Seconds a step that cannot be read (NATS away, the stream electing a leader: 4-9 s in
#: nats-server 2.9) is tried again, every ``_RETRY`` seconds, before the client is closed with
#: 1013 to resume later (``Hub.backfill_unavailable``): never ``lost``, since the stream still
#: holds it. Below the relay's 10 s wait for a first step, after which the hub closes it so.
_BACKFILL_RETRY_WINDOW = 8.0

#: The longest subject token written as the channel's name (NATS's control line is 4 KiB, and
#: the subject shares it with the headers' length and the reply subject).
_TOKEN_MAX = 1000

_NO_STREAM = "the NATS stream does not exist (pgws-relay feed makes it)"

#: A subject token is these characters; anything else in a channel name is %XX-encoded.
_TOKEN_SAFE = re.compile(r"[A-Za-z0-9_-]")


@dataclasses.dataclass(frozen=True)
class NatsSettings:
    """How to reach NATS and which stream to use, from the ``PGWS_NATS_*`` settings."""

    servers: tuple[str, ...]
    stream: str
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls_ca: str | None = None
    #: 0: as many as the server can hold (1 on a single server, 3 in a cluster).
    replicas: int = 0
    max_age: float = 86400.0
    max_bytes: int = 1 << 30

    @classmethod
    def of(cls, config: Config) -> NatsSettings:
        """The NATS settings of a configuration."""
        return cls(config.nats_servers, config.nats_stream, config.nats_user,
                   config.nats_password, config.nats_token, config.nats_creds,
                   config.nats_tls_ca, config.nats_replicas, config.nats_max_age,
                   config.nats_max_bytes)


def subject_for(stream: str, channel: str) -> str:
    """The subject of a channel's messages: ``STREAM.TOKEN``. A channel name is a subject token
    as it is when made of letters, digits, ``_`` and ``-``; any other character (``.``, ``*``,
    ``>``, spaces, ``%``, anything non-ASCII) is written as ``%XX`` per byte of its UTF-8, and
    the empty name is ``%``, so every name has one token and the token gives the name back.
    A token longer than :data:`_TOKEN_MAX` is ``%%`` and a digest of the name instead (NATS
    refuses a long control line and closes the connection; relays route by the payload, not
    the subject, so only a reader of the subjects loses the name)."""
    if not channel:
        return f"{stream}.%"
    token = "".join(char if _TOKEN_SAFE.fullmatch(char) else
                    "".join(f"%{byte:02X}" for byte in char.encode()) for char in channel)
    if len(token) > _TOKEN_MAX:
        token = "%%" + hashlib.blake2b(channel.encode(), digest_size=16).hexdigest()
    return f"{stream}.{token}"


def channel_of_subject(stream: str, subject: str) -> str:
    """The channel name of a subject made by :func:`subject_for`."""
    token = subject[len(stream) + 1:]
    if token == "%":
        return ""
    if token.startswith("%%"):
        raise ValueError("a long channel name's subject holds its digest, not its name")
    out = bytearray()
    index = 0
    while index < len(token):
        if token[index] == "%":
            out.append(int(token[index + 1:index + 3], 16))
            index += 3
        else:
            out += token[index].encode()
            index += 1
    return out.decode()


def message_id(system_identifier: str, database: str, prefix: str, lsn: int, index: int) -> str:
    """A message's ``Nats-Msg-Id``: its place in its database's log, with the database's
    system identifier, name and the prefix, so two databases or listen channels never share
    one. JetStream drops a message whose id it saw within its duplicate window."""
    where = hashlib.blake2b(f"{database}\0{prefix}".encode(), digest_size=8).hexdigest()
    return f"{system_identifier}.{where}.{lsn:x}.{index:x}"


def place_of_id(value: str) -> tuple[str, int] | None:
    """``(system identifier and database-prefix digest, key)`` of a :func:`message_id`, or
    None when it is not one."""
    parts = value.split(".")
    if len(parts) != 4:
        return None
    try:
        return f"{parts[0]}.{parts[1]}", int(parts[2], 16) << LOG_INDEX_BITS | int(parts[3], 16)
    except ValueError:
        return None


def stream_identity(name: str, created: object) -> int:
    """The 32 bits that name one stream: its name and when it was created."""
    text = f"{name}\0{created}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4, person=b"pgws-nat").digest(),
                          "big")


async def connect(settings: NatsSettings, name: str,
                  on_state: Callable[[str | None], None] | None = None) -> Any:
    """A NATS connection (on the asyncio loop): reconnects for ever, and tells ``on_state``
    None when connected, else why not."""
    import nats  # nats-py: loaded only by the processes that use it.

    async def disconnected() -> None:
        if on_state is not None:
            on_state("NATS disconnected")

    async def reconnected() -> None:
        if on_state is not None:
            on_state(None)

    said = {"text": "", "at": 0.0}

    async def error(exc: Exception) -> None:
        # nats-py reports every failed reconnection attempt (one a second while a server is
        # away): the same text again is said every REPEAT_LOG_INTERVAL seconds at most.
        text, now = first_line(exc), time.monotonic()
        if text != said["text"] or now - said["at"] >= REPEAT_LOG_INTERVAL:
            log.warning("NATS: %s", text)
            said["text"], said["at"] = text, now

    options: dict[str, Any] = {
        "servers": list(settings.servers), "name": name, "allow_reconnect": True,
        "max_reconnect_attempts": -1, "reconnect_time_wait": 1.0, "connect_timeout": 5.0,
        # A server cut off (not closed) is noticed by pings: nats-py's defaults (every 120 s,
        # 2 unanswered) left the feeder and the relays on a dead link for minutes
        # (bench/scenarios/nats_fleet.py, nats-cut); here within ~3 pings (3 s), then it moves
        # to another server of the list.
        "ping_interval": _PING_INTERVAL, "max_outstanding_pings": 2,
        "disconnected_cb": disconnected, "reconnected_cb": reconnected, "error_cb": error,
    }
    if settings.user is not None:
        options["user"], options["password"] = settings.user, settings.password
    if settings.token is not None:
        options["token"] = settings.token
    if settings.creds is not None:
        options["user_credentials"] = settings.creds
    if settings.tls_ca is not None:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca)
    return await nats.connect(**options)


async def ensure_stream(connection: Any, settings: NatsSettings) -> Any:
    """The stream's info, after creating it when missing (on the asyncio loop)."""
    from nats.js.api import DiscardPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError

    js = connection.jetstream()
    try:
        return await js.stream_info(settings.stream)
    except NotFoundError:
        pass
    replicas = settings.replicas
    if not replicas:
        info = connection._server_info  # What the server said when we connected.
        replicas = 3 if info.get("cluster") else 1
    config = StreamConfig(
        name=settings.stream, subjects=[f"{settings.stream}.>"], max_age=settings.max_age,
        max_bytes=settings.max_bytes, num_replicas=replicas, storage=StorageType.FILE,
        discard=DiscardPolicy.OLD, duplicate_window=120.0)
    info = await js.add_stream(config)
    log.info("created stream %r (subjects %s.>, %d replica(s), %g s, %d bytes at most)",
             settings.stream, settings.stream, replicas, settings.max_age, settings.max_bytes)
    return info


class StreamMissing(Exception):
    """The stream does not exist (yet): ``pgws-relay feed`` makes it."""


class _Reader:
    """The asyncio side of a relay's stream reader: its connection and consumer."""

    def __init__(self, settings: NatsSettings, on_state: Callable[[str | None], None]) -> None:
        self._settings = settings
        self._on_state = on_state
        self.connection: Any = None
        self.subscription: Any = None

    async def open(self) -> tuple[int, int, int, int]:
        """Connect and look at the stream: its identity, first and last sequence, and now (Unix
        seconds). The feeder makes the stream; a relay waits for it (:class:`StreamMissing`)."""
        if self.connection is None or self.connection.is_closed:
            self.connection = await connect(self._settings, "pgws-relay", self._on_state)
        return await self.look()

    async def look(self) -> tuple[int, int, int, int]:
        from nats.js.errors import NotFoundError

        try:
            info = await self.connection.jetstream().stream_info(self._settings.stream)
        except NotFoundError:
            raise StreamMissing(self._settings.stream) from None
        return (stream_identity(info.config.name, info.created), info.state.first_seq,
                info.state.last_seq, int(time.time()))

    async def first_since(self, first: int, last: int, since: float) -> int:
        """The first sequence whose message is no older than ``since`` (Unix seconds), found by
        bisection over the stream (a few direct reads), or ``last + 1``."""
        js = self.connection.jetstream()
        low, high = first, last + 1
        while low < high:
            middle = (low + high) // 2
            try:
                message = await js.get_msg(self._settings.stream, middle)
                stamp = _unix(message.time)
            except Exception:  # A deleted message counts as old.
                stamp = -1.0
            if stamp >= since:
                high = middle
            else:
                low = middle + 1
        return low

    async def subscribe(self, start: int) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy

        if self.subscription is not None:  # The consumer it replaces.
            with contextlib.suppress(Exception):
                await self.subscription.unsubscribe()
            self.subscription = None
        js = self.connection.jetstream()
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=max(start, 1))
        self.subscription = await js.subscribe(f"{self._settings.stream}.>",
                                               ordered_consumer=True, config=config,
                                               stream=self._settings.stream)

    async def drop(self) -> None:
        """Forget the consumer: :meth:`batch` fails until :meth:`subscribe` makes one."""
        subscription, self.subscription = self.subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def last_sequence(self) -> int:
        """The stream's last sequence now."""
        info = await self.connection.jetstream().stream_info(self._settings.stream)
        return int(info.state.last_seq)

    async def batch(self) -> list[tuple[int, int, bytes]]:
        """The next messages: (sequence, Unix second, payload), at most ``_BATCH``; empty when
        none came within ``_IDLE_WAIT``."""
        from nats.errors import TimeoutError as NatsTimeout

        subscription = self.subscription
        try:
            first = await subscription.next_msg(timeout=_IDLE_WAIT)
        except NatsTimeout:
            return []
        found = [_entry(first)]
        queue = getattr(subscription, "_pending_queue", None)
        if queue is None or not hasattr(subscription, "_pending_size"):
            # Another nats-py: its public way, a task and a timer per message.
            while subscription.pending_msgs and len(found) < _BATCH:
                found.append(_entry(await subscription.next_msg(timeout=_IDLE_WAIT)))
            return found
        # What is already here is taken as next_msg takes it, without its task, timer and
        # uuid per message: 59.8 → 14.2 µs of the relay's CPU per message read
        # (bench/micro/nats_reader.py, 30,000 messages from a local stream).
        while len(found) < _BATCH:
            try:
                message = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            subscription._pending_size -= len(message.data)
            queue.task_done()
            found.append(_entry(message))
        return found

    async def read_again(self, first: int, last: int, max_bytes: int, max_count: int
                         ) -> list[tuple[int, int, bytes]] | None:
        """The stream's messages from ``first`` on, up to ``last`` (sequences) or to the bounds
        (``max_bytes`` of payloads and their delivery overhead, ``max_count``), whichever
        comes first, with a consumer of their own; None when one is missing (it aged out).
        Raises when the stream cannot be read now (nats-py's errors; a message that does not
        come within :data:`_IDLE_WAIT` while the stream holds it)."""
        from nats.errors import TimeoutError as NatsTimeout
        from nats.js.api import ConsumerConfig, DeliverPolicy

        if first > last:
            return []
        js = self.connection.jetstream()
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                opt_start_seq=first)
        found: list[tuple[int, int, bytes]] = []
        size = 0
        subscription = None
        try:
            subscription = await js.subscribe(f"{self._settings.stream}.>",
                                              ordered_consumer=True, config=config,
                                              stream=self._settings.stream)
            expected = first
            while expected <= last and len(found) < max_count:
                try:
                    entry = _entry(await subscription.next_msg(timeout=_IDLE_WAIT))
                except NatsTimeout:
                    # Nothing came: the stream is slow (try again), or holds nothing from
                    # ``expected`` on (purged, or aged out on a quiet stream: expired).
                    state = (await js.stream_info(self._settings.stream)).state
                    if state.first_seq > expected or state.last_seq < expected:
                        log.info("a resume needs sequence %d of stream %r, which holds %d to "
                                 "%d: told expired", expected, self._settings.stream,
                                 state.first_seq, state.last_seq)
                        return None
                    raise
                if entry[0] < expected:
                    # Not what was asked for: seen once in the fleet bench, in the third of
                    # four NATS cuts in a row (from the sequence the relay's own consumer had
                    # restarted at). The stream holds what was asked: read it again.
                    raise RuntimeError(f"the consumer delivered sequence {entry[0]} when "
                                       f"{expected} was asked for")
                if entry[0] != expected:
                    log.info("a resume needs sequence %d of stream %r, which holds %d next: "
                             "told expired", expected, self._settings.stream, entry[0])
                    return None  # Aged out, or deleted: the resume cannot be whole.
                size += len(entry[2]) + _DELIVERY_OVERHEAD
                if size > max_bytes and found:
                    break  # The next step starts with it.
                found.append(entry)
                expected += 1
            return found
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()


def _entry(message: Any) -> tuple[int, int, bytes]:
    metadata = message.metadata
    return metadata.sequence.stream, int(_unix(metadata.timestamp)), message.data


def _unix(stamp: Any) -> float:
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


class NatsSource(Reconnecting):
    """The :class:`relay.sources.base.Source` of a JetStream stream (see the module's opening).

    ``on_log(identity, start)`` makes the history's positions the stream's (called before the
    first batch, and again if the stream was made again); ``on_caught_up()`` once the stream
    was read up to where it ended at start; ``on_listening()`` at a gap (the stream was made
    again: its positions start over).
    """

    role = "stream reader"

    def __init__(self, settings: NatsSettings, publish: Callable[..., None], retries: int,
                 history_seconds: float,
                 on_log: Callable[[int, int], None] | None = None,
                 on_caught_up: Callable[[], None] | None = None,
                 on_listening: Callable[[], None] | None = None, channel: str = "",
                 on_backfilled: Callable[[Any, Any, int, Callable[[], None]], int | None]
                 | None = None,
                 on_unavailable: Callable[[Any], None] | None = None,
                 backfill_bytes: int = 1 << 20) -> None:
        """``channel``: the listen channel the feeder read, for the log line.
        ``on_backfilled(client, messages, through, drained)``: a step of what :meth:`backfill`
        read (the hub's :meth:`relay.core.hub.Hub.backfilled`: the key to read on to, or None
        when done), at most ``backfill_bytes`` (half a client's queue bound: they go into its
        queue). ``on_unavailable(client)``: a step could not be read within
        :data:`_BACKFILL_RETRY_WINDOW` (the hub's
        :meth:`~relay.core.hub.Hub.backfill_unavailable`)."""
        super().__init__(retries)
        self._channel = channel
        self._on_backfilled = on_backfilled
        self._on_unavailable = on_unavailable
        self._backfill_bytes = backfill_bytes
        self._backfills: trio.MemorySendChannel[tuple[Any, int, int]]
        self._backfills_out: trio.MemoryReceiveChannel[tuple[Any, int, int]]
        self._backfills, self._backfills_out = trio.open_memory_channel(_BACKFILLS_WAITING)
        self._settings = settings
        self._publish = publish
        self._history_seconds = history_seconds
        self._on_log = on_log
        self._on_caught_up = on_caught_up
        self._on_listening = on_listening
        self.identity: int | None = None
        #: The last sequence handed to the hub, and the stream's last when the reader started.
        self.sequence = 0
        #: The stream's last sequence, as last asked (about once a second).
        self.last_sequence = 0
        self._catch_up_to: int | None = None
        #: When the consumer last delivered, or was made (trio time).
        self._progress_at = 0.0
        self.received = 0
        self.gaps = 0
        self.last_message_at = 0.0
        self.ready = trio.Event()
        self._connected_state: str | None = "not connected yet"

    def gauges(self) -> dict[str, tuple[str, float]]:
        since = time.time() - self.last_message_at if self.last_message_at else -1.0
        return {
            "pgws_nats_sequence": ("The stream sequence last handed to the hub.",
                                   self.sequence),
            "pgws_nats_lag_messages": ("Messages in the stream not handed to the hub yet (as "
                                       "of the last look, about once a second).",
                                       max(0, self.last_sequence - self.sequence)),
            "pgws_nats_seconds_since_message": ("Seconds since the last message was read "
                                                "(-1: none yet).", since),
        }

    def backfill(self, client: Any, after: int, until: int) -> None:
        """Read the stream again for a resume older than the history (the hub's
        ``backfill``): schedules the read, in steps handed to ``on_backfilled``. At most
        :data:`_BACKFILLS_AT_ONCE` steps are read at once, :data:`_BACKFILLS_WAITING` resumes
        are in progress and as many wait to start; beyond, the client is asked at once to come
        back later (1013)."""
        log.info("a resume after sequence %d reads the stream again up to %d",
                 after >> LOG_INDEX_BITS, until >> LOG_INDEX_BITS)
        try:
            self._backfills.send_nowait((client, after, until))
        except trio.WouldBlock:  # Too many at once: come back later (the stream holds it).
            if self._on_unavailable is not None:
                trio.lowlevel.current_trio_token().run_sync_soon(self._on_unavailable, client)

    def _answer(self, client: Any, messages: Any, through: int,
                drained: Callable[[], None] = lambda: None) -> int | None:
        if self._on_backfilled is None:
            return None
        return self._on_backfilled(client, messages, through, drained)

    async def _serve_backfills(self, loop: AsyncioThread, reader: _Reader) -> None:
        limiter = trio.CapacityLimiter(_BACKFILLS_AT_ONCE)

        async def one(client: Any, after: int, until: int) -> None:
            """Steps of at most half the client's queue, each read once it wrote the last,
            until the hub's history holds the rest; at most :data:`_BACKFILL_TOTAL` messages."""
            read = 0
            while True:
                first, last = (after >> LOG_INDEX_BITS) + 1, until >> LOG_INDEX_BITS
                step_started = trio.current_time()  # Waiting for a read slot counts too.
                attempts = 0
                while True:
                    async with limiter:
                        try:
                            messages = await loop.run(reader.read_again, first, last,
                                                      self._backfill_bytes, _BACKFILL_MESSAGES)
                            break
                        except Exception as exc:  # NATS away: tried again, then 1013.
                            attempts += 1
                            retrying = (trio.current_time() - step_started
                                        < _BACKFILL_RETRY_WINDOW)
                            if attempts == 1 or not retrying:  # Not a line per attempt.
                                log.warning("reading the stream again for a resume failed: "
                                            "%s; %s", first_line(exc), "retrying" if retrying
                                            else "the client is asked to resume later (1013)")
                    if not retrying:
                        if self._on_unavailable is not None:
                            self._on_unavailable(client)
                        return
                    await trio.sleep(_RETRY)
                if messages is not None:
                    read += len(messages)
                    if read > _BACKFILL_TOTAL:
                        log.info("a resume needs more than %d messages read again: told "
                                 "expired", _BACKFILL_TOTAL)
                        messages = None
                through = (messages[-1][0] << LOG_INDEX_BITS if messages and
                           messages[-1][0] < last else until)
                if messages is not None:
                    # The hub takes keys, as the live path gives them (``places``), not stream
                    # sequences: a position made of a bare sequence read back as sequence 0,
                    # and the client's next resume replayed the whole stream (the fleet bench's
                    # duplicates and late arrivals after NATS cuts).
                    messages = [(sequence << LOG_INDEX_BITS, second, payload)
                                for sequence, second, payload in messages]
                written = trio.Event()
                more = self._answer(client, messages, through, written.set)
                if more is None:
                    return
                with trio.move_on_after(_STEP_WRITE_WAIT) as waited:
                    await written.wait()
                if waited.cancelled_caught:
                    self._answer(client, None, through)
                    return
                after, until = through, more

        # At most _BACKFILLS_WAITING resumes in progress, and as many waiting in the channel:
        # beyond, backfill() answers at once (1013), so one read token cannot queue more.
        live = trio.Semaphore(_BACKFILLS_WAITING)

        async def bounded(client: Any, after: int, until: int) -> None:
            try:
                await one(client, after, until)
            finally:
                live.release()

        async with trio.open_nursery() as nursery:
            while True:
                await live.acquire()
                client, after, until = await self._backfills_out.receive()
                nursery.start_soon(bounded, client, after, until)

    def _state(self, why: str | None) -> None:
        """From the asyncio thread: the connection's state (through the Trio token)."""
        self._connected_state = why

    async def run(self) -> None:
        """Read the stream until cancelled; :class:`SourceGaveUp` when NATS stays away longer
        than the window."""
        self._went_down(trio.current_time(), "not connected yet")
        token = trio.lowlevel.current_trio_token()

        def on_state(why: str | None) -> None:
            token.run_sync_soon(self._state, why)

        async with asyncio_thread("pgws-nats") as loop:
            reader = _Reader(self._settings, on_state)
            try:
                await self._open(loop, reader)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve_backfills, loop, reader)
                    await self._read(loop, reader)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await loop.run(reader.close)

    async def _open(self, loop: AsyncioThread, reader: _Reader) -> None:
        """Connect, find where the history starts, subscribe; retried within the window (a
        stream that does not exist yet is waited for as long as it takes: the feeder makes
        it)."""
        started = trio.current_time()
        attempts = 0
        while True:
            try:
                identity, first, last, now = await loop.run(reader.open)
                start = await loop.run(reader.first_since, first, last,
                                       now - self._history_seconds) if last else 1
                await loop.run(reader.subscribe, start)
                break
            except StreamMissing:
                if self.status != _NO_STREAM:
                    log.warning("NATS stream %r does not exist: waiting for pgws-relay feed to "
                                "make it", self._settings.stream)
                self.status = _NO_STREAM
                started = trio.current_time()  # Not an outage: the window starts again.
            except Exception as exc:  # nats-py's errors have no common base.
                attempts += 1
                message = first_line(exc)
                self.status = f"NATS unreachable: {message}"
                self._log_failure(message, attempts, trio.current_time() - started)
                if trio.current_time() - started + RETRY_SPACING > self._window:
                    raise SourceGaveUp(f"no NATS connection for "
                                       f"{trio.current_time() - started:.0f} s") from None
            await trio.sleep(RETRY_SPACING)
        self._adopt(identity, start)
        self._catch_up_to = max(last, start - 1)  # Caught up once the start's last is read.
        self._connected_state = None
        self._came_up()
        self.ready.set()
        log.info("listening on channel %r through NATS stream %r (from sequence %d of %d)",
                 self._channel, self._settings.stream, start, last)

    def _adopt(self, identity: int, start: int) -> None:
        """Positions are this stream's from ``start`` on."""
        if self.identity is not None and identity != self.identity:
            self.gaps += 1
            log.error("NATS stream %r was made again: its positions start over, and positions "
                      "of the old one are unknown here (gap %d)", self._settings.stream,
                      self.gaps, extra={"event": "listener_gap", "gaps": self.gaps})
            if self._on_listening is not None:
                self._on_listening()
        self.identity = identity
        if self._on_log is not None:
            self._on_log(identity, (start - 1) << LOG_INDEX_BITS)
        self.sequence = start - 1

    async def _subscribe_again(self, loop: AsyncioThread, reader: _Reader) -> None:
        """After a lost consumer: from the next sequence (nothing lost, nothing twice), or,
        when the stream was made again, from its start (a gap, told)."""
        try:
            identity, first, _, _ = await loop.run(reader.open)
            if identity != self.identity:
                self._adopt(identity, first)
            await loop.run(reader.subscribe, self.sequence + 1)
            self._progress_at = trio.current_time()
            self._connected_state = None
            log.info("reading stream %r again from sequence %d", self._settings.stream,
                     self.sequence + 1)
        except StreamMissing:
            self._connected_state = _NO_STREAM
            await loop.run(reader.drop)  # Tried again after a pause (_read).
        except Exception as exc:  # Still away: the window decides.
            self._connected_state = f"NATS unreachable: {first_line(exc)}"
            await loop.run(reader.drop)

    async def _read(self, loop: AsyncioThread, reader: _Reader) -> None:
        down_since: float | None = None
        looked = -inf
        self._progress_at = trio.current_time()
        while True:
            if trio.current_time() - looked >= 1.0 and self._connected_state is None:
                looked = trio.current_time()
                with contextlib.suppress(Exception):  # Only a gauge: the next look may work.
                    self.last_sequence = await loop.run(reader.last_sequence)
                stalled = trio.current_time() - self._progress_at
                if self.last_sequence > self.sequence and stalled >= _STALLED:
                    log.warning("stream %r: nothing read for %.0f s while it holds %d more "
                                "message(s): making the consumer again",
                                self._settings.stream, stalled,
                                self.last_sequence - self.sequence)
                    await self._subscribe_again(loop, reader)
            try:
                batch = await loop.run(reader.batch)
            except Exception as exc:  # The consumer is gone (the stream, the connection).
                self._connected_state = f"consumer lost: {first_line(exc)}"
                batch = []
                await trio.sleep(RETRY_SPACING)
                await self._subscribe_again(loop, reader)
            if batch:
                batch = [entry for entry in batch if entry[0] > self.sequence]
            if batch:
                self._progress_at = trio.current_time()
                self.sequence = batch[-1][0]
                self.received += len(batch)
                self.last_message_at = time.time()
                self._publish([payload for _, _, payload in batch], time.monotonic(),
                              places=[(sequence << LOG_INDEX_BITS, second)
                                      for sequence, second, _ in batch])
            if self._catch_up_to is not None and self.sequence >= self._catch_up_to:
                self._catch_up_to = None
                log.info("caught up with stream %r at sequence %d", self._settings.stream,
                         self.sequence)
                if self._on_caught_up is not None:
                    self._on_caught_up()
            why = self._connected_state
            now = trio.current_time()
            if why is None:
                if down_since is not None:
                    self._came_up()
                    down_since = None
            else:
                if down_since is None:
                    down_since = now
                    self._went_down(now, f"stream reader reconnecting: {why}")
                if now - down_since > max(self._window, RETRY_SPACING):
                    raise SourceGaveUp(f"no NATS connection for {now - down_since:.0f} s")
