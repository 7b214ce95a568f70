"""permessage-deflate (RFC 7692) on the way in: a client's compressed messages, inflated.

Theory of operation
-------------------
:class:`InboundDeflate` is a wsproto extension for the server's ``FrameProtocol``
(wsproto parses client frames; its own ``PerMessageDeflate`` is not used). The response always
carries ``client_no_context_takeover``, so each compressed client message is a deflate stream of
its own: its inflater lives from the message's first frame to its last, and an idle connection
holds no zlib state. A message never inflates to more than ``max_message_size`` bytes: zlib is
asked for at most one byte past what is left, and one byte past is 1009. Data that does not
inflate is 1007, RSV1 where RFC 7692 section 6 forbids it (control and continuation frames) 1002.

Negotiation and the server's own compression are :mod:`relay.wire.deflate`'s (which imports no
wsproto, so the pure core may use it); this module is wsproto's extension interface, used by
the WebSocket transport's frame parser.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import Extension
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from relay.wire.deflate import TAIL, WINDOW_BITS

#: The reserved bits this extension gives a meaning: RSV1, "Per-Message Compressed" (RFC 7692
#: section 6). wsproto fails any frame with another reserved bit set.
_RSV1 = RsvBits(True, False, False)


class InboundDeflate(Extension):
    """Inflates the client's compressed messages (RSV1 on a message's first frame) for wsproto's
    FrameProtocol, never to more than ``max_message_size`` bytes per message.

    Beyond it the frame fails with 1009 (MESSAGE_TOO_BIG), and nothing more of it is inflated:
    zlib is never asked for more than one byte past what the message may still take, so a
    compression bomb costs at most ``max_message_size`` + 1 bytes. Data that does not inflate
    fails with 1007 (INVALID_FRAME_PAYLOAD_DATA), as wsproto's own extension does; RFC 7692
    names no code for it and RFC 6455 7.4.1 gives 1007 to data "not consistent with the type of
    the message". RSV1 on a control frame or a continuation frame fails with 1002
    (PROTOCOL_ERROR): RFC 7692 section 6, "An endpoint receiving such a frame MUST _Fail the
    WebSocket Connection_".

    The response always has client_no_context_takeover, so the inflater is made at the start of
    each compressed message and dropped at its end. Bytes after a final deflate block (BFINAL,
    RFC 7692 7.2.3.4, whose example has one such byte) are ignored: never fed to zlib, so
    never kept past the read they came in. Nothing is compressed on the way out: the server's
    frames come from :mod:`relay.wire.frames`.
    """

    name = "permessage-deflate"

    # Set by each frame's header, before its payload: whether the frame is a data frame (not a
    # control frame), and, at a message's first frame, the bytes the message may inflate to.
    _data_frame: bool
    _room: int

    def __init__(self, max_message_size: int) -> None:
        self._limit = max_message_size
        # The inflater of the compressed message under way; None between messages and during
        # uncompressed ones (a continuation frame may come first, and is then 1002 from wsproto).
        self._inflater: zlib._Decompress | None = None

    def enabled(self) -> bool:
        return True

    def offer(self) -> str:
        # Not used by a server. As a client's offer: messages from the server must each stand
        # alone, which is what the per-message inflater decodes.
        return "server_no_context_takeover"

    def frame_inbound_header(self, proto: FrameDecoder | FrameProtocol, opcode: Opcode,
                             rsv: RsvBits, payload_length: int) -> CloseReason | RsvBits:
        # wsproto may call this twice for one frame (again when the masking key had not arrived
        # yet); that only makes a second inflater before any payload.
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:  # A message's first frame.
            self._inflater = zlib.decompressobj(-WINDOW_BITS) if rsv.rsv1 else None
            self._room = self._limit
        elif rsv.rsv1:
            return CloseReason.PROTOCOL_ERROR
        self._data_frame = not opcode.iscontrol()
        return _RSV1

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol,
                                   data: bytes) -> bytes | CloseReason:
        if self._data_frame and self._inflater is not None:
            return self._inflate(self._inflater, data)
        return data

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol,
                               fin: bool) -> bytes | CloseReason | None:
        inflater = self._inflater
        if not (fin and self._data_frame and inflater is not None):
            return None
        self._inflater = None
        return self._inflate(inflater, TAIL)  # RFC 7692 7.2.2.

    def _inflate(self, inflater: zlib._Decompress, data: bytes) -> bytes | CloseReason:
        if inflater.eof:  # The deflate stream has ended: the rest is not fed to zlib, not kept.
            return b""
        try:
            # At most one byte more than the message may take (0 would mean no limit).
            out = inflater.decompress(data, self._room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._room -= len(out)
        if self._room < 0:
            return CloseReason.MESSAGE_TOO_BIG
        return out
