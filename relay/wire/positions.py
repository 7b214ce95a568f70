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
    {"event":"lost","reason":R,"position":P}     not lossless: re-read your state; the stream
                                                 goes on after P

  with R one of :data:`LOST_REASONS`: ``expired`` (the position fell out of the history),
  ``gap`` (the relay was without LISTEN after it: PostgreSQL kept nothing), ``unknown`` (no
  relay process here knows it, even after waiting for it).

Pure functions and constants; no sockets. The server never imports the client library, and
both import this.
"""

from __future__ import annotations

import json
import re
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
    """The position ``text`` spells, or None when it is not one."""
    match = _POSITION.fullmatch(text)
    if match is None:
        return None
    epoch, seq, digest, time = (int(group, 16) for group in match.groups())
    return Position(epoch, seq, digest, time)


# -- what the relay sends ------------------------------------------------------------------------

def delivery(position: bytes, payload: bytes) -> bytes:
    """A delivery's text: the position, a line feed, the payload."""
    return position + b"\n" + payload


def position_event(position: str) -> bytes:
    return b'{"event":"position","position":"%s"}' % position.encode()


def resumed_event(position: str, replayed: int) -> bytes:
    return b'{"event":"resumed","position":"%s","replayed":%d}' % (position.encode(), replayed)


def lost_event(reason: str, position: str) -> bytes:
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
