"""permessage-deflate (RFC 7692): its negotiation and the shared compressors (no wsproto).

Theory of operation
-------------------
Sending. A notification goes to every client of a *stream* (the clients with the same channels
and filters) as one bytes object (:mod:`relay.wire.frames`), and compression keeps it so: a stream
has one :class:`Deflater`, a raw deflate stream with context takeover, and each message is
compressed once for all of the stream's clients. A client's inflater can decode a message that
refers to nothing before it, or only to messages that this client received compressed, in
order. Hence the join rule: RFC 7692 section 6 sets RSV1 per message, so a sender may send any
message uncompressed; a client that joins a running stream gets plain frames until the stream's
next sync point (:meth:`Deflater.restart`), after which nothing refers back before it, and the
shared compressed frames from then on. Clients that asked for ``server_no_context_takeover``,
and streams beyond the hub's compressor budget, get :func:`alone`: each message compressed with
no reference to any other, which any client can decode at any time.

Receiving (a client's compressed messages) is :mod:`relay.wire.inflate`'s.

Negotiation (:func:`negotiate`) is done here, not by wsproto's ``PerMessageDeflate.accept``,
which matches parameter names by prefix, raises ``ValueError`` on a window size that is not a
number, and binds one compressor to one connection. The rules:

* Syntax (RFC 6455 section 9.1, with RFC 7230's tokens, quoted-strings and OWS): each header
  value is a comma-separated list of offers ``name *( ";" param [ "=" value ] )``, spaces or
  tabs allowed around separators, empty list elements ignored (RFC 7230 section 7); a value is a
  token or a quoted-string, unquoted before use. Several headers are one list, in their order
  (RFC 6455 section 9.1). If any header does not parse, nothing is accepted: where an offer ends
  cannot be trusted in a list that does not parse. Nor with more than ``_MAX_HEADER_TEXT``
  bytes or ``_MAX_OFFERS`` offers in all. Headers are matched as bytes (obs-text, 0x80-0xff, is
  in no token), so no input raises.
* Offers are tried in the client's order of preference; other extension names (and other
  spellings: names are matched exactly) are skipped; the first acceptable offer wins. An offer
  is declined (RFC 7692 section 5: a parameter not defined for offers, an invalid value, a
  parameter given twice, a configuration the server does not support) for: a parameter other
  than the four of section 7.1, or one given twice; ``server_no_context_takeover`` or
  ``client_no_context_takeover`` with a value (7.1.1.1, 7.1.1.2: "has no value");
  ``server_max_window_bits`` without a value, or with one other than 8 to 15 written "without
  leading zeroes" (7.1.2.1), or below ``WINDOW_BITS`` (a shared compressor has one window for
  all its clients, so a client that wants a smaller one gets plain frames);
  ``client_max_window_bits`` with a value other than 8 to 15 (7.1.2.2; without a value it says
  only that the client understands the parameter in a response). A quoted value must be a token
  once unquoted (RFC 6455 section 9.1): every value accepted here is one.
* The response is ``permessage-deflate``; then ``server_no_context_takeover`` if the offer has it
  (7.1.1.1: the server MUST then include it); ``client_no_context_takeover`` always (7.1.1.2: a
  server MAY include it, and the client MUST then not use context takeover);
  ``server_max_window_bits=WINDOW_BITS`` if the offer has the parameter (7.1.2.1: it is accepted
  by answering "with the same or smaller value"). ``client_max_window_bits`` is never answered:
  7.1.2.2 lets the server "either ignore this value or use" it, the client then compresses with
  at most its own offer's window, and the inflater's 2^15 window decodes any smaller window.

What this module never does: I/O, frame headers (:mod:`relay.wire.frames`), or choosing which client
gets which frames (the hub). :func:`alone`'s one compressor is for the event loop's thread only.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

#: Window bits of the shared compressors (the LZ77 window the server uses; a client whose offer
#: says server_max_window_bits=N with N < WINDOW_BITS is declined — measured: wbits 15 gives 0.19
#: of the bytes on Econia fill events with a shared context, 13 gives 0.27)
WINDOW_BITS = 15
#: memLevel of the compressors: 5 compresses as well as 8 here at ~150 KiB per compressor (zlib:
#: 2^(windowBits+2) + 2^(memLevel+9) bytes) instead of ~260
MEM_LEVEL = 5
#: zlib's default level: the levels above it cost more CPU for little on short JSON messages.
LEVEL = 6

#: Request header bytes read in all: a browser's offer is under 50, and parsing costs time per
#: byte (~1 ms for this many at worst).
_MAX_HEADER_TEXT = 8192
#: Offers read in all: a browser makes one or two; a list longer than this is not a client's
#: preference but a probe of how much work an offer costs.
_MAX_OFFERS = 32

_NAME = b"permessage-deflate"
#: RFC 7692 7.1.2.1 and 7.1.2.2: "a decimal integer value without leading zeroes between 8 to
#: 15, inclusive": exactly these strings (no sign, no spaces, no other digits).
_WINDOW_BITS_VALUES = frozenset(str(bits).encode() for bits in range(8, 16))
#: RFC 7692 7.2.1 removes these 4 octets (an empty stored block's LEN and NLEN) from the end of
#: every compressed message, and 7.2.2 appends them back before inflating.
TAIL = b"\x00\x00\xff\xff"

# RFC 7230 3.2.6: tchar, and quoted-string (qdtext / quoted-pair, obs-text being 0x80-0xff);
# OWS is spaces and tabs.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_PARAM = rb"[ \t]*;[ \t]*(%s)(?:[ \t]*=[ \t]*(%s|%s))?" % (_TOKEN, _TOKEN, _QUOTED)
# One list element (an offer, or nothing) and the comma after it, or the end of the value.
# No two [ \t]* can share a run of whitespace, so a failing match backtracks in linear time.
_ELEMENT = re.compile(rb"[ \t]*(?:(?P<name>%s)(?P<params>(?:%s)*)[ \t]*)?(?P<end>,|\Z)"
                      % (_TOKEN, _PARAM))
# The parameters of an element that matched: name, and value as written.
_PARAMS = re.compile(_PARAM)
_QUOTED_PAIR = re.compile(rb"\\(.)")

_Params = list[tuple[bytes, bytes | None]]
_Offer = tuple[bytes, _Params]


@dataclass(frozen=True, slots=True)
class Agreement:
    """An accepted permessage-deflate offer."""

    #: The client asked the server not to keep context: it must get messages compressed alone.
    server_no_context_takeover: bool
    #: The Sec-WebSocket-Extensions response value.
    response: str


def negotiate(offers: Sequence[bytes]) -> Agreement | None:
    """The agreement for the values of every Sec-WebSocket-Extensions request header (a request
    may carry several headers, each a comma-separated list of offers, in the client's order of
    preference), or None when no permessage-deflate offer is acceptable (the client then gets
    plain frames and no extension in the response)."""
    if sum(len(value) for value in offers) > _MAX_HEADER_TEXT:
        return None
    listed: list[_Offer] = []
    for value in offers:
        parsed = _parse(value)
        if parsed is None:
            return None
        listed += parsed
    if len(listed) > _MAX_OFFERS:
        return None
    for name, params in listed:
        if name == _NAME:
            agreement = _agree(params)
            if agreement is not None:
                return agreement
    return None


def _parse(header: bytes) -> list[_Offer] | None:
    """The offers of one header value, in order, or None if it does not parse."""
    offers: list[_Offer] = []
    pos = 0
    while True:
        element = _ELEMENT.match(header, pos)
        if element is None:
            return None
        name = element["name"]
        if name is not None:
            params: _Params = []
            for param in _PARAMS.finditer(element["params"]):
                value = param[2]
                if value is not None and value.startswith(b'"'):
                    value = _QUOTED_PAIR.sub(rb"\1", value[1:-1])
                params.append((param[1], value))
            offers.append((name, params))
            if len(offers) > _MAX_OFFERS:  # Nothing is accepted then: no need to read on.
                return None
        if not element["end"]:  # The end of the value, not a comma.
            return offers
        pos = element.end()


def _agree(params: _Params) -> Agreement | None:
    """The agreement for one permessage-deflate offer's parameters, or None to decline it."""
    seen: set[bytes] = set()
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name in (b"server_no_context_takeover", b"client_no_context_takeover"):
            if value is not None:
                return None
        elif name == b"server_max_window_bits":
            if value not in _WINDOW_BITS_VALUES or int(value) < WINDOW_BITS:
                return None
        elif name == b"client_max_window_bits":
            if value is not None and value not in _WINDOW_BITS_VALUES:
                return None
        else:
            return None
    server_no_context_takeover = b"server_no_context_takeover" in seen
    response = ["permessage-deflate"]
    if server_no_context_takeover:
        response.append("server_no_context_takeover")
    response.append("client_no_context_takeover")
    if b"server_max_window_bits" in seen:
        response.append(f"server_max_window_bits={WINDOW_BITS}")
    return Agreement(server_no_context_takeover, "; ".join(response))


def _compressor() -> zlib._Compress:
    return zlib.compressobj(LEVEL, zlib.DEFLATED, -WINDOW_BITS, MEM_LEVEL)


class Deflater:
    """One deflate stream (raw, -WINDOW_BITS) whose messages many clients share.

    Each message may refer back to any message since the last :meth:`restart` (context
    takeover, RFC 7692 7.2.3.2): a client decodes it only if it decoded all of those.
    """

    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        # Made at the first message after creation or a restart, so an idle stream that was
        # restarted holds no zlib state.
        self._compressor: zlib._Compress | None = None

    def message(self, payload: bytes) -> bytes:
        """``payload`` compressed as the stream's next message (RFC 7692 7.2.1): deflated, then
        Z_SYNC_FLUSH (which ends in an empty stored block on a byte boundary), less the 4 octets
        ``00 00 ff ff`` that end it."""
        compressor = self._compressor
        if compressor is None:
            compressor = self._compressor = _compressor()
        return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]

    def restart(self) -> None:
        """A sync point: the next message refers to nothing before it.

        A fresh compressor rather than Z_FULL_FLUSH on this one. Both are correct; the flush
        costs ~1.5 µs against ~25 µs for a new compressor, but it emits an empty stored block
        that would go in front of the next message, and keeps ~150 KiB for a stream that may
        stay idle. Restarts happen when clients wait to join, not per message, so the memory
        counts and the microseconds do not.
        """
        self._compressor = None

    @property
    def fresh(self) -> bool:
        """True when no message was compressed since creation or the last restart: a client can
        join now, with nothing to wait for."""
        return self._compressor is None


#: The compressor of :func:`alone`, made once: a compressor is ~150 KiB and ~25 µs to make.
_ALONE = _compressor()


def alone(payload: bytes) -> bytes:
    """payload compressed on its own (no reference to any other message), for clients that
    asked for server_no_context_takeover and for streams beyond the compressor budget.

    One compressor serves every call: Z_FULL_FLUSH ends each message like Z_SYNC_FLUSH (an empty
    stored block, ``00 00 ff ff`` removed) and also resets the history, so the next message
    cannot refer back to this one.
    """
    return (_ALONE.compress(payload) + _ALONE.flush(zlib.Z_FULL_FLUSH))[:-4]
