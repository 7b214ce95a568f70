"""WebSocket frames the server sends, built as bytes once (RFC 6455 section 5.2), and the one
client frame the server recognises without a parser: pongs.

Theory of operation
-------------------
Server-to-client frames are never masked, so a frame is a fixed function of (opcode, RSV1,
payload): a 2-, 4- or 10-byte header followed by the payload. That is what lets the hub build a
notification's frame once and hand the very same bytes object to every subscriber. RSV1 marks a
message compressed with permessage-deflate (RFC 7692 section 6); its payload is what
:class:`relay.wire.deflate.Deflater` made of the text, shared in the same way by every compressed
client of a stream. wsproto parses what clients send; the send side is these few lines because
wsproto builds frames per connection object, and the point here is one frame for all
connections.

:class:`TextFrames` is the hub's :class:`relay.core.encoding.Encoding` for WebSocket clients
(:data:`TEXT_FRAMES`): a message is one text frame, a positioned delivery the resume
protocol's text (:func:`relay.wire.positions.delivery`) in one.

:func:`client_pongs` answers one question for a resting connection
(:mod:`relay.transports.idle`): are these bytes nothing but whole pongs? Every client answers
every server ping, so at a million connections and one ping each 30 s that is 33,000 pongs a
second, which a parser per connection (and a task to run it) would spend most of two cores on.

Pure functions; no sockets.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence

from relay.wire import positions

_FIN = 0x80
#: RSV1: "this message is compressed" once permessage-deflate is agreed (RFC 7692 6).
_RSV1 = 0x40
_OP_TEXT = 0x1
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA

#: Control frames carry at most 125 payload bytes (RFC 6455 5.5).
_CONTROL_MAX = 125


def _header(opcode: int, size: int) -> bytes:
    """``opcode`` may carry RSV bits too: it is the first byte without FIN."""
    if size < 126:
        return bytes((_FIN | opcode, size))
    if size < 1 << 16:
        return struct.pack("!BBH", _FIN | opcode, 126, size)
    return struct.pack("!BBQ", _FIN | opcode, 127, size)


def _frame(opcode: int, payload: bytes) -> bytes:
    return _header(opcode, len(payload)) + payload


@functools.lru_cache(maxsize=4096)
def _text_header(size: int) -> bytes:
    """A text frame's header, shared: a replay holds one per frame it queues (4,096 sizes
    cached: a few hundred KiB at most)."""
    return _header(_OP_TEXT, size)


def text(payload: bytes) -> bytes:
    """A final text frame; ``payload`` must already be UTF-8."""
    return _frame(_OP_TEXT, payload)


def compressed_text(deflated: bytes) -> bytes:
    """A final text frame with RSV1 set; ``deflated``: the message after RFC 7692 7.2.1."""
    return _frame(_RSV1 | _OP_TEXT, deflated)


def ping(payload: bytes) -> bytes:
    """A ping frame; the payload is cut to what a control frame carries."""
    return _frame(_OP_PING, payload[:_CONTROL_MAX])


def pong(payload: bytes) -> bytes:
    """The pong answering a ping with ``payload``."""
    return _frame(_OP_PONG, payload[:_CONTROL_MAX])


def close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame, on a character boundary."""
    encoded = reason.encode()[: _CONTROL_MAX - 2].decode("utf-8", "ignore").encode()
    return _frame(_OP_CLOSE, struct.pack("!H", code) + encoded)


def client_pongs(data: bytes) -> int:
    """How many pongs ``data`` is, if it is nothing but whole, well-formed client pongs
    (FIN, no RSV bits, masked, at most 125 bytes of payload); else 0. Nothing is unmasked: a
    pong's payload is not read."""
    count, at, size = 0, 0, len(data)
    while at < size:
        if size - at < 2 or data[at] != _FIN | _OP_PONG:
            return 0
        second = data[at + 1]
        length = second & 0x7F
        if not second & 0x80 or length > _CONTROL_MAX:
            return 0
        at += 6 + length  # Header and masking key, then the payload.
        count += 1
    return count if at == size else 0


def payload_of(frame: bytes) -> bytes:
    """The payload of a frame built here (its header is 2, 4 or 10 bytes)."""
    size = frame[1] & 0x7F
    return frame[2 if size < 126 else 4 if size == 126 else 10:]


class TextFrames:
    """WebSocket text frames: the hub's encoding for the WebSocket transport."""

    __slots__ = ()

    def message(self, text: bytes) -> bytes:
        return _frame(_OP_TEXT, text)

    def event(self, name: str, position: str, text: bytes) -> bytes:
        """A text frame of the event's JSON (which names it and its position)."""
        return _frame(_OP_TEXT, text)

    def delivery(self, position: bytes, payload: bytes) -> Sequence[bytes]:
        """The frame as four parts: its header, the position, a line feed, the payload; all
        but the line feed are objects a replay shares with the history or other replays."""
        return (_text_header(len(position) + 1 + len(payload)), position, b"\n", payload)

    def delivery_text(self, position: bytes, payload: bytes) -> bytes:
        return positions.delivery(position, payload)

    def compressed(self, deflated: bytes) -> bytes:
        return compressed_text(deflated)

    def ping(self, counter: int) -> bytes:
        """A ping frame whose payload is the counter in decimal (``1``, ``2``, … as
        postgres-websockets)."""
        return ping(str(counter).encode())


#: The one instance streams are keyed by.
TEXT_FRAMES = TextFrames()
