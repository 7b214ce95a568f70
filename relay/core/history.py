"""History: the last deliveries of each channel, their positions, and "can this position resume?".

Theory of operation
-------------------
Every notification the listener hands over is a point of one stream, numbered by ``seq`` in
this process and named across processes by a digest of the last
:data:`relay.wire.positions.WINDOW` payloads (:mod:`relay.wire.positions` spells both).
:meth:`append`
gives the point its position and keeps its payload; the position's text (sealed, when positions
are sealed) is made once, when a positioned client or a replay first needs it
(:meth:`position_of`), and kept with the payload. What a client receives is built from those two
by its stream's encoding (:mod:`relay.core.encoding`): the history keeps no transport's bytes.
Each channel keeps its own log, so a busy channel does not push
a quiet one's history out; what is kept is bounded three ways:

- ``messages`` per channel (the oldest of the channel goes first);
- ``max_bytes`` for all channels together, counting each entry as its payload and position
  plus :data:`ENTRY_OVERHEAD` (the objects that hold them), so the bound is the memory, not just the
  payloads (the oldest entry of all goes first);
- ``max_age`` seconds (entries older than that go, at the next append or :meth:`expire`).

A channel's log remembers ``complete_after``: the seq of the last entry it dropped. A position
at seq S can resume a set of channels losslessly when no channel dropped anything after S and
LISTEN was in place all along: every *break* (each time LISTEN is established, the first time
included) takes a seq of its own, and a position before the last break cannot resume.

:meth:`resolve` answers, for a position and a set of channels: resume after seq S, or one of
the reasons of :mod:`relay.wire.positions` (expired, gap, unknown), or :data:`WAIT`: a position of
another process whose digest this one has not seen (yet: its LISTEN may lag the other's by a
few milliseconds). A digest is taken only from an entry received within
:data:`relay.wire.positions.CLOCK_SKEW` seconds of the position's time, and only when it names one
entry: a run of identical payloads that repeats is ``unknown``, never the wrong point.
:meth:`after` lists what a resume replays, in stream order.

*Log positions* (:meth:`adopt_log`). A source that reads a durable, ordered log (the WAL
source: a message's commit LSN and its index in the transaction) gives each notification its
place, and every relay that reads the same log gives it the same one. Then ``seq`` is that
place, ``key = LSN << 32 | index``, and a position carries it (the LSN as *seq*, the index as
*digest*, the commit's Unix second as *time*) with the log's identity as *epoch*: a position of
another log or source names no point of this one (``unknown``). A position this process has
not read up to yet is :data:`WAIT`: every point of the log arrives here in the end. No digest is
computed or indexed. The history starts at the point the source starts reading from
(``start``): positions before it are ``expired``, since what came before is no longer in the
log for this reader. :meth:`oldest` tells the source which part of the log the history still
needs, so that it can keep the log from letting it go (a restarted relay reads it again).

Rules this module keeps: it never builds anything per client and never awaits; it is the only
place where positions are made or compared. It knows nothing of sockets, streams or filters.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import heapq
import secrets
import sys
import time
from collections.abc import Collection, Iterator
from typing import Final

from relay.wire import positions
from relay.wire.positions import Position

#: Log keys: ``LSN << 32 | index`` (the index of a message within its transaction).
LOG_INDEX_BITS = 32
_LOG_INDEX_MASK = (1 << LOG_INDEX_BITS) - 1

#: Bytes charged per entry beyond its payload and position, so that ``max_bytes`` bounds the
#: process's memory: the objects that hold them (the entry, the two bytes objects' headers, the
#: log's slots and seq, the digest index's slot and ints: 299 bytes measured with tracemalloc in
#: tests/unit/core/test_history.py, up to ~340 with a log's emptied slots), and what the
#: allocator keeps on top as the history turns over (a header per object, free space between
#: blocks: at 320 bytes a full history at 1,000 channels grew the relay's RSS 1.09× the
#: bound, bench/scenarios/resume.py).
ENTRY_OVERHEAD = 512

#: Channels whose logs emptied are remembered (their ``complete_after``) up to this many; beyond
#: it the oldest is folded into one conservative floor, so channel names cannot grow memory.
_FORGOTTEN_CHANNELS = 10_000

#: Bytes charged against ``max_bytes`` for each channel name kept (from its first entry until
#: it is forgotten), beyond the name's own object: a dict's slot and node and an int (98 bytes
#: measured with tracemalloc for a remembered one), rounded up for the allocator. Without the
#: charge 10,000 forgotten names of ~8 KB held 78 MiB under a 1 MiB bound.
_NAME_OVERHEAD = 128


#: What :meth:`History.resolve` gives for a position another process issued and this one has
#: not seen: the caller may wait for it to arrive.
WAIT: Final = "wait"

_Digest = bytes  # 8 bytes


class Entry:
    """One delivery kept: its seq, its digest, its time, its payload, when it arrived.

    Its position's text is made the first time someone needs it (:meth:`History.position_of`:
    a positioned stream, a replay), because sealing it costs ~5 µs.
    """

    __slots__ = ("arrived", "digest", "payload", "position", "seq", "size", "time")

    def __init__(self, seq: int, digest: int, time: int, payload: bytes, arrived: float,
                 size: int) -> None:
        self.seq = seq
        self.digest = digest
        self.time = time
        self.payload = payload
        #: The position's text as clients see it; None until first needed.
        self.position: bytes | None = None
        self.arrived = arrived
        #: What it is charged against ``max_bytes``: its payload's and position's lengths (made
        #: or not) and :data:`ENTRY_OVERHEAD`.
        self.size = size


#: What a log's slot holds once its entry is dropped (until the log compacts).
_DROPPED = Entry(-1, 0, 0, b"", 0.0, 0)


class _Log:
    """One channel's entries, oldest first, with their seqs for bisection.

    Dropping the oldest empties its slot; the dropped prefix is cut off once it is more than
    half the list, so a drop costs O(1) amortised and the empty slots (8 bytes, and their seq)
    never outnumber the entries kept, whose :data:`ENTRY_OVERHEAD` covers them.
    """

    __slots__ = ("complete_after", "entries", "seqs", "start")

    def __init__(self, complete_after: int) -> None:
        self.entries: list[Entry] = []
        self.seqs: list[int] = []
        self.start = 0  # Entries before this index were dropped.
        #: The seq of the last entry this channel dropped: it holds every entry after it.
        self.complete_after = complete_after

    def __len__(self) -> int:
        return len(self.entries) - self.start

    def head(self) -> Entry:
        return self.entries[self.start]

    def drop_head(self) -> Entry:
        entry = self.entries[self.start]
        # The slot lets go of the payload at once: what is dropped must not stay in memory.
        self.entries[self.start] = _DROPPED
        self.start += 1
        self.complete_after = entry.seq
        if self.start * 2 > len(self.entries):
            del self.entries[:self.start]
            del self.seqs[:self.start]
            self.start = 0
        return entry

    def after(self, seq: int) -> list[Entry]:
        return self.entries[bisect.bisect_right(self.seqs, seq, lo=self.start):]


class History:
    """Positions for every notification, and each channel's last deliveries within bounds.

    ``messages``: entries per channel (0: keep none; positions are still given, and a resume
    from before the head is ``expired``). ``max_bytes``: all channels together, entries counted
    with their overhead. ``max_age``: seconds an entry is kept.
    """

    def __init__(self, messages: int, max_bytes: int, max_age: float,
                 epoch: int | None = None, wall_offset: float | None = None,
                 sealer: positions.Sealer | None = None) -> None:
        self.messages = messages
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.epoch = secrets.randbits(32) if epoch is None else epoch
        #: Seals the positions clients see (None: in the clear, as the unit tests read them).
        self._sealer = sealer
        #: Unix time minus the entries' clock (``time.monotonic()``): positions carry Unix
        #: seconds, which other processes can compare.
        self._wall_offset = time.time() - time.monotonic() if wall_offset is None \
            else wall_offset
        self._clear()
        self.time = int(time.time()) if wall_offset is None else 0

    def _clear(self) -> None:
        """Nothing kept, no point of the stream yet."""
        #: The last point of the stream: a notification or a break, and its Unix second.
        self.seq = 0
        self.digest = 0
        self.time = 0
        #: The seq of the last break (LISTEN established); positions before it cannot resume.
        self.break_seq = 0
        self._window: collections.deque[_Digest] = collections.deque(maxlen=positions.WINDOW)
        self._logs: dict[str, _Log] = {}
        #: Logs that emptied: channel → complete_after, oldest first, and the floor of those
        #: forgotten beyond :data:`_FORGOTTEN_CHANNELS`.
        self._emptied: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._floor = 0
        #: (seq of a log's first entry, channel): the oldest entry of all is on top. Lazy: a
        #: pair whose channel's head has moved on is skipped when it surfaces.
        self._heads: list[tuple[int, str]] = []
        #: digest → the entry that has it, or a list when several do.
        self._by_digest: dict[int, Entry | list[Entry]] = {}
        #: Entries kept now, and their bytes (with overhead) with the channel names kept.
        self.entries = 0
        self.bytes = 0
        #: Positions are places in a log (:meth:`adopt_log`), not this process's count.
        self.log = False

    # -- positions -----------------------------------------------------------------------------

    @property
    def position(self) -> str:
        """The position of the last point of the stream (what a client that just connected has
        seen, as far as this process can tell)."""
        return self.text(self._point(self.seq, self.digest, self.time))

    def _point(self, seq: int, digest: int, time: int) -> Position:
        if self.log:
            return Position(self.epoch, seq >> LOG_INDEX_BITS, seq & _LOG_INDEX_MASK, time)
        return Position(self.epoch, seq, digest, time)

    def adopt_log(self, identity: int, start: int, now: float | None = None) -> None:
        """From now on positions are places in the log ``identity`` (32 bits: the same on every
        relay reading it), and the stream starts after ``start`` (a key: what comes at or
        before it is not read again). What the history held is dropped."""
        self._clear()
        self.epoch = identity
        self.log = True
        self.seq = start
        self._floor = start
        self.time = int((time.monotonic() if now is None else now) + self._wall_offset)

    def oldest(self) -> int | None:
        """The key of the oldest entry kept (None: none): where a log source must be able to
        start reading again for this history to be rebuilt."""
        heads = self._heads
        while heads:
            seq, channel = heads[0]
            log = self._logs.get(channel)
            if log is not None and log.head().seq == seq:
                return seq
            heapq.heappop(heads)  # Stale: that head is gone.
        return None

    def awaited(self, position: Position) -> int:
        """What a position that :meth:`resolve` answered :data:`WAIT` waits for: in a log, its
        key (it is here once ``seq`` reaches it); else its digest (an entry that has it)."""
        if self.log:
            return position.seq << LOG_INDEX_BITS | position.digest
        return position.digest

    def text(self, position: Position) -> str:
        """A position as clients see it: sealed (with a sealer), else in the clear."""
        return position.text() if self._sealer is None else self._sealer.seal(position)

    def open(self, text: str) -> Position | None:
        """The position a client sent, or None when ``text`` is not one. With an earlier key
        still accepted, the opening that names a point this process knows (its own epoch, or
        a digest it keeps) is the one meant; none: the current key's."""
        if self._sealer is None:
            return positions.parse_position(text)
        found = self._sealer.open(text)
        for position in found:
            seq = self.key_of(position) if self.log else position.seq
            if (position.epoch == self.epoch and seq <= self.seq) or \
                    position.digest in self._by_digest:
                return position
        return found[0] if found else None

    def append(self, channel: str, payload: bytes, arrived: float,
               place: tuple[int, int] | None = None) -> Entry:
        """The next notification: its position, and (if history is on) kept.

        ``place``: with log positions, its key in the log and its commit's Unix second (keys
        grow from one call to the next)."""
        if self.log:
            assert place is not None, "a log's notifications come with their place"
            return self._append_placed(channel, payload, arrived, *place)
        self.seq += 1
        self._window.append(hashlib.blake2b(payload, digest_size=8).digest())
        digest = int.from_bytes(
            hashlib.blake2b(b"".join(self._window), digest_size=8).digest(), "big")
        self.digest = digest
        self.time = int(arrived + self._wall_offset)
        position_length = positions.MAX_POSITION_LENGTH if self._sealer is not None else \
            len(Position(self.epoch, self.seq, digest, self.time).text())
        size = position_length + len(payload) + ENTRY_OVERHEAD
        entry = Entry(self.seq, digest, self.time, payload, arrived, size)
        if self.messages:
            self._keep(channel, entry)
        return entry

    def position_of(self, entry: Entry) -> bytes:
        """``entry``'s position as clients see it (sealed, with a sealer), made once."""
        position = entry.position
        if position is None:
            position = entry.position = self.text(
                self._point(entry.seq, entry.digest, entry.time)).encode()
        return position

    def _append_placed(self, channel: str, payload: bytes, arrived: float, key: int,
                       when: int) -> Entry:
        self.seq = key
        self.time = when
        position_length = positions.MAX_POSITION_LENGTH if self._sealer is not None else \
            len(self._point(key, 0, when).text())
        # Aged by its commit, not by when it was read: what a restarted relay reads back is as
        # old as it was, so the history (and what the log keeps for it) moves on.
        entry = Entry(key, key & _LOG_INDEX_MASK, when, payload,
                      min(arrived, when - self._wall_offset),
                      position_length + len(payload) + ENTRY_OVERHEAD)
        if self.messages:
            self._keep(channel, entry)
        return entry

    def mark_break(self, now: float | None = None) -> None:
        """LISTEN was (re)established: what came before may have been followed by a loss."""
        self.seq += 1
        self.break_seq = self.seq
        self.digest = 0  # Names no notification: found by no other process.
        self.time = int((time.monotonic() if now is None else now) + self._wall_offset)
        self._window.clear()

    def resolve(self, position: Position, channels: Collection[str],
                now: float | None = None) -> int | str:
        """The seq to replay after, or why not (a reason of :mod:`relay.wire.positions`, or WAIT).

        ``now``: the entries' clock (default ``time.monotonic()``), for positions of other
        processes too old for any history.
        """
        if self.log:
            if position.epoch != self.epoch or position.digest > _LOG_INDEX_MASK:
                return positions.UNKNOWN  # Another log, or another source's position.
            seq = position.seq << LOG_INDEX_BITS | position.digest
            if seq > self.seq:
                return WAIT  # Read by another relay already: it comes here too.
        elif position.epoch == self.epoch:
            seq = position.seq
            if seq > self.seq:
                return positions.UNKNOWN
        else:
            if now is None:
                now = time.monotonic()
            if position.time + positions.CLOCK_SKEW < now + self._wall_offset - self.max_age:
                return positions.EXPIRED  # Older than what any process keeps.
            found = self._by_digest.get(position.digest)
            if found is None:
                return WAIT if position.digest else positions.UNKNOWN
            if isinstance(found, list):
                return positions.UNKNOWN  # The same window twice: which one is meant?
            if abs(found.arrived + self._wall_offset - position.time) > positions.CLOCK_SKEW:
                return positions.UNKNOWN  # The same payloads again, at another time.
            seq = found.seq
        if seq < self.break_seq:
            return positions.GAP
        if not self.messages:
            return positions.EXPIRED if seq < self.seq else seq
        for channel in channels:
            if self._complete_after(channel) > seq:
                return positions.EXPIRED
        return seq

    def complete_after(self, channels: Collection[str]) -> int:
        """The seq after which the history holds every entry of ``channels``: a resume from
        before it needs what the history dropped."""
        return max([self._complete_after(channel) for channel in channels] + [self._floor])

    def key_of(self, position: Position) -> int:
        """A log position's key (:data:`LOG_INDEX_BITS`)."""
        return position.seq << LOG_INDEX_BITS | position.digest

    def position_at(self, key: int) -> Position:
        """The position of a log's key (to resolve from it)."""
        return self._point(key, key & _LOG_INDEX_MASK, self.time)

    def text_at(self, key: int, second: int) -> bytes:
        """The position text of a log's point that the history does not hold (a message read
        again from the log for a resume), as :meth:`position_of` would give it."""
        return self.text(self._point(key, key & _LOG_INDEX_MASK, second)).encode()

    def after(self, seq: int, channels: Collection[str]) -> Iterator[Entry]:
        """The entries of ``channels`` after ``seq``, in stream order."""
        parts = [log.after(seq) for channel in channels
                 if (log := self._logs.get(channel)) is not None]
        parts = [part for part in parts if part]
        if len(parts) == 1:
            return iter(parts[0])
        return heapq.merge(*parts, key=_seq_of)

    def _complete_after(self, channel: str) -> int:
        log = self._logs.get(channel)
        if log is not None:
            return log.complete_after
        return self._emptied.get(channel, self._floor)

    # -- keeping and dropping -----------------------------------------------------------------

    def _keep(self, channel: str, entry: Entry) -> None:
        log = self._logs.get(channel)
        if log is None:
            complete_after = self._emptied.pop(channel, None)
            if complete_after is None:  # A new name: charged until it is forgotten.
                complete_after = self._floor
                self.bytes += _name_size(channel)
            log = self._logs[channel] = _Log(complete_after)
            heapq.heappush(self._heads, (entry.seq, channel))
        log.entries.append(entry)
        log.seqs.append(entry.seq)
        self.entries += 1
        self.bytes += entry.size
        if not self.log:  # Log positions are found by key, not by digest.
            found = self._by_digest.get(entry.digest)
            if found is None:
                self._by_digest[entry.digest] = entry
            elif isinstance(found, list):
                found.append(entry)
            else:
                self._by_digest[entry.digest] = [found, entry]
        if len(log) > self.messages:
            self._drop(channel, log)
        while self.bytes > self.max_bytes and (self._heads or self._emptied):
            # Entries go first, oldest of all; then the names of emptied channels, oldest
            # first: folding one into the floor makes positions before it ``expired`` on every
            # channel this history has no name for, so it is the last resort.
            if self._heads:
                self._drop_oldest()
            else:
                self._forget_oldest()
        self.expire(entry.arrived)

    def expire(self, now: float) -> None:
        """Drop entries older than ``max_age`` seconds at ``now`` (the entries' clock)."""
        limit = now - self.max_age
        while self._heads:
            seq, channel = self._heads[0]
            log = self._logs.get(channel)
            if log is None or log.head().seq != seq:
                heapq.heappop(self._heads)  # Stale: that head is gone.
                continue
            if log.head().arrived >= limit:
                return
            self._drop(channel, log)

    def _drop_oldest(self) -> None:
        seq, channel = self._heads[0]
        log = self._logs.get(channel)
        if log is None or log.head().seq != seq:
            heapq.heappop(self._heads)
            return
        self._drop(channel, log)

    def _forget_oldest(self) -> None:
        """Fold the channel that emptied longest ago into the floor."""
        channel, complete_after = self._emptied.popitem(last=False)
        self.bytes -= _name_size(channel)
        self._floor = max(self._floor, complete_after)

    def _drop(self, channel: str, log: _Log) -> None:
        entry = log.drop_head()
        self.entries -= 1
        self.bytes -= entry.size
        if not self.log:
            found = self._by_digest[entry.digest]
            if isinstance(found, list):
                found.remove(entry)
                if len(found) == 1:
                    self._by_digest[entry.digest] = found[0]
            else:
                del self._by_digest[entry.digest]
        if len(log):
            heapq.heappush(self._heads, (log.head().seq, channel))
        else:
            del self._logs[channel]
            self._emptied[channel] = log.complete_after
            if len(self._emptied) > _FORGOTTEN_CHANNELS:
                self._forget_oldest()
        if len(self._heads) > 2 * len(self._logs) + 64:
            self._heads = [(log.head().seq, name) for name, log in self._logs.items()]
            heapq.heapify(self._heads)


def _seq_of(entry: Entry) -> int:
    return entry.seq


def _name_size(channel: str) -> int:
    """What a channel's name costs while its log, or its memory once emptied, is kept."""
    return sys.getsizeof(channel) + _NAME_OVERHEAD
