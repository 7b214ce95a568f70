"""PostgreSQL's logical replication stream, as the WAL source reads it: bytes in, messages out.

Theory of operation
-------------------
After ``START_REPLICATION SLOT s LOGICAL …`` with the built-in ``pgoutput`` plugin
(``proto_version '1'``, ``messages 'true'``), the server sends CopyData messages of two kinds
(https://www.postgresql.org/docs/15/protocol-replication.html):

- ``w`` XLogData: the WAL position of the data, the server's end of WAL, its clock, then one
  pgoutput message (https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html);
- ``k`` primary keepalive: the server's end of WAL, its clock, and whether it wants a reply now.

The client answers with ``r`` standby status updates: the positions it has written, flushed
and applied (:func:`standby_status`). The slot's *confirmed* position is the flushed one: after a
reconnection the server starts after it.

Of pgoutput's messages only three matter here, because the relay's publication publishes no
table: ``B`` (a transaction begins: its final LSN, commit time, xid), ``M`` (a logical decoding
message, from ``pg_logical_emit_message``: transactional or not, its LSN, its prefix, its
content) and ``C`` (it committed: the commit's LSN and the transaction's end). Logical decoding
hands transactions over in commit order and only once committed, so a transactional message is
delivered with its transaction, at its commit, or never (a rollback). :class:`Transactions` puts
those together: feed it pgoutput messages, and it gives each committed transaction's messages
with the given prefix, in order, with the commit's LSN. Everything else (other prefixes,
non-transactional messages, relation and type messages, origins) is skipped.

Pure functions and one small state machine; no sockets. The WAL source
(:mod:`relay.sources.wal`) does the I/O.
"""

from __future__ import annotations

import dataclasses
import struct

#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), for the clocks in the
#: replication protocol.
PG_EPOCH_OFFSET_US = 946_684_800_000_000

_XLOG_DATA = struct.Struct("!cQQQ")      # 'w', start, end of WAL, send time
_KEEPALIVE = struct.Struct("!cQQB")      # 'k', end of WAL, send time, reply requested
_STATUS = struct.Struct("!cQQQQB")       # 'r', written, flushed, applied, send time, reply
_BEGIN = struct.Struct("!cQqI")          # 'B', final LSN, commit time, xid
_COMMIT = struct.Struct("!cBQQq")        # 'C', flags, commit LSN, end LSN, commit time
_MESSAGE_HEAD = struct.Struct("!cBQ")    # 'M', flags (1: transactional), LSN


class ProtocolError(Exception):
    """The server sent something this reader does not understand: the connection is dropped."""


@dataclasses.dataclass(frozen=True, slots=True)
class XLogData:
    """One pgoutput message and where it is in the log."""

    start: int
    wal_end: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Keepalive:
    """The server's end of WAL; ``reply``: it wants a status update now (it may be stopping)."""

    wal_end: int
    reply: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Committed:
    """A committed transaction's messages with the prefix, in order.

    ``lsn``: the commit record's; ``end``: the transaction's end (what the slot may confirm
    once it is delivered); ``time``: the commit's, in Unix microseconds.
    """

    lsn: int
    end: int
    time: int
    messages: tuple[bytes, ...]
    #: Each message's index among the transaction's messages with the prefix, those over the
    #: bound included: the same on every reader, whatever its bound.
    indices: tuple[int, ...] = ()


def read_copy_data(data: bytes) -> XLogData | Keepalive:
    """One CopyData message of the replication stream; :class:`ProtocolError` otherwise."""
    kind = data[:1]
    try:
        if kind == b"w":
            _, start, wal_end, _ = _XLOG_DATA.unpack_from(data)
            return XLogData(start, wal_end, bytes(data[_XLOG_DATA.size:]))
        if kind == b"k":
            _, wal_end, _, reply = _KEEPALIVE.unpack_from(data)
            return Keepalive(wal_end, bool(reply))
    except struct.error:
        raise ProtocolError(f"a short {kind!r} message ({len(data)} bytes)") from None
    raise ProtocolError(f"an unknown replication message {kind!r}")


def standby_status(flushed: int, now_us: int, reply: bool = False) -> bytes:
    """The status update that confirms ``flushed`` (written and applied alike)."""
    return _STATUS.pack(b"r", flushed, flushed, flushed, now_us - PG_EPOCH_OFFSET_US,
                        1 if reply else 0)


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL writes it: ``16/B374D848``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """The LSN PostgreSQL wrote as ``16/B374D848``; ValueError otherwise."""
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return int(high, 16) << 32 | int(low, 16)


class Transactions:
    """pgoutput messages in, committed transactions' messages with ``prefix`` out.

    ``max_bytes``: a message whose content is larger is not kept; its transaction is still
    given, with :attr:`Committed.messages` short of it, and :attr:`oversized` counts it (the
    caller reports the loss). ``after``: transactions that commit at or before this LSN were
    delivered already (a reconnection may send them again) and are skipped.
    """

    __slots__ = ("_in_transaction", "_indices", "_messages", "_prefix", "_seen", "after",
                 "max_bytes", "oversized", "skipped")

    def __init__(self, prefix: str, max_bytes: int, after: int = 0) -> None:
        self._prefix = prefix.encode()
        self.max_bytes = max_bytes
        self.after = after
        self._in_transaction = False
        self._messages: list[bytes] = []
        self._indices: list[int] = []
        self._seen = 0  # Messages with the prefix in the transaction so far.
        #: Messages over ``max_bytes`` (dropped), and transactions skipped as seen before.
        self.oversized = 0
        self.skipped = 0

    @property
    def in_transaction(self) -> bool:
        """A transaction's beginning was read and its commit not yet."""
        return self._in_transaction

    def reset(self) -> None:
        """The connection was lost: a transaction it was reading is sent again whole."""
        self._in_transaction = False
        self._messages = []
        self._indices = []
        self._seen = 0

    def feed(self, data: bytes) -> Committed | None:
        """One pgoutput message; the transaction's messages when ``data`` commits it."""
        kind = data[:1]
        try:
            if kind == b"B":
                _BEGIN.unpack_from(data)
                self._in_transaction = True
                self._messages = []
                self._indices = []
                self._seen = 0
                return None
            if kind == b"M":
                self._message(data)
                return None
            if kind == b"C":
                _, _, lsn, end, when = _COMMIT.unpack_from(data)
                return self._commit(lsn, end, when)
        except struct.error:
            raise ProtocolError(f"a short pgoutput {kind!r} message ({len(data)} bytes)") \
                from None
        return None  # Relation, type, origin, …: nothing of the relay's.

    def _message(self, data: bytes) -> None:
        _, flags, _ = _MESSAGE_HEAD.unpack_from(data)
        if not flags & 1 or not self._in_transaction:
            return  # Non-transactional: sent even when its transaction rolls back.
        start = _MESSAGE_HEAD.size
        end = data.find(b"\0", start)
        if end < 0:
            raise ProtocolError("a logical message without the end of its prefix")
        if data[start:end] != self._prefix:
            return
        (length,) = struct.unpack_from("!I", data, end + 1)
        content = data[end + 5:end + 5 + length]
        if len(content) != length:
            raise ProtocolError("a logical message shorter than its length")
        index = self._seen
        self._seen += 1
        if length > self.max_bytes:
            self.oversized += 1
            return
        self._messages.append(bytes(content))
        self._indices.append(index)

    def _commit(self, lsn: int, end: int, when: int) -> Committed | None:
        messages, self._messages = self._messages, []
        indices, self._indices = self._indices, []
        self._in_transaction = False
        self._seen = 0
        if lsn <= self.after:
            self.skipped += 1
            return None
        self.after = lsn
        return Committed(lsn, end, when + PG_EPOCH_OFFSET_US, tuple(messages), tuple(indices))
