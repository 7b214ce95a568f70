"""permessage-deflate: negotiation (RFC 7692 section 5 and 7.1), the shared and the standalone
compressors, and inflation of client messages through wsproto's frame parser. No sockets."""

from __future__ import annotations

import gc
import json
import random
import weakref
import zlib
from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    ServerPerMessageDeflateFactory,
)
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode as WsOpcode
from websockets.headers import build_extension, parse_extension
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed

from relay.wire import deflate, inflate
from relay.wire.deflate import Agreement, Deflater, alone, negotiate
from relay.wire.inflate import InboundDeflate

TAIL = b"\x00\x00\xff\xff"
PLAIN = "permessage-deflate; client_no_context_takeover"
NO_CONTEXT = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
WINDOW = "permessage-deflate; client_no_context_takeover; server_max_window_bits=15"

# What clients send. Chrome and Chromium (and node's ws, and websockets' default client: see
# test_websockets_default_offer_is_what_it_sends); Firefox (WebSocketChannel.cpp sets the bare
# name); wsproto (its PerMessageDeflate().offer() after the name, as its handshake joins them).
CHROMIUM = b"permessage-deflate; client_max_window_bits"
FIREFOX = b"permessage-deflate"
WSPROTO = b"permessage-deflate; client_max_window_bits=15; server_max_window_bits=15"


def _response(*headers: bytes) -> str | None:
    agreement = negotiate(list(headers))
    return None if agreement is None else agreement.response


# -- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(("offer", "response"), [
    (CHROMIUM, PLAIN),
    (FIREFOX, PLAIN),
    (WSPROTO, WINDOW),
    (b"permessage-deflate; client_max_window_bits=8", PLAIN),
    (b"permessage-deflate; client_max_window_bits=10", PLAIN),
    (b"permessage-deflate; client_max_window_bits=15", PLAIN),
    (b"permessage-deflate; client_no_context_takeover", PLAIN),
    (b"permessage-deflate; server_no_context_takeover", NO_CONTEXT),
    (b"permessage-deflate; server_max_window_bits=15", WINDOW),
    (b"permessage-deflate; client_max_window_bits; server_no_context_takeover; "
     b"server_max_window_bits=15; client_no_context_takeover",
     "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
     "server_max_window_bits=15"),
    # Whitespace around every separator, tabs too, and empty list elements (RFC 7230 7).
    (b" \tpermessage-deflate \t;\t client_max_window_bits \t", PLAIN),
    (b"permessage-deflate ; server_max_window_bits = 15 ", WINDOW),
    (b", ,permessage-deflate,,", PLAIN),
    (b"", None),
    (b" , ", None),
    # Quoted values are unquoted (RFC 6455 9.1), quoted-pairs too.
    (b'permessage-deflate; server_max_window_bits="15"', WINDOW),
    (b'permessage-deflate; server_max_window_bits="1\\5"', WINDOW),
    (b'permessage-deflate; client_max_window_bits="9"', PLAIN),
])
def test_accepted_offers_get_this_exact_response(offer: bytes, response: str | None) -> None:
    assert _response(offer) == response


@pytest.mark.parametrize("offer", [
    # Not this extension: other names, other spellings, the pre-RFC WebKit ones.
    b"x-webkit-deflate-frame",
    b"deflate-frame",
    b"Permessage-Deflate",
    b"permessage-deflate-x",
    b"permessage-deflatex; server_no_context_takeover",
    # Parameters not defined for an offer (wsproto's accept() matches names by prefix).
    b"permessage-deflate; client_max_window_bits_x",
    b"permessage-deflate; server_no_context_takeover_x",
    b"permessage-deflate; x_client_max_window_bits",
    b"permessage-deflate; foo=1",
    b"permessage-deflate; Client_Max_Window_Bits",
    # Parameters given twice, even with the same value.
    b"permessage-deflate; client_max_window_bits; client_max_window_bits",
    b"permessage-deflate; client_max_window_bits=10; client_max_window_bits",
    b"permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    b"permessage-deflate; client_no_context_takeover; client_no_context_takeover",
    b"permessage-deflate; server_max_window_bits=15; server_max_window_bits=15",
    # The no-context-takeover parameters have no value.
    b"permessage-deflate; server_no_context_takeover=1",
    b"permessage-deflate; client_no_context_takeover=true",
    b'permessage-deflate; client_no_context_takeover=""',
    # server_max_window_bits: a value is required, 8 to 15 without leading zeroes, and below
    # WINDOW_BITS is a window the shared compressors do not run.
    b"permessage-deflate; server_max_window_bits",
    b"permessage-deflate; server_max_window_bits=8",
    b"permessage-deflate; server_max_window_bits=10",
    b"permessage-deflate; server_max_window_bits=14",
    b"permessage-deflate; server_max_window_bits=16",
    b"permessage-deflate; server_max_window_bits=015",
    b"permessage-deflate; server_max_window_bits=0",
    b"permessage-deflate; server_max_window_bits=abc",
    b'permessage-deflate; server_max_window_bits="+15"',
    b'permessage-deflate; server_max_window_bits=" 15"',
    b'permessage-deflate; server_max_window_bits=""',
    b"permessage-deflate; server_max_window_bits=15.0",
    # client_max_window_bits: no value, or 8 to 15 without leading zeroes.
    b"permessage-deflate; client_max_window_bits=7",
    b"permessage-deflate; client_max_window_bits=16",
    b"permessage-deflate; client_max_window_bits=09",
    b"permessage-deflate; client_max_window_bits=0",
    b"permessage-deflate; client_max_window_bits=abc",
])
def test_declined_offers(offer: bytes) -> None:
    assert negotiate([offer]) is None


@pytest.mark.parametrize("offer", [
    b"permessage-deflate;",  # A parameter with no name.
    b"permessage-deflate; ;client_max_window_bits",
    b"; permessage-deflate",
    b"permessage-deflate; =15",
    b"permessage-deflate; server_max_window_bits=",
    b'permessage-deflate; server_max_window_bits="15',  # An unclosed quote.
    b'permessage-deflate; server_max_window_bits=15"',
    b"permessage-deflate; server_max_window_bits=1 5",
    b"permessage-deflate server_no_context_takeover",  # Words without a separator.
    b"permessage-deflate; a=b=c",
    b"permessage-deflate; client_max_window_bits=(15)",
    b"permessage-deflate\x00",
    b"permessage-deflate\r\n",
    b"permessage-deflate\n",
    b"permessage-deflate\xff",
    b"permessage-\xe2\x80\x8bdeflate",
    b'permessage-deflate; x="\x01"',  # A control character in a quoted-string.
    b'permessage-deflate; x="\\\n"',
    b"permessage-deflate, @",  # A broken element after a good one.
    b"@, permessage-deflate",
])
def test_a_header_that_does_not_parse_accepts_nothing(offer: bytes) -> None:
    assert negotiate([offer]) is None


@pytest.mark.parametrize(("headers", "response"), [
    # The first acceptable offer wins, its own parameters only.
    ([b"permessage-deflate; server_no_context_takeover, permessage-deflate"], NO_CONTEXT),
    ([b"permessage-deflate, permessage-deflate; server_no_context_takeover"], PLAIN),
    ([b"permessage-deflate; server_max_window_bits=10, permessage-deflate"], PLAIN),
    ([b"permessage-deflate; server_no_context_takeover; server_max_window_bits=9, "
      b"permessage-deflate; client_max_window_bits"], PLAIN),
    ([b"permessage-deflate; server_max_window_bits=9, permessage-deflate; mux, "
      b"permessage-deflate; server_max_window_bits=15"], WINDOW),
    ([b"x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover"], NO_CONTEXT),
    ([b'foo; bar="a, b; c", permessage-deflate'], PLAIN),  # Separators inside quotes.
    ([b'foo; bar="\\"", permessage-deflate'], PLAIN),
    ([b"permessage-deflate; server_max_window_bits=10", b"foo"], None),
    # Several headers are one list, in their order.
    ([b"foo", b"permessage-deflate"], PLAIN),
    ([b"permessage-deflate; server_max_window_bits=9", b"permessage-deflate; "
      b"server_no_context_takeover"], NO_CONTEXT),
    ([b"permessage-deflate; server_no_context_takeover", b"permessage-deflate"], NO_CONTEXT),
    ([b"", b"permessage-deflate"], PLAIN),
    ([], None),
    # One header that does not parse and nothing is accepted, whichever its place.
    ([b"permessage-deflate", b"bad;;"], None),
    ([b"bad;;", b"permessage-deflate"], None),
])
def test_several_offers_and_headers(headers: list[bytes], response: str | None) -> None:
    assert _response(*headers) == response


def test_agreement_fields() -> None:
    assert negotiate([FIREFOX]) == Agreement(False, PLAIN)
    assert negotiate([b"permessage-deflate; server_no_context_takeover"]) == \
        Agreement(True, NO_CONTEXT)


def test_header_text_is_bounded_in_all() -> None:
    bound = deflate._MAX_HEADER_TEXT
    fits = FIREFOX + b" " * (bound - len(FIREFOX))
    assert _response(fits) == PLAIN
    assert _response(fits + b" ") is None
    # Counted over every header, not per header.
    assert _response(fits[:-1], b" ") == PLAIN
    assert _response(fits, b" ") is None


def test_offers_are_bounded_in_all() -> None:
    bound = deflate._MAX_OFFERS
    others = [b"foo"] * (bound - 1)
    assert _response(b", ".join([*others, FIREFOX])) == PLAIN
    assert _response(b", ".join([*others, b"bar", FIREFOX])) is None
    assert _response(b", ".join([FIREFOX, *others, b"bar"])) is None  # Even if the first wins.
    assert _response(b", ".join(others), FIREFOX) == PLAIN  # Counted over every header.
    assert _response(b", ".join(others), b"bar", FIREFOX) is None
    assert _response(b", ".join([*others, b"bar", b"baz"]), FIREFOX) is None
    assert _response(b",".join([b""] * 100 + [FIREFOX])) == PLAIN  # Empty elements are no offers.


@given(st.lists(st.binary(max_size=200), max_size=4))
def test_negotiate_never_raises_on_bytes(headers: list[bytes]) -> None:
    _check_result(negotiate(headers))


_GRAMMAR = st.text(alphabet=' \t,;="\\abcdeilmnoprstvwx_-015@', max_size=80)


@given(st.lists(st.one_of(_GRAMMAR, _GRAMMAR.map(lambda tail: "permessage-deflate" + tail)),
                max_size=3))
def test_negotiate_never_raises_on_near_misses(headers: list[str]) -> None:
    _check_result(negotiate([header.encode() for header in headers]))


def _check_result(agreement: Agreement | None) -> None:
    if agreement is not None:
        ((name, params),) = parse_extension(agreement.response)
        assert name == "permessage-deflate"
        assert ("client_no_context_takeover", None) in params
        assert agreement.server_no_context_takeover == \
            (("server_no_context_takeover", None) in params)


# A model of the rules over structured offers, and offers written out every way the grammar
# allows: random whitespace, values bare or quoted, characters escaped.
_PARAM_NAMES = ["server_no_context_takeover", "client_no_context_takeover",
                "server_max_window_bits", "client_max_window_bits", "client_max_window_bits_x",
                "x"]
_VALUES = [None, "7", "8", "9", "14", "15", "16", "08", "015", "abc", "1 5", "", "15 "]
_TOKEN_CHARS = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_OFFER = st.tuples(
    st.sampled_from(["permessage-deflate", "x-webkit-deflate-frame", "Permessage-deflate"]),
    st.lists(st.tuples(st.sampled_from(_PARAM_NAMES), st.sampled_from(_VALUES)), max_size=4))


def _valid(param: str, value: str | None) -> bool:
    if param in ("server_no_context_takeover", "client_no_context_takeover"):
        return value is None
    if param == "server_max_window_bits":
        return value == "15"
    if param == "client_max_window_bits":
        return value is None or value in {str(bits) for bits in range(8, 16)}
    return False


def _model(offers: list[tuple[str, list[tuple[str, str | None]]]]) -> str | None:
    for name, params in offers:
        names = [param for param, _ in params]
        if name != "permessage-deflate" or len(set(names)) < len(names) or \
                not all(_valid(param, value) for param, value in params):
            continue
        words = ["permessage-deflate"]
        if "server_no_context_takeover" in names:
            words.append("server_no_context_takeover")
        words.append("client_no_context_takeover")
        if "server_max_window_bits" in names:
            words.append("server_max_window_bits=15")
        return "; ".join(words)
    return None


@given(st.lists(_OFFER, max_size=4), st.data())
def test_negotiate_follows_the_rules_however_offers_are_written(
        offers: list[tuple[str, list[tuple[str, str | None]]]], data: st.DataObject) -> None:
    def space() -> str:
        return data.draw(st.sampled_from(["", "", " ", "\t", " \t "]))

    def value_text(value: str) -> str:
        if value and set(value) <= _TOKEN_CHARS and data.draw(st.booleans()):
            return value
        escaped = "".join("\\" + char if data.draw(st.booleans()) else char for char in value)
        return f'"{escaped}"'

    elements = []
    for name, params in offers:
        text = name
        for param, value in params:
            text += f"{space()};{space()}{param}{space()}"
            if value is not None:
                text += f"={space()}{value_text(value)}{space()}"
        elements.append(space() + text + space())
    split = data.draw(st.integers(0, len(elements)))  # Across two headers, or one.
    headers = [",".join(elements[:split]), ",".join(elements[split:])]
    assert _response(*[header.encode() for header in headers]) == _model(offers)


# -- what real clients accept ----------------------------------------------------------------


def test_websockets_default_offer_is_what_it_sends() -> None:
    factory = ClientPerMessageDeflateFactory(compress_settings={"memLevel": 5})
    assert build_extension([(factory.name, factory.get_request_params())]).encode() == CHROMIUM


@pytest.mark.parametrize("options", [
    {},
    {"client_max_window_bits": None},
    {"client_max_window_bits": 10},
    {"client_no_context_takeover": True},
    {"server_no_context_takeover": True},
    {"server_max_window_bits": 15},
    {"server_no_context_takeover": True, "client_no_context_takeover": True,
     "server_max_window_bits": 15, "client_max_window_bits": 9},
])
def test_websockets_client_accepts_the_response_and_decodes_what_follows(
        options: dict[str, Any]) -> None:
    factory = ClientPerMessageDeflateFactory(**options)
    offer = build_extension([(factory.name, factory.get_request_params())])
    agreement = negotiate([offer.encode()])
    assert agreement is not None
    ((_, params),) = parse_extension(agreement.response)
    extension = factory.process_response_params(params, [])
    assert extension.local_no_context_takeover  # The client keeps no context: we inflate alone.
    assert extension.remote_no_context_takeover == agreement.server_no_context_takeover
    events = _fill_events(30)
    deflater = Deflater()
    for index, event in enumerate(events):
        if index == 10:
            deflater.restart()
        payload = alone(event) if agreement.server_no_context_takeover else \
            deflater.message(event)
        frame = extension.decode(WsFrame(WsOpcode.TEXT, payload, rsv1=True), max_size=1 << 20)
        assert frame.data == event
    # Its messages to the server inflate with ours, message after message.
    server = _Server()
    for event in events:
        encoded = extension.encode(WsFrame(WsOpcode.TEXT, event))
        server.feed(_client_frame(0xC1 if encoded.rsv1 else 0x81, bytes(encoded.data)))
    assert server.messages == [event.decode() for event in events]


def test_websockets_server_accepts_our_own_offer() -> None:
    offer = f"permessage-deflate; {InboundDeflate(1).offer()}"
    ((_, params),) = parse_extension(offer)
    _, extension = ServerPerMessageDeflateFactory().process_request_params(params, [])
    assert extension.local_no_context_takeover
    assert negotiate([offer.encode()]) == Agreement(True, NO_CONTEXT)


@pytest.mark.parametrize(("extension", "server_max_window_bits"), [
    (PerMessageDeflate(), 15),
    (PerMessageDeflate(server_no_context_takeover=True), 15),
])
def test_wsproto_client_handshake_with_the_response(extension: PerMessageDeflate,
                                                    server_max_window_bits: int) -> None:
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="relay", target="/token", extensions=[extension]))
    # As relay/transports/server.py does: h11 reads the head, wsproto checks it, we answer
    # extensions.
    http = h11.Connection(h11.SERVER)
    http.receive_data(request)
    head = http.next_event()
    assert isinstance(head, h11.Request)
    values = [value for name, value in head.headers if name == b"sec-websocket-extensions"]
    assert values == [b"permessage-deflate; " + extension.offer().encode()]
    agreement = negotiate(values)
    assert agreement is not None
    server = WSConnection(ConnectionType.SERVER)
    server.initiate_upgrade_connection(head.headers, head.target)
    assert [type(event) for event in server.events()] == [Request]
    response = server.send(AcceptConnection(
        extra_headers=[(b"sec-websocket-extensions", agreement.response.encode())]))
    # wsproto adds no extension header of its own (AcceptConnection.extensions is empty), and
    # takes ours as it is: exactly one, ours.
    lines = [line for line in response.split(b"\r\n")
             if line.lower().startswith(b"sec-websocket-extensions:")]
    assert lines == [b"sec-websocket-extensions: " + agreement.response.encode()]
    client.receive_data(response)
    (accepted,) = client.events()
    assert isinstance(accepted, AcceptConnection) and accepted.extensions == [extension]
    assert extension.enabled() and extension.client_no_context_takeover
    assert extension.server_max_window_bits == server_max_window_bits
    # The server's frames, compressed as the relay will, decode at this client.
    events = _fill_events(12)
    deflater = Deflater()
    for event in events:
        payload = alone(event) if agreement.server_no_context_takeover else \
            deflater.message(event)
        client.receive_data(_server_frame(payload, rsv1=True))
        client.receive_data(_server_frame(event, rsv1=False))  # Plain ones may come between.
    texts = [event.data for event in client.events()]
    assert all(isinstance(event, str) for event in texts)
    assert texts == [event.decode() for event in events for _ in (1, 2)]


def test_wsproto_accept_without_extensions_adds_no_header() -> None:
    server = WSConnection(ConnectionType.SERVER)
    server.initiate_upgrade_connection(
        [(b"host", b"relay"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
         (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13"),
         (b"sec-websocket-extensions", CHROMIUM)], b"/")
    list(server.events())
    assert b"sec-websocket-extensions" not in server.send(AcceptConnection()).lower()


# -- the shared compressor ---------------------------------------------------------------------


def _fill_events(count: int, seed: int = 7) -> list[bytes]:
    """Econia-like fill events, ~600 bytes each: random 0x addresses and u128 order ids."""
    rng = random.Random(seed)

    def address() -> str:
        return "0x" + rng.getrandbits(256).to_bytes(32, "big").hex()

    events = []
    for index in range(count):
        event = {"channel": "fill_event", "payload": {
            "txn_version": 154106900 + index * rng.randint(1, 50),
            "event_idx": rng.randint(0, 20), "emit_address": address(),
            "time": f"2024-01-02T03:04:{index % 60:02d}.{rng.randint(0, 999999):06d}+00:00",
            "maker_address": address(), "maker_custodian_id": rng.randint(0, 5),
            "maker_order_id": rng.getrandbits(128), "maker_side": rng.random() < 0.5,
            "market_id": rng.randint(1, 10), "price": rng.randint(1, 10**6),
            "sequence_number_for_trade": rng.randint(0, 10), "size": rng.randint(1, 10**6),
            "taker_address": address(), "taker_custodian_id": rng.randint(0, 5),
            "taker_order_id": rng.getrandbits(128),
            "taker_quote_fees_paid": rng.randint(0, 10**5)}}
        events.append(json.dumps(event, separators=(",", ":")).encode())
    return events


def _decodes(messages: list[bytes], expected: list[bytes]) -> bool:
    """Whether one raw inflater fed each message + 00 00 ff ff (RFC 7692 7.2.2) gets
    ``expected``."""
    inflater = zlib.decompressobj(-15)
    try:
        return [inflater.decompress(message + TAIL) for message in messages] == expected
    except zlib.error:
        return False


def test_fill_events_look_like_econia() -> None:
    events = _fill_events(50)
    assert 550 < sum(map(len, events)) / len(events) < 700
    assert len(set(events)) == len(events)


def test_every_message_inflates_in_order_across_restarts() -> None:
    payloads = [*_fill_events(40), b"", b"x", bytes(range(256)) * 300,
                random.Random(1).randbytes(70_000), "é€𝄞".encode() * 1000, b""]
    deflater = Deflater()
    sent = []
    for index, payload in enumerate(payloads):
        if index % 7 == 3:
            deflater.restart()
        sent.append(deflater.message(payload))
    assert _decodes(sent, payloads)


def test_messages_are_not_the_flush_tail_or_anything_more() -> None:
    deflater = Deflater()
    for payload in _fill_events(5):
        message = deflater.message(payload)
        assert not message.endswith(TAIL)
        assert zlib.decompressobj(-15).decompress(alone(payload) + TAIL) == payload
    assert Deflater().message(b"") == b"\x00"  # RFC 7692 7.2.3.6: an empty message.
    assert alone(b"") == b"\x00"


def test_context_takeover_is_kept_between_messages() -> None:
    events = _fill_events(20)
    deflater = Deflater()
    shared = [deflater.message(event) for event in events]
    assert sum(map(len, shared[1:])) < 0.8 * sum(len(alone(event)) for event in events[1:])
    # Compressed again after the first message, it refers back to it.
    deflater = Deflater()
    deflater.message(events[0])
    again = deflater.message(events[0])
    assert len(again) < 20 and _decodes([shared[0], again], [events[0], events[0]])


def test_a_client_joining_at_a_restart_decodes_every_later_message() -> None:
    events = _fill_events(60)
    restarts = {15, 16, 40}
    deflater = Deflater()
    sent = []
    for index, event in enumerate(events):
        if index in restarts:
            deflater.restart()
        sent.append(deflater.message(event))
    assert _decodes(sent, events)  # Who was there from the start.
    for start in restarts:
        assert _decodes(sent[start:], events[start:]), start
    # A client that joins anywhere else cannot decode: the test can tell them apart.
    for start in range(1, len(events)):
        if start not in restarts:
            assert not _decodes(sent[start:], events[start:]), start


def test_fresh_until_a_message_and_again_after_a_restart() -> None:
    deflater = Deflater()
    assert deflater.fresh
    deflater.restart()
    assert deflater.fresh
    first = deflater.message(b"hello hello")
    assert not deflater.fresh
    deflater.message(b"hello")
    assert not deflater.fresh
    deflater.restart()
    assert deflater.fresh
    assert deflater.message(b"hello hello") == first  # As from a new compressor.
    assert not deflater.fresh


def test_the_compressors_are_zlib_raw_deflate_at_the_documented_settings() -> None:
    big = b"".join(_fill_events(100))

    def reference(level: int, mem_level: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15, mem_level)
        return (compressor.compress(big) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]

    assert (deflate.WINDOW_BITS, deflate.MEM_LEVEL, deflate.LEVEL) == (15, 5, 6)
    assert Deflater().message(big) == reference(6, 5)
    assert reference(6, 5) != reference(6, 8) and reference(6, 5) != reference(9, 5)


def test_alone_refers_to_no_other_message() -> None:
    events = _fill_events(10)
    deflater = Deflater()
    # The same message twice in a row: a compressor that kept context would refer back.
    for event in [events[0], events[0], *events, events[-1]]:
        deflater.message(event)  # The shared compressors do not disturb it.
        message = alone(event)
        assert zlib.decompressobj(-15).decompress(message + TAIL) == event
        assert not message.endswith(TAIL)
    # And a client that keeps context decodes them in a row too.
    assert _decodes([alone(event) for event in events], events)


def test_alone_makes_no_compressor(monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _RecordingZlib()
    monkeypatch.setattr(deflate, "zlib", recording)
    for event in _fill_events(3):
        alone(event)
    assert recording.compressors == 0
    deflater = Deflater()
    deflater.restart()
    assert recording.compressors == 0  # A restart makes nothing until a message.
    deflater.message(b"a")
    deflater.message(b"b")
    assert recording.compressors == 1


def test_a_shared_context_compresses_fill_events_better_than_alone() -> None:
    events = _fill_events(200)
    deflater = Deflater()
    shared = sum(len(deflater.message(event)) for event in events)
    separate = sum(len(alone(event)) for event in events)
    raw = sum(map(len, events))
    assert shared < 0.8 * separate < 0.8 * raw
    assert shared < 0.5 * raw


# -- inflating client messages ---------------------------------------------------------------


def _client_frame(first: int, payload: bytes, mask: bytes = b"\x9a\x01\xc3\x7e") -> bytes:
    """A masked client frame; ``first`` is its FIN, RSV and opcode byte."""
    size = len(payload)
    if size < 126:
        header = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    key = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
    return header + mask + masked


def _server_frame(payload: bytes, rsv1: bool) -> bytes:
    first = 0xC1 if rsv1 else 0x81
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 1 << 16:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def _deflating_client() -> FrameProtocol:
    """wsproto's client side with permessage-deflate, as agreed with our response."""
    extension = PerMessageDeflate()
    extension.finalize(PLAIN)
    assert extension.client_no_context_takeover
    return FrameProtocol(client=True, extensions=[extension])


class _Server:
    """The relay's parser: wsproto's FrameProtocol with InboundDeflate; messages assembled."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.extension = InboundDeflate(limit)
        self.protocol = FrameProtocol(client=False, extensions=[self.extension])
        self.messages: list[str | bytes] = []
        self.pings: list[bytes] = []
        self._parts: list[Any] = []

    def feed(self, data: bytes, chunk: int = 0) -> None:
        for start in range(0, len(data), chunk or len(data) or 1):
            self.protocol.receive_bytes(data[start:start + (chunk or len(data))])
            for frame in self.protocol.received_frames():
                if frame.opcode is Opcode.PING:
                    self.pings.append(bytes(frame.payload))
                elif frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self._parts.append(frame.payload)
                    if frame.message_finished:
                        empty = "" if frame.opcode is Opcode.TEXT else b""
                        self.messages.append(empty.join(self._parts))
                        self._parts = []


def _failure(data: bytes, limit: int = 1 << 20, chunk: int = 0) -> CloseReason:
    with pytest.raises(ParseFailed) as failed:
        _Server(limit).feed(data, chunk)
    return failed.value.code


def _wsproto_messages(large: bool = True) -> tuple[bytes, list[str | bytes], list[bytes]]:
    """Client bytes from wsproto's deflating client and a plain one, mixed: compressed,
    fragmented, empty, binary, large, with pings between fragments; and what they carry."""
    deflating = _deflating_client()
    plain = FrameProtocol(client=True, extensions=[])
    events = _fill_events(6)
    data = b""
    expected: list[str | bytes] = []
    for event in events:  # Several in a row, each compressed alone by the client.
        data += deflating.send_data(event.decode())
        expected.append(event.decode())
    data += plain.send_data("plain é")
    expected.append("plain é")
    data += deflating.send_data("fragm", fin=False) + deflating.ping(b"\xff\xfe") + \
        deflating.send_data("ented ", fin=False) + plain.ping(b"\x00") + \
        deflating.send_data("€𝄞" * 50, fin=True)
    expected.append("fragmented " + "€𝄞" * 50)
    data += deflating.send_data("")
    expected.append("")
    data += deflating.send_data(b"\x00\x01binary" * 10)
    expected.append(b"\x00\x01binary" * 10)
    data += plain.send_data(b"pl", fin=False) + plain.send_data(b"ain", fin=True)
    expected.append(b"plain")
    if large:  # ~200 KB: a 64-bit length even compressed
        text = json.dumps([event.decode() for event in _fill_events(300)])
        data += deflating.send_data(text)
        expected.append(text)
    data += deflating.send_data(events[0].decode())
    expected.append(events[0].decode())
    return data, expected, [b"\xff\xfe", b"\x00"]


@pytest.mark.parametrize("chunk", [0, 1, 7, 1000])
def test_wsproto_client_messages_inflate(chunk: int) -> None:
    data, expected, pings = _wsproto_messages(large=chunk != 1)  # Byte by byte is slow.
    server = _Server()
    server.feed(data, chunk)
    assert server.messages == expected
    assert server.pings == pings  # Control frames within a compressed message pass as they are.


# RFC 7692 7.2.3's examples (server frames there; masked here as a client's).
@pytest.mark.parametrize(("frames", "text"), [
    (["c107f248cdc9c90700"], "Hello"),  # 7.2.3.1
    (["4103f248cd", "8004c9c90700"], "Hello"),  # 7.2.3.1, in two fragments
    (["c10b0005 00faff48656c6c6f00"], "Hello"),  # 7.2.3.3, a stored block
    (["c108f348cdc9c9070000"], "Hello"),  # 7.2.3.4, BFINAL set and one more byte
    (["c10df24805000000ffffcac9c90700"], "Hello"),  # 7.2.3.5, two blocks
    (["c10100"], ""),  # 7.2.3.6, an empty message
    (["4100", "8007f248cdc9c90700"], "Hello"),  # An empty first fragment
    (["c108f348cdc9c9070000", "c107f248cdc9c90700"], "HelloHello"),  # Each on its own
])
def test_rfc_7692_examples(frames: list[str], text: str) -> None:
    server = _Server()
    for frame in frames:
        raw = bytes.fromhex(frame.replace(" ", ""))
        server.feed(_client_frame(raw[0], raw[2:]))
    assert "".join(server.messages) == text


def test_a_client_that_keeps_context_against_the_agreement_fails_1007() -> None:
    # RFC 7692 7.2.3.2: the second "Hello" refers to the first; client_no_context_takeover
    # in the response forbids it, and a message on its own cannot refer back.
    first, second = bytes.fromhex("f248cdc9c90700"), bytes.fromhex("f200110000")
    assert _failure(_client_frame(0xC1, first) + _client_frame(0xC1, second)) == \
        CloseReason.INVALID_FRAME_PAYLOAD_DATA


def test_bytes_after_a_final_block_are_ignored_and_not_inflated(
        monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _RecordingZlib()
    monkeypatch.setattr(inflate, "zlib", recording)
    server = _Server()
    final = bytes.fromhex("f348cdc9c90700")
    server.feed(_client_frame(0x41, final + b"junk") + _client_frame(0x80, b"\xff" * 1000) +
                _client_frame(0xC1, final))
    assert server.messages == ["Hello", "Hello"]
    assert all(not eof_before for _, _, eof_before in recording.calls)


def test_corrupt_data_fails_1007() -> None:
    bad = CloseReason.INVALID_FRAME_PAYLOAD_DATA
    assert _failure(_client_frame(0xC1, b"\xff\xff\xff")) == bad  # A reserved block type.
    assert _failure(_client_frame(0x41, bytes.fromhex("f248")) +
                    _client_frame(0x80, b"\xff" * 10)) == bad
    assert _failure(_client_frame(0x41, bytes.fromhex("f248cd")) + _client_frame(0x89, b"") +
                    _client_frame(0x80, bytes.fromhex("c9c90700")) +
                    _client_frame(0xC1, b"\x07")) == bad


@pytest.mark.parametrize("before", [
    b"",
    bytes.fromhex("c107f248cdc9c90700"),  # A compressed message
    bytes.fromhex("c108f348cdc9c9070000"),  # One whose deflate stream ended (BFINAL)
    b"\x81\x02hi",  # A plain message
])
def test_a_continuation_with_no_message_under_way_fails_1002(before: bytes) -> None:
    data = b"".join(_client_frame(raw[0], raw[2:]) for raw in [before] if raw)
    stray = _client_frame(0x80, bytes.fromhex("f248cdc9c90700"))
    assert _failure(data + stray) == CloseReason.PROTOCOL_ERROR


@pytest.mark.parametrize("frames", [
    [(0xC9, b"")],  # Ping
    [(0xCA, b"x")],  # Pong
    [(0xC8, b"\x03\xe8")],  # Close
    [(0x41, bytes.fromhex("f248cd")), (0xC0, bytes.fromhex("c9c90700"))],  # Continuation
    [(0x01, b"He"), (0xC0, b"llo")],  # Continuation of a plain message
    [(0x41, bytes.fromhex("f248cd")), (0xC9, b""), (0x80, bytes.fromhex("c9c90700"))],
    [(0xA1, b"Hello")],  # RSV2: nothing gives it a meaning
    [(0xE1, bytes.fromhex("f248cdc9c90700"))],  # RSV1 and RSV2
    [(0x91, b"Hello")],  # RSV3
])
def test_misplaced_reserved_bits_fail_1002(frames: list[tuple[int, bytes]]) -> None:
    data = b"".join(_client_frame(first, payload) for first, payload in frames)
    assert _failure(data) == CloseReason.PROTOCOL_ERROR


def _compressed(payload: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize("chunk", [0, 5])
def test_a_message_may_inflate_to_exactly_the_limit(chunk: int) -> None:
    limit = 3000
    payload = b"x" * limit
    server = _Server(limit)
    server.feed(_client_frame(0xC2, _compressed(payload)) * 3, chunk)  # The limit per message.
    assert server.messages == [payload] * 3
    fragmented = _compressed(payload)
    server.feed(_client_frame(0x42, fragmented[:3]) + _client_frame(0x80, fragmented[3:]), chunk)
    assert server.messages[-1] == payload


@pytest.mark.parametrize("chunk", [0, 5])
def test_one_byte_more_fails_1009(chunk: int) -> None:
    limit = 3000
    too_big = CloseReason.MESSAGE_TOO_BIG
    assert _failure(_client_frame(0xC2, _compressed(b"x" * (limit + 1))), limit, chunk) == too_big
    whole = _compressed(b"x" * (limit + 1))
    assert _failure(_client_frame(0x42, whole[:2]) + _client_frame(0x00, whole[2:4]) +
                    _client_frame(0x80, whole[4:]), limit, chunk) == too_big
    assert _failure(_client_frame(0xC2, _compressed(b"x" * limit)) +
                    _client_frame(0xC2, _compressed(b"x" * (limit + 1))), limit, chunk) == too_big


def test_uncompressed_messages_are_not_counted_here() -> None:
    # Their size is the client reader's to bound (relay/transports/websocket.py), as without
    # compression.
    server = _Server(10)
    server.feed(_client_frame(0x82, b"y" * 100))
    assert server.messages == [b"y" * 100]


@pytest.mark.parametrize("chunk", [0, 1000])
def test_a_compression_bomb_fails_1009_with_no_more_than_the_limit_inflated(
        monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    recording = _RecordingZlib()
    monkeypatch.setattr(inflate, "zlib", recording)
    limit = 1 << 20
    bomb = _compressed(bytes(10_000_000))
    assert len(bomb) < 20_000
    assert _failure(_client_frame(0xC2, bomb), limit, chunk) == CloseReason.MESSAGE_TOO_BIG
    assert recording.calls
    # zlib was never asked for more than one byte past what the message could take (and
    # never for 0 bytes, which is zlib's "no limit"), and gave no more in all.
    assert all(1 <= max_length <= limit + 1 for max_length, _, _ in recording.calls)
    assert sum(size for _, size, _ in recording.calls) == limit + 1


def test_limits_hold_for_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _RecordingZlib()
    monkeypatch.setattr(inflate, "zlib", recording)
    limit = 1000
    server = _Server(limit)
    whole = _compressed(b"z" * limit)
    server.feed(_client_frame(0x42, whole[:2]) + _client_frame(0x80, whole[2:]), 3)
    assert server.messages == [b"z" * limit]
    assert all(1 <= max_length <= limit + 1 for max_length, _, _ in recording.calls)
    assert recording.calls[-1][0] == 1  # The tail, with nothing left of the limit.


def test_an_idle_connection_holds_no_inflater(monkeypatch: pytest.MonkeyPatch) -> None:
    recording = _RecordingZlib()
    monkeypatch.setattr(inflate, "zlib", recording)
    data, expected, _ = _wsproto_messages()
    server = _Server()
    server.feed(data)
    assert server.messages == expected
    gc.collect()
    assert recording.inflaters and all(inflater() is None for inflater in recording.inflaters)
    # Uncompressed messages make none.
    made = len(recording.inflaters)
    server.feed(_client_frame(0x81, b"plain") + _client_frame(0x01, b"pl") +
                _client_frame(0x80, b"ain"))
    assert server.messages[-2:] == ["plain", "plain"]
    assert len(recording.inflaters) == made
    # A fragment in flight holds one, and only until its message ends.
    server.feed(_client_frame(0x41, bytes.fromhex("f248cd")))
    gc.collect()
    assert sum(inflater() is not None for inflater in recording.inflaters) == 1
    server.feed(_client_frame(0x80, bytes.fromhex("c9c90700")))
    gc.collect()
    assert all(inflater() is None for inflater in recording.inflaters)
    assert server.messages[-1] == "Hello"


def test_the_extension_as_wsproto_sees_it() -> None:
    extension = InboundDeflate(100)
    assert extension.name == "permessage-deflate"
    assert extension.enabled()
    assert FrameProtocol(client=False, extensions=[extension]).extensions == [extension]
    # Our negotiation accepts its offer.
    assert negotiate([f"permessage-deflate; {extension.offer()}".encode()]) is not None


class _RecordingInflater:
    def __init__(self, inner: Any, calls: list[tuple[int, int, bool]]) -> None:
        self._inner = inner
        self._calls = calls

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        eof_before = self._inner.eof
        out: bytes = self._inner.decompress(data, max_length)
        self._calls.append((max_length, len(out), eof_before))
        return out

    @property
    def eof(self) -> bool:
        return bool(self._inner.eof)


class _RecordingZlib:
    """relay.wire.deflate's zlib, with every inflater recorded: (max_length, bytes out, whether the
    stream had ended before) per call, and a weak reference to each."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.inflaters: list[weakref.ref[_RecordingInflater]] = []
        self.compressors = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(zlib, name)

    def decompressobj(self, wbits: int) -> _RecordingInflater:
        assert wbits == -15
        inflater = _RecordingInflater(zlib.decompressobj(wbits), self.calls)
        self.inflaters.append(weakref.ref(inflater))
        return inflater

    def compressobj(self, *args: Any) -> Any:
        self.compressors += 1
        return zlib.compressobj(*args)
