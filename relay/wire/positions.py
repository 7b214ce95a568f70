"""The resume protocol's text: positions, deliveries and control events (shared by both ends).

Theory of operation
-------------------
A client that offers the WebSocket subprotocol :data:`SUBPROTOCOL` gets every delivery with its
*position*, and may come back with the last position it saw (query parameter
:data:`FROM_PARAMETER`) to receive what it missed. A client that does not offer it gets today's
bytes, byte for byte (the drop-in promise).

A position names one point of the relay's stream of notifications (every notification on the
listen channel, in PostgreSQL's commit order, whatever its WebSocket channel)::

    EEEEEEEE.S.DDDDDDDDDDDDDDDD.TTTTTTTT
    epoch    seq   digest   time

- *epoch* (8 hex digits): chosen at random when the relay process starts; with *seq* (hex,
  1-16 digits), the number of the point in that process, it lets the same process find the
  point at once and tell "fell out of the history" exactly.
- *digest* (16 hex digits): a hash of the last :data:`WINDOW` notifications' payloads up to
  and including this one. Every relay process listening on the same database sees the same
  notifications in the same order, so every one computes the same digest for the same point,
  without talking to the others: a relay that did not issue the position finds it by digest.
- *time* (8 hex digits): when the issuing relay received the notification, in Unix seconds.
  Another relay takes a digest only from a notification it received within
  ``CLOCK_SKEW`` seconds of that, so a run of payloads that repeats later cannot be mistaken
  for the one the client saw; and a position older than every relay's history is ``expired``.

Messages from the relay, under the subprotocol (all text):

- a delivery: ``POSITION "\\n" PAYLOAD``, the notification's payload unchanged;
- a control event, a JSON object (it starts with ``{``, which no position does)::

    {"event":"position","position":P}            where you are (at connect, and now and then)
    {"event":"resumed","position":P,"replayed":N} resume from P: N missed deliveries follow
                                                 (no "replayed" when the relay reads them
                                                 from its source in steps: a NATS stream)
    {"event":"lost","reason":R,"position":P}     not lossless: re-read your state; the stream
                                                 goes on after P

  with R one of :data:`LOST_REASONS`: ``expired`` (the position fell out of the history),
  ``gap`` (the relay was without LISTEN after it: PostgreSQL kept nothing), ``unknown`` (no
  relay process here knows it, even after waiting for it).

Pure functions and constants; no sockets. The server never imports the client library, and
both import this.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any, NamedTuple

#: The subprotocol a client offers (Sec-WebSocket-Protocol) to receive positions.
SUBPROTOCOL = "pgws.resume.v1"

#: The query parameter carrying the position to resume after.
FROM_PARAMETER = "from"

#: Notifications hashed into a position's digest: enough that a run of identical payloads
#: rarely makes two points of the history look alike (ambiguous digests are "unknown"),
#: few enough that a relay which just started or lost LISTEN matches its peers again soon.
WINDOW = 8

EXPIRED = "expired"
GAP = "gap"
UNKNOWN = "unknown"
LOST_REASONS = (EXPIRED, GAP, UNKNOWN)

#: The longest position text: 8 + 1 + 16 + 1 + 16 + 1 + 8.
MAX_POSITION_LENGTH = 51

#: Seconds two relay processes' clocks (and receipt of one notification) may differ by for a
#: position of one to be taken by the other: NTP keeps hosts well within it.
CLOCK_SKEW = 10

_POSITION = re.compile(r"([0-9a-f]{8})\.([0-9a-f]{1,16})\.([0-9a-f]{16})\.([0-9a-f]{8})")


class Position(NamedTuple):
    """A point of one relay process's stream: its epoch, its sequence number, its digest, and
    when it was received (Unix seconds)."""

    epoch: int
    seq: int
    digest: int
    time: int = 0

    def text(self) -> str:
        return f"{self.epoch:08x}.{self.seq:x}.{self.digest:016x}.{self.time:08x}"


def parse_position(text: str) -> Position | None:
    """The position ``text`` spells in the clear (no :class:`Sealer`), or None when it is not
    one. A client uses it to check the grammar only: a sealed position's fields are noise."""
    match = _POSITION.fullmatch(text)
    if match is None:
        return None
    epoch, seq, digest, time = (int(group, 16) for group in match.groups())
    return Position(epoch, seq, digest, time)


#: Bytes of a position's fields, sealed as one block: epoch 4, seq 8, digest 8, time 4.
_SEALED_BYTES = 24
_HALF = _SEALED_BYTES // 2
#: Feistel rounds: four rounds of a pseudorandom function make a strong pseudorandom
#: permutation (Luby and Rackoff), here over the whole 24 bytes.
_ROUNDS = 4
#: Bytes of key a :class:`Sealer` needs at least (a shorter one is a start-up error).
MIN_KEY_BYTES = 16


class Sealer:
    """Positions as clients see them: sealed with a key, so they reveal nothing a client could
    not compute from what it may read.

    In the clear a position holds the digest of the last payloads of the whole listen stream
    (a client could test guesses of payloads its filters or its channels hide from it), the
    number of notifications the process has seen (how many other channels had) and when.
    Sealed, the same 24 bytes (epoch, seq, digest, time) go through a four-round Feistel
    network whose round function is keyed BLAKE2b: a pseudorandom permutation, so the text is
    noise to whoever lacks the key, and deterministic, so one point seals to one text on every
    relay that shares the key and sees the point with the same fields. The text keeps the
    grammar clients check (``8.16.16.8`` hex digits, 51 characters), so clients work unchanged.

    There is no authentication: a made-up text opens to random fields, which name no point
    (``unknown``, or ``expired``), never another client's data: a replay is filtered by the
    resuming client's own grant. ``keys``: the key to seal with, then earlier ones that may
    still open positions (a rotation); each at least :data:`MIN_KEY_BYTES`.
    """

    __slots__ = ("_rounds",)

    def __init__(self, keys: list[bytes]) -> None:
        if not keys or any(len(key) < MIN_KEY_BYTES for key in keys):
            raise ValueError(f"a position key needs at least {MIN_KEY_BYTES} bytes")
        # Per key, the round functions' hashers, keyed once: each use copies one (a copy costs
        # less than keying BLAKE2b anew, and sealing runs once per notification).
        self._rounds = [[hashlib.blake2b(key=hashlib.blake2b(key, digest_size=32,
                                                             person=b"pgws-position").digest(),
                                          digest_size=_HALF, person=b"pgws-round-%d" % index)
                         for index in range(_ROUNDS)] for key in keys]

    def seal(self, position: Position) -> str:
        block = struct.pack("!IQQI", position.epoch, position.seq, position.digest,
                            position.time)
        left, right = block[:_HALF], block[_HALF:]
        for hasher in self._rounds[0]:
            mixed = hasher.copy()
            mixed.update(right)
            left, right = right, _xor(left, mixed.digest())
        text = (left + right).hex()
        return f"{text[:8]}.{text[8:24]}.{text[24:40]}.{text[40:]}"

    def open(self, text: str) -> list[Position]:
        """What ``text`` opens to under each key, the current one first; [] when it is not a
        position at all. Only the reader knows which one names a point it has seen."""
        match = _POSITION.fullmatch(text)
        if match is None:
            return []
        epoch, seq, digest, time = match.groups()
        block = bytes.fromhex(epoch + seq.rjust(16, "0") + digest + time)
        found = []
        for rounds in self._rounds:
            left, right = block[:_HALF], block[_HALF:]
            for hasher in reversed(rounds):
                mixed = hasher.copy()
                mixed.update(left)
                left, right = _xor(right, mixed.digest()), left
            found.append(Position(*struct.unpack("!IQQI", left + right)))
        return found


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(_HALF, "big")


# -- what the relay sends ------------------------------------------------------------------------

def delivery(position: bytes, payload: bytes) -> bytes:
    """A delivery's text: the position, a line feed, the payload."""
    return position + b"\n" + payload


def position_event(position: str) -> bytes:
    """The control event that says where the stream is (at connect, and at checkpoints)."""
    return b'{"event":"position","position":"%s"}' % position.encode()


def resumed_event(position: str, replayed: int | None) -> bytes:
    """The control event of a lossless resume from ``position``: ``replayed`` deliveries
    follow (None: not known yet, when the relay reads them from its source in steps)."""
    if replayed is None:
        return b'{"event":"resumed","position":"%s"}' % position.encode()
    return b'{"event":"resumed","position":"%s","replayed":%d}' % (position.encode(), replayed)


def token_event(exp: float | None) -> bytes:
    """The answer to a client's token refresh that was taken: the connection now ends at
    ``exp`` (Unix seconds; None: never)."""
    return b'{"event":"token","exp":%s}' % (b"null" if exp is None else
                                             json.dumps(exp).encode())


def token_refused_event(reason: str) -> bytes:
    """The answer to a client's token refresh that was not taken; the old token holds."""
    return b'{"event":"token-refused","reason":%s}' % json.dumps(reason).encode()


def lost_event(reason: str, position: str) -> bytes:
    """The control event of a stream that is not lossless (``reason``: one of
    :data:`LOST_REASONS`); it goes on after ``position``."""
    return b'{"event":"lost","reason":"%s","position":"%s"}' % (reason.encode(),
                                                                 position.encode())


# -- what the client reads -----------------------------------------------------------------------

class Delivery(NamedTuple):
    position: str
    payload: str


class Control(NamedTuple):
    """A control event: ``event`` is ``position``, ``resumed`` or ``lost``."""

    event: str
    position: str
    reason: str | None = None
    replayed: int | None = None


class ProtocolError(ValueError):
    """A message that is neither a delivery nor a control event of this protocol."""


#: Characters of a control event a client reads at most: the relay's are under 200, and a
#: hostile server's must cost the client no parse of a megabyte (nor a recursion of its depth).
MAX_CONTROL_LENGTH = 1024


def read(message: str) -> Delivery | Control:
    """One message from the relay, under the subprotocol. Raises :class:`ProtocolError` (and
    nothing else) for anything else, however deep or long."""
    if message.startswith("{"):
        if len(message) > MAX_CONTROL_LENGTH:
            raise ProtocolError(f"a control event of {len(message)} characters")
        try:
            fields: Any = json.loads(message)
        except (ValueError, RecursionError):
            raise ProtocolError("a control event that is not JSON") from None
        if not isinstance(fields, dict) or fields.get("event") not in (
                "position", "resumed", "lost") or not _is_position(fields.get("position")):
            raise ProtocolError(f"not a control event: {message[:80]!r}")
        reason = fields.get("reason")
        if fields["event"] == "lost" and reason not in LOST_REASONS:
            raise ProtocolError(f"unknown reason in {message[:80]!r}")
        replayed = fields.get("replayed")
        return Control(fields["event"], fields["position"], reason,
                       replayed if isinstance(replayed, int) else None)
    position, newline, payload = message.partition("\n")
    if not newline or not _is_position(position):
        raise ProtocolError(f"a delivery without a position: {message[:80]!r}")
    return Delivery(position, payload)


def _is_position(value: object) -> bool:
    return isinstance(value, str) and _POSITION.fullmatch(value) is not None
