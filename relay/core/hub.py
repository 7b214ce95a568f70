"""The hub: who receives what, and one message's bytes per notification for all of them.

Theory of operation
-------------------
Clients whose deliveries are identical form one *stream*: the same channels, the same filters
(URL ``filter`` parameters plus the token's ``filters`` claim) and the same *encoding*, the
transport's bytes for a message (:class:`relay.core.encoding.Encoding`: WebSocket text frames
are :data:`relay.wire.frames.TEXT_FRAMES`). A stream is the unit of every cost that does not
need a client: a notification is parsed once, its channel's distinct filter sets are evaluated
once (:class:`relay.core.filters.Index`), its bytes are made once per encoding that receives it,
and each stream that receives it gets the batch's messages joined into one bytes object, offered
to every plain client of the stream. So the work per notification grows with distinct streams,
never with clients, and the work per client is one offer per batch. The hub knows no transport:
what it offers comes from the stream's encoding.

Compression (permessage-deflate, :mod:`relay.wire.deflate`) is per stream too. A stream's clients
that agreed to it share one :class:`relay.wire.deflate.Deflater` with context takeover: every
message is compressed once and the same compressed messages go to all of them, which is sound
because they all receive exactly the same messages in the same order (a client that cannot
keep up is closed, never skipped). A client that joins a stream whose compressor has history
*joins* at the next sync point: until then it receives the plain messages (RSV1 clear, which
RFC 7692 allows per message), and at the sync point the compressor restarts, so nothing after it
refers back to what the new client never saw. Sync points come at once when no client depends
on the history (the compressor is fresh, or the stream has no compressed client yet), else at
most once per ``_SYNC_SPACING``: each restart costs the stream its history. Clients that asked
for ``server_no_context_takeover``, and every compressed client of a stream beyond
``compression_streams`` (each compressor holds ~150 KiB), receive each message compressed on
its own (:func:`relay.wire.deflate.alone`), made once per notification for all of them.

Resumable streams (:mod:`relay.core.history`, :mod:`relay.wire.positions`). With history on, every
notification gets a position when it arrives, whoever subscribes; its text (sealed) is made once
when a positioned stream or a replay first needs it, and the history keeps it with the payload.
Clients that asked for positions form streams of their own that receive each delivery with its
position (:meth:`relay.core.encoding.Encoding.delivery`). A client that comes back with a
position is admitted in one synchronous step: its control event, then the history's deliveries
after its position (filtered as its live traffic is; their bytes share the history's payloads
and positions), then membership of its stream. No notification can arrive in between, so the
seam has no gap and no duplicate. A position another relay process issued, that this one has
not seen yet, parks the client (:meth:`Hub.add` returns True) until the notification arrives
here or the caller gives up (:meth:`Hub.give_up`: ``unknown``). Each time LISTEN is
established the history takes a break, and every positioned client is told ``lost``/``gap``.

With a source that reads a log (the WAL, a stream), positions are places in it
(:meth:`relay.core.history.History.adopt_log`): the same on every relay, so a position this
process has not read yet is waited for until it is read (parked by key). A relay that starts
reads its history back from the log; meanwhile (:attr:`Hub.catching_up`) every client waits,
and :meth:`Hub.caught_up` lets them in, a few at a time, so nobody receives old messages as
live. A position older than the history but not than the source is read again from it
(:attr:`Hub.backfill`, answered by :meth:`Hub.backfilled`) in steps, each within the replay's
bounds: the source reads the next step once the client has written the last (so what it misses
is never more than its queue at a time), until the history holds the rest, which is replayed as
any resume before the client joins its stream.

Rules this module keeps:

- It never awaits a client and never blocks: a slow client is the client's problem, decided
  by the client's own bound, and everyone else is served in the same pass.
- Order per stream is PostgreSQL's delivery order, across the stream's channels too.
- It holds no socket; it knows clients only through :class:`Subscriber`.
- Its bookkeeping is per batch and per stream, never per subscriber: the counters and the
  delivery-time histogram cost the fan-out loop one branch per subscriber (did the offer
  queue?). A batch's delivery time runs from its arrival at the listener to its last write:
  at the end of the pass when every offer was written at once, otherwise when the last client
  that queued it has written (or dropped) it (:class:`Pending`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from relay.core import envelope, filters
from relay.core.encoding import Encoding
from relay.core.filters import Filters
from relay.core.history import WAIT, Entry, History
from relay.core.stats import LatencyHistogram
from relay.wire import deflate, positions
from relay.wire.closecodes import TRY_AGAIN_LATER
from relay.wire.positions import Position

#: Seconds between two sync points of a stream whose compressed clients depend on its history:
#: a client that joins meanwhile receives plain messages for at most this long, and a stream
#: that clients keep joining loses its compression history at most this often.
_SYNC_SPACING = 1.0

#: The work a filtered resume may do, in the units of :func:`relay.core.filters.cost` (about
#: 0.3 µs each at worst): each history entry it examines is parsed (:func:`_parse_units`) and
#: its filter set evaluated in full, in one synchronous step, so this bounds how long one resume
#: holds the relay. Counting entries instead let one resume of a deep 64-filter set hold it
#: 170–450 ms (1.0 s over 10 channels). At 60,000 units the loop's longest stall during 5
#: such resumes a second was 25 ms (the replay 11–16 ms of it, the rest the turn's other work:
#: bench/scenarios/abuse.py); 40,000 keeps the whole turn under 20 ms. Beyond it the client is
#: told ``expired``: an Econia fill with one filter costs ~10 units (4,000 entries), the
#: deepest 32-filter set ~650 (61). Unfiltered replays collect each entry's parts (~0.3 µs;
#: ~5 µs the first time its position is sealed), bounded by the history itself.
REPLAY_WORK = 40_000


class Compression(enum.Enum):
    """What a client agreed to (:func:`relay.wire.deflate.negotiate`)."""

    OFF = "off"
    SHARED = "shared"  # permessage-deflate with context takeover: the stream's compressor
    ALONE = "alone"    # server_no_context_takeover: each message compressed on its own


class Subscriber(Protocol):
    """What the hub needs of a client."""

    def offer(self, frame: bytes) -> bool:
        """Take bytes to send (its encoding's), without blocking; a full client closes itself.

        True when (part of) the bytes were queued: they will be written later, and the client
        then calls :meth:`Pending.done` on what :meth:`track` gave it.
        """

    def track(self, pending: Pending) -> None:
        """Call ``pending.done()`` once what was queued so far is written or dropped."""

    def replay(self, parts: list[bytes]) -> None:
        """Queue what a resume replays, as parts to be written in order (each delivery's, from
        its encoding): they share the history's payloads and positions, so they do not count
        against the queue bound."""

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


class _Stream:
    """Clients with the same channels, filters and encoding: they receive the same bytes."""

    __slots__ = ("alone", "channels", "deflater", "encoding", "filters", "joining", "key",
                 "plain", "positioned", "shared", "synced_at")

    def __init__(self, key: _Key) -> None:
        self.key = key
        #: ``positioned``: its clients receive each delivery with its position.
        self.channels, self.filters, self.positioned, self.encoding = key
        self.plain: set[Subscriber] = set()
        #: Compressed clients that share :attr:`deflater`'s history (or, without one, get
        #: each message compressed alone).
        self.shared: set[Subscriber] = set()
        #: Compressed clients waiting for the next sync point; they get plain messages until
        #: then.
        self.joining: set[Subscriber] = set()
        self.alone: set[Subscriber] = set()
        self.deflater: deflate.Deflater | None = None
        self.synced_at = -_SYNC_SPACING

    def __len__(self) -> int:
        return len(self.plain) + len(self.shared) + len(self.joining) + len(self.alone)

    def discard(self, client: Subscriber) -> None:
        for group in (self.plain, self.shared, self.joining, self.alone):
            group.discard(client)

    def clients(self) -> Iterable[Subscriber]:
        return (*self.plain, *self.shared, *self.joining, *self.alone)


#: A stream's identity: its channels, its filters, whether it is positioned, its encoding.
_Key = tuple[frozenset[str], Filters, bool, Encoding]


#: What a client parked while the source catches up waits for (:meth:`Hub.caught_up`).
_CAUGHT_UP = -1
#: What a client waits for while the source reads again what its position needs and the history
#: no longer holds (:meth:`Hub.backfilled`).
_BACKFILL = -2

#: Messages read again from the source for one resume, at most (beyond: ``expired``): each is
#: parsed and filtered in the step that lets the client in, as a replay from memory is.
BACKFILL_MESSAGES = 20_000


class _Parked:
    """A client waiting: for another relay process's position to arrive here (``awaited``:
    what :meth:`relay.core.history.History.awaited` says), for the source to catch up, or for
    the source to read again what the history no longer holds (``started``: some of it was sent).
    """

    __slots__ = ("awaited", "client", "compression", "key", "position", "started")

    def __init__(self, client: Subscriber, key: _Key, compression: Compression,
                 position: Position | None, awaited: int) -> None:
        self.client = client
        self.key = key
        self.compression = compression
        self.position = position
        self.awaited = awaited
        self.started = False


class _Drained:
    """What :meth:`Subscriber.track` is given for a step read again: ``then()`` once the
    client wrote it (or dropped it)."""

    __slots__ = ("then",)

    def __init__(self, then: Callable[[], None]) -> None:
        self.then = then

    def done(self) -> None:
        self.then()


class _Channel:
    """One channel's streams, by filter set, and the index that evaluates those sets."""

    __slots__ = ("index", "streams")

    def __init__(self) -> None:
        self.streams: dict[Filters, list[_Stream]] = {}
        self.index = filters.Index()

    def add(self, stream: _Stream) -> None:
        same = self.streams.setdefault(stream.filters, [])
        if not same:
            self.index.add(stream.filters)
        same.append(stream)

    def remove(self, stream: _Stream) -> None:
        same = self.streams[stream.filters]
        same.remove(stream)
        if not same:
            del self.streams[stream.filters]
            self.index.remove(stream.filters)

    def matching(self, payload: bytes, document: object) -> Iterable[_Stream]:
        streams = self.streams
        if len(streams) == 1 and filters.NONE in streams:
            return streams[filters.NONE]  # No filters on this channel: nothing to evaluate.
        found = self.index.matching(filters.Document(payload, document))
        return [stream for key in found for stream in streams[key]]


class Hub:
    """Routes notification payloads to the streams, and so the subscribers, that want them."""

    def __init__(self, listen_channel: str, compression_streams: int = 1024,
                 history: History | None = None, *, encoding: Encoding) -> None:
        """``encoding``: what :meth:`add` gives a client when the caller names none."""
        self._listen_channel = listen_channel
        self._encoding = encoding
        self._compression_streams = compression_streams
        #: None: history is off, and no client may ask for positions.
        self.history = history
        self._channels: dict[str, _Channel] = {}
        self._streams: dict[_Key, _Stream] = {}
        #: Parked clients, by what they wait for, and by client.
        self._parked: dict[int, list[_Parked]] = {}
        #: The source is reading again what it read before this process started (its log):
        #: clients wait until it is caught up (:meth:`caught_up`), then enter as usual.
        self.catching_up = False
        #: When the source can read again what the history dropped (a stream): asked with
        #: ``(client, after, until)`` to hand :meth:`backfilled` the messages with keys in
        #: ``(after, until]``. Called from within :meth:`add`: it must only schedule the work.
        self.backfill: Callable[[Subscriber, int, int], None] | None = None
        self._parked_clients: dict[Subscriber, _Parked] = {}
        #: The seq of the last checkpoint sent (:meth:`checkpoint`).
        self._checkpoint_seq = 0
        #: Resumes by outcome (``resumed`` or a reason of :mod:`relay.wire.positions`), and the
        #: deliveries replayed.
        self.resumes = dict.fromkeys(("resumed", *positions.LOST_REASONS), 0)
        self.replayed = 0
        #: Every client, with its stream (None: a write-only or parked client, whose encoding
        #: is in :attr:`_loose`).
        self._clients: dict[Subscriber, _Stream | None] = {}
        self._loose: dict[Subscriber, Encoding] = {}
        self._ping_counter = 0
        #: Shared compressors alive (at most ``compression_streams``).
        self.deflaters = 0
        #: Compressed clients let into their stream's shared compressed messages; compressors
        #: restarted for them (a join into a fresh compressor costs no restart).
        self.joins = 0
        self.restarts = 0
        #: Notifications routed to at least one subscriber; messages and bytes offered in all.
        self.routed = 0
        self.offered = 0
        self.offered_bytes = 0
        #: Seconds from a notification's arrival at the listener to its last write.
        self.delivery_times = LatencyHistogram()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def add(self, client: Subscriber, channels: Collection[str],
            filter_set: Filters = filters.NONE,
            compression: Compression = Compression.OFF, positioned: bool = False,
            resume: Position | None = None, encoding: Encoding | None = None) -> bool:
        """Register a connection; it receives the channels given (none: write-only), narrowed
        by ``filter_set``, in ``encoding`` (default: the hub's), compressed as agreed;
        ``positioned`` (history must be on): with positions, from ``resume`` if given (the
        missed deliveries first).

        True when the client is parked, waiting for ``resume`` to arrive: the caller calls
        :meth:`give_up` when it has waited long enough.
        """
        if encoding is None:
            encoding = self._encoding
        if not channels:
            self._clients[client] = None
            self._loose[client] = encoding
            return False
        key = (frozenset(channels), filter_set, positioned, encoding)
        if self.catching_up:
            self._park(_Parked(client, key, compression, resume, _CAUGHT_UP))
            return True
        return self._enter(client, key, compression, resume, waiting=True)

    def _enter(self, client: Subscriber, key: _Key, compression: Compression,
               resume: Position | None, waiting: bool) -> bool:
        """Let a client in (after its replay), or park it when its position is still to come
        here and it may wait (``waiting``; else the position is ``unknown``): True."""
        history = self.history
        encoding = key[3]
        if not key[2] or history is None:
            self._join(client, key, compression)
        elif resume is None:
            here = history.position
            client.offer(encoding.event("position", here, positions.position_event(here)))
            self._join(client, key, compression)
        else:
            outcome = history.resolve(resume, key[0])
            if outcome == positions.EXPIRED and waiting and self.backfill is not None \
                    and history.log:
                # Older than the history, maybe not than the source: read it again.
                after, until = history.key_of(resume), history.complete_after(key[0])
                self._park(_Parked(client, key, compression, resume, _BACKFILL))
                self.backfill(client, after, until)
                return True
            if outcome == WAIT:
                if waiting:
                    self._park(_Parked(client, key, compression, resume,
                                       history.awaited(resume)))
                    return True
                outcome = positions.UNKNOWN
            self._admit(client, key, compression, resume, outcome)
        return False

    def _park(self, parked: _Parked) -> None:
        self._parked.setdefault(parked.awaited, []).append(parked)
        self._parked_clients[parked.client] = parked
        self._clients[parked.client] = None
        self._loose[parked.client] = parked.key[3]

    def give_up(self, client: Subscriber) -> None:
        """A parked client has waited long enough: it enters now, and a position it waited
        for is ``unknown`` here. One that waits for the source to catch up is closed (1013)
        instead: let in now, it would receive what is read back from the log as live. So is
        one whose first step the source has not read yet (its store is slow or away): what
        it missed is not lost, only not readable now, and it resumes later from the same
        position."""
        parked = self._parked_clients.get(client)
        if parked is None or parked.started:
            return  # Gone, or reading again from the source: that has bounds of its own.
        self._unpark(client)
        if parked.awaited == _CAUGHT_UP and self.catching_up:
            client.close(TRY_AGAIN_LATER, "catching up")
            return
        if parked.awaited == _BACKFILL:
            client.close(TRY_AGAIN_LATER, "stream unavailable")
            return
        self._enter(client, parked.key, parked.compression, parked.position, waiting=False)

    def backfill_unavailable(self, client: Subscriber) -> None:
        """The source cannot read now what a client waiting with an old position needs (its
        store is away, after its retries): the client is closed with 1013, to resume later
        from where it is (the last step it received, or its position). Nothing is told
        ``lost``: nothing is."""
        parked = self._parked_clients.get(client)
        if parked is None or parked.awaited != _BACKFILL:
            return  # Gone, or given up on meanwhile.
        self._unpark(client)
        client.close(TRY_AGAIN_LATER, "stream unavailable")

    def backfilled(self, client: Subscriber, messages: Sequence[tuple[int, int, bytes]] | None,
                   through: int, drained: Callable[[], None] = lambda: None) -> int | None:
        """A step of what the source read again for a client that waits with an old position:
        the messages with keys in (where the last step ended, or its position; ``through``]
        (None: the source could not, within its bounds). The messages of the client's channels
        and filters are offered to it; then, if the history still holds all that follows
        ``through``, that is replayed and the client joins its stream: None. Otherwise it
        waits for the next step: the key to read up to is returned, and ``drained()`` is
        called once the client has written this one (read the next step then, not before:
        each step is at most a share of the client's queue).

        The client is told ``resumed`` before the first step; with the count of what follows
        when everything came in one step, without one when more steps followed. When a step
        cannot be served the client is told ``lost``/``expired`` and joins from here: None.
        """
        parked = self._parked_clients.get(client)
        if parked is None or parked.awaited != _BACKFILL:
            return None  # Gone, or given up on meanwhile.
        history = self.history
        assert history is not None and parked.position is not None
        channels, filter_set, _, encoding = parked.key
        deep = None if messages is None else \
            _read_again(messages, channels, filter_set, self._listen_channel)
        outcome: int | str = positions.EXPIRED
        replay = None
        if deep is not None:
            outcome = history.resolve(history.position_at(through), channels)
            if not isinstance(outcome, str):
                replay = _replay(history, history.after(outcome, channels), filter_set)
                if replay is None:
                    deep = None  # The rest is over the replay's bounds: expired.
            elif outcome != positions.EXPIRED:
                deep = None  # The source started over meanwhile (a gap): told as it is.
        if deep is None:
            self._unpark(client)
            self._admit(client, parked.key, parked.compression, parked.position,
                        outcome if isinstance(outcome, str) else positions.EXPIRED)
            return None
        self.replayed += len(deep)
        if not parked.started:
            self.resumes["resumed"] += 1
            resumed = history.text(parked.position)
            count = None if replay is None else len(deep) + len(replay)
            client.offer(encoding.event("resumed", resumed,
                                        positions.resumed_event(resumed, count)))
        parked.started = True
        queued = False
        for message_key, second, payload in deep:  # Counted against the client's queue bound.
            queued |= client.offer(b"".join(encoding.delivery(
                history.text_at(message_key, second), payload)))
        if replay is None:
            # The history moved on past ``through`` meanwhile: another step, from there.
            if queued:
                client.track(_Drained(drained))  # type: ignore[arg-type]
            else:
                drained()
            return history.complete_after(channels)
        self._unpark(client)
        self.replayed += len(replay)
        if replay:
            parts: list[bytes] = []
            for entry in replay:
                parts += encoding.delivery(history.position_of(entry), entry.payload)
            client.replay(parts)
        self._join(client, parked.key, parked.compression)
        return None

    def caught_up(self, limit: int | None = None) -> bool:
        """The source has read up to where it was when it started: clients enter, at most
        ``limit`` of them now (None: all); True while some still wait (call again, after
        letting other work run: each entry may replay a whole history)."""
        self.catching_up = False
        waiting = self._parked.get(_CAUGHT_UP, ())
        for parked in list(waiting[:limit] if limit is not None else waiting):
            if self._unpark(parked.client) is not None:
                self._enter(parked.client, parked.key, parked.compression, parked.position,
                            waiting=True)
        return bool(self._parked.get(_CAUGHT_UP))

    def _unpark(self, client: Subscriber) -> _Parked | None:
        parked = self._parked_clients.pop(client, None)
        if parked is not None:
            del self._loose[client]
            same = self._parked[parked.awaited]
            same.remove(parked)
            if not same:
                del self._parked[parked.awaited]
        return parked

    def _admit(self, client: Subscriber, key: _Key, compression: Compression,
               resume: Position, outcome: int | str) -> None:
        """Tell a returning client the outcome, replay what it missed, then let it in."""
        history = self.history
        assert history is not None
        channels, filter_set, _, encoding = key
        if not isinstance(outcome, str):
            replay = _replay(history, history.after(outcome, channels), filter_set)
            if replay is None:
                outcome = positions.EXPIRED
            else:
                self.resumes["resumed"] += 1
                self.replayed += len(replay)
                resumed = history.text(resume)
                client.offer(encoding.event("resumed", resumed,
                                            positions.resumed_event(resumed, len(replay))))
                if replay:
                    parts: list[bytes] = []
                    for entry in replay:
                        parts += encoding.delivery(history.position_of(entry), entry.payload)
                    client.replay(parts)
        if isinstance(outcome, str):
            self.resumes[outcome] += 1
            here = history.position
            client.offer(encoding.event("lost", here, positions.lost_event(outcome, here)))
        self._join(client, key, compression)

    def _join(self, client: Subscriber, key: _Key, compression: Compression) -> None:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(key)
            for channel in stream.channels:
                self._channels.setdefault(channel, _Channel()).add(stream)
        self._clients[client] = stream
        if compression is Compression.OFF:
            stream.plain.add(client)
        elif compression is Compression.ALONE:
            stream.alone.add(client)
        else:
            if stream.deflater is None and self.deflaters < self._compression_streams:
                stream.deflater = deflate.Deflater()
                self.deflaters += 1
            stream.joining.add(client)

    def remove(self, client: Subscriber) -> None:
        stream = self._clients.pop(client, None)
        if stream is None:
            if self._unpark(client) is None:
                self._loose.pop(client, None)
            return
        stream.discard(client)
        if stream.deflater is not None and not (stream.shared or stream.joining):
            stream.deflater = None  # Its memory goes with its last compressed client.
            self.deflaters -= 1
        if len(stream):
            return
        del self._streams[stream.key]
        for channel in stream.channels:
            routes = self._channels[channel]
            routes.remove(stream)
            if not routes.streams:
                del self._channels[channel]

    def publish(self, payloads: Sequence[bytes], arrived: float | None = None,
                local: bool = False, places: Sequence[tuple[int, int]] | None = None
                ) -> None:
        """Deliver the payloads of one listener wake-up, in order, to their subscribers.

        ``arrived``: when the listener read them (``time.monotonic()``; default: now).
        ``local``: made by this process, not read from LISTEN (meta events about this process):
        delivered, but not part of the stream other processes see, so no position of their own
        (positioned clients get them at the current position) and not kept. ``places``: each
        payload's key in the source's log and its commit's Unix second, when the history's
        positions are a log's (:meth:`relay.core.history.History.adopt_log`).
        """
        if arrived is None:
            arrived = time.monotonic()
        batch: dict[_Stream, list[int]] = {}
        texts: list[bytes] = []  # Payloads delivered to someone.
        entries: list[Entry] = []  # Theirs in the history (when kept and history is on).
        channels = self._channels
        listen = self._listen_channel
        history = None if local else self.history
        found: list[_Parked] = []
        for n, payload in enumerate(payloads):
            document = envelope.parse(payload)
            channel = envelope.channel_of(document, listen)
            if history is not None:
                entry = history.append(channel, payload, arrived,
                                       None if places is None else places[n])
                if self._parked and entry.digest in self._parked and not history.log:
                    found += self._parked[entry.digest]
            routes = channels.get(channel)
            if routes is None:
                continue
            message = -1
            for stream in routes.matching(payload, document):
                if message < 0:
                    message = len(texts)
                    texts.append(payload)
                    if history is not None:
                        entries.append(entry)
                batch.setdefault(stream, []).append(message)
        if texts:
            self._fan_out(batch, _Batch(texts, entries, self.history), arrived)
        if history is not None and history.log and self._parked:
            found = [parked for awaited, same in self._parked.items()
                     if 0 <= awaited <= history.seq for parked in same]
        for parked in found:
            # After the fan-out, which did not reach them: the replay covers this batch too.
            # (A digest twice in one batch lists its clients twice: each is admitted once.)
            if self._unpark(parked.client) is None:
                continue
            self._enter(parked.client, parked.key, parked.compression, parked.position,
                        waiting=False)

    def _fan_out(self, batch: dict[_Stream, list[int]], messages: _Batch,
                 arrived: float) -> None:
        pending: Pending | None = None
        now = time.monotonic()
        for stream, chosen in batch.items():
            if stream.joining:
                self._sync(stream, now)
            receivers = stream.plain | stream.joining if stream.joining else stream.plain
            if receivers:
                parts = messages.encoded(stream.encoding, stream.positioned)
                pending = self._offer(_join(parts, chosen), receivers, len(chosen),
                                      arrived, pending)
            if not (stream.shared or stream.alone):
                continue
            if stream.shared:
                deflater = stream.deflater
                if deflater is None:
                    blob = _join(messages.alone(stream.encoding, stream.positioned, chosen), None)
                else:
                    sources = messages.sources(stream.encoding, stream.positioned)
                    compressed = stream.encoding.compressed
                    blob = b"".join([compressed(deflater.message(sources[m])) for m in chosen])
                pending = self._offer(blob, stream.shared, len(chosen), arrived, pending)
            if stream.alone:
                blob = _join(messages.alone(stream.encoding, stream.positioned, chosen), None)
                pending = self._offer(blob, stream.alone, len(chosen), arrived, pending)
        self.routed += len(messages.texts)
        if pending is None:
            self.delivery_times.observe(time.monotonic() - arrived, len(messages.texts))
        else:
            pending.arm(len(messages.texts))

    def listening(self) -> None:
        """LISTEN was established (the first time too): what was committed while it was not
        is lost; every positioned client is told ``lost``/``gap``."""
        history = self.history
        if history is None:
            return
        history.mark_break()
        here = history.position
        self._to_positioned("lost", here, positions.lost_event(positions.GAP, here))

    def checkpoint(self, now: float | None = None) -> None:
        """Tell positioned clients where the stream is, if it moved since the last time (a
        client whose filters match rarely keeps a recent position), and drop aged history."""
        history = self.history
        if history is None:
            return
        history.expire(time.monotonic() if now is None else now)
        if history.seq == self._checkpoint_seq:
            return
        self._checkpoint_seq = history.seq
        here = history.position
        self._to_positioned("position", here, positions.position_event(here))

    def _to_positioned(self, name: str, position: str, event: bytes) -> None:
        """Offer a control event to every positioned client, made once per encoding."""
        made: dict[Encoding, bytes] = {}
        for stream in self._streams.values():
            if stream.positioned:
                message = made.get(stream.encoding)
                if message is None:
                    message = made[stream.encoding] = stream.encoding.event(name, position,
                                                                             event)
                for client in stream.clients():
                    client.offer(message)

    def _sync(self, stream: _Stream, now: float) -> None:
        """Let a stream's joining clients in, if this batch may be a sync point."""
        deflater = stream.deflater
        if deflater is not None and not deflater.fresh:
            if stream.shared and now - stream.synced_at < _SYNC_SPACING:
                return  # Its compressed clients depend on the history: not yet.
            deflater.restart()
            self.restarts += 1
        stream.synced_at = now
        self.joins += len(stream.joining)
        stream.shared |= stream.joining
        stream.joining.clear()

    def _offer(self, blob: bytes, clients: Iterable[Subscriber], messages: int,
               arrived: float, pending: Pending | None) -> Pending | None:
        """Offer ``blob`` (``messages`` messages) to ``clients``; the batch's Pending, if any."""
        offered = 0
        for client in clients:
            offered += 1
            if client.offer(blob):
                if pending is None:
                    pending = Pending(arrived, self.delivery_times)
                pending.waiting += 1
                client.track(pending)
        self.offered += messages * offered
        self.offered_bytes += len(blob) * offered
        return pending

    def ping_all(self) -> None:
        """Offer every client the next keep-alive (its encoding's ping, ``1``, ``2``, …)."""
        self._ping_counter += 1
        made: dict[Encoding, bytes] = {}

        def ping(encoding: Encoding) -> bytes:
            message = made.get(encoding)
            if message is None:
                message = made[encoding] = encoding.ping(self._ping_counter)
            return message

        for stream in self._streams.values():
            message = ping(stream.encoding)
            for client in stream.clients():
                client.offer(message)
        for client, encoding in list(self._loose.items()):
            client.offer(ping(encoding))

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self._clients):
            client.close(code, reason)


#: What making an entry's position the first time costs, in filter cost units: the position's
#: seal took ~5 µs here.
_SEAL_UNITS = 17


def _parse_units(payload: bytes) -> int:
    """What parsing a payload costs, in filter cost units: orjson took 1.4 µs plus 0.5 µs per
    KiB here (5 units, and 2 per KiB at 0.3 µs a unit)."""
    return 5 + len(payload) // 512


def _replay(history: History, entries: Iterable[Entry], filter_set: Filters
            ) -> list[Entry] | None:
    """The entries a resume replays; None when a filtered one would do more than
    :data:`REPLAY_WORK` (the client is told ``expired``)."""
    if not filter_set:
        return list(entries)
    replay = []
    per_entry = sum(map(filters.cost, filter_set))
    work = 0
    for entry in entries:
        payload = entry.payload
        work += per_entry + _parse_units(payload)
        if work > REPLAY_WORK:
            return None
        if filters.matches(filter_set, filters.Document(payload, envelope.parse(payload))):
            if entry.position is None:  # Its position is sealed when replayed (~5 µs).
                work += _SEAL_UNITS
                if work > REPLAY_WORK:
                    return None
            replay.append(entry)
    return replay


class _Batch:
    """One publish's messages, and their bytes per encoding, each made once when first needed.

    ``texts``: the payloads delivered to someone; ``entries``: theirs in the history (empty
    when the batch is not kept: meta events, made by this process, are delivered at the
    current position).
    """

    __slots__ = ("_alone", "_encoded", "_history", "_positions", "_sources", "entries", "texts")

    def __init__(self, texts: list[bytes], entries: list[Entry], history: History | None
                 ) -> None:
        self.texts = texts
        self.entries = entries
        self._history = history
        self._positions: list[bytes] | None = None
        self._encoded: dict[tuple[Encoding, bool], list[bytes]] = {}
        self._sources: dict[tuple[Encoding, bool], list[bytes]] = {}
        self._alone: dict[tuple[Encoding, bool], dict[int, bytes]] = {}

    def positions(self) -> list[bytes]:
        """Each message's position text (sealed once per entry)."""
        if self._positions is None:
            history = self._history
            assert history is not None, "positioned streams exist only with history on"
            if self.entries:
                self._positions = [history.position_of(entry) for entry in self.entries]
            else:
                self._positions = [history.position.encode()] * len(self.texts)
        return self._positions

    def encoded(self, encoding: Encoding, positioned: bool) -> list[bytes]:
        """Each message's bytes in ``encoding``, with positions if ``positioned``."""
        key = (encoding, positioned)
        made = self._encoded.get(key)
        if made is None:
            if positioned:
                delivery = encoding.delivery
                made = [b"".join(delivery(position, text))
                        for position, text in zip(self.positions(), self.texts, strict=True)]
            else:
                made = list(map(encoding.message, self.texts))
            self._encoded[key] = made
        return made

    def sources(self, encoding: Encoding, positioned: bool) -> list[bytes]:
        """Each message's text before ``encoding`` frames it: what a compressor takes."""
        if not positioned:
            return self.texts
        key = (encoding, positioned)
        made = self._sources.get(key)
        if made is None:
            text = encoding.delivery_text
            made = self._sources[key] = [
                text(position, payload)
                for position, payload in zip(self.positions(), self.texts, strict=True)]
        return made

    def alone(self, encoding: Encoding, positioned: bool, chosen: list[int]) -> list[bytes]:
        """The messages ``chosen``, each compressed on its own, made once per batch."""
        key = (encoding, positioned)
        cache = self._alone.get(key)
        if cache is None:
            cache = self._alone[key] = {}
        sources = self.sources(encoding, positioned)
        found = []
        for m in chosen:
            message = cache.get(m)
            if message is None:
                message = cache[m] = encoding.compressed(deflate.alone(sources[m]))
            found.append(message)
        return found


def _read_again(messages: Sequence[tuple[int, int, bytes]], channels: Collection[str],
                filter_set: Filters, listen: str) -> list[tuple[int, int, bytes]] | None:
    """The messages a resume replays from what the source read again: those of ``channels``
    that pass ``filter_set``; None beyond :data:`BACKFILL_MESSAGES` or :data:`REPLAY_WORK`."""
    if len(messages) > BACKFILL_MESSAGES:
        return None
    per_message = sum(map(filters.cost, filter_set))
    work = 0
    found = []
    for message in messages:
        payload = message[2]
        document = envelope.parse(payload)
        if envelope.channel_of(document, listen) not in channels:
            continue
        if filter_set:
            work += per_message + _parse_units(payload)
            if work > REPLAY_WORK:
                return None
            if not filters.matches(filter_set, filters.Document(payload, document)):
                continue
        found.append(message)
    return found


def _join(parts: list[bytes], chosen: list[int] | None) -> bytes:
    """The messages ``chosen`` of ``parts`` (all when None) as one bytes object; a single one
    is returned as is, so a one-message batch shares the very bytes object."""
    if chosen is not None:
        if len(chosen) == 1:
            return parts[chosen[0]]
        parts = [parts[m] for m in chosen]
    return parts[0] if len(parts) == 1 else b"".join(parts)
