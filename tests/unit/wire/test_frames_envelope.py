"""Frames built once, and the JSON envelopes (upstream's shapes), without sockets."""

from __future__ import annotations

import json

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from relay.core import envelope
from relay.wire import frames


def _parse(data: bytes) -> list[object]:
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    return list(client.events())


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 100_000])
def test_text_frames_parse_as_one_message(size: int) -> None:
    payload = ("é" * size).encode()[:size]
    payload = payload.decode("utf-8", "ignore").encode()
    (event,) = _parse(frames.text(payload))
    assert isinstance(event, TextMessage)
    assert event.data.encode() == payload and event.message_finished


def test_control_frames() -> None:
    ping, close = _parse(frames.ping(b"7") + frames.close(3001, "JWT expired"))
    assert isinstance(ping, Ping) and ping.payload == b"7"
    assert isinstance(close, CloseConnection)
    assert (close.code, close.reason) == (3001, "JWT expired")


def test_close_reason_is_cut_to_fit_a_control_frame() -> None:
    frame = frames.close(1000, "é" * 200)
    assert len(frame) <= 127
    (event,) = _parse(frame)
    assert isinstance(event, CloseConnection) and event.code == 1000


def test_frame_bytes_exactly() -> None:
    # Header: FIN + opcode, then the length in 7 bits, or 126 + 16 bits, or 127 + 64 bits.
    assert frames.text(b"hi") == b"\x81\x02hi"
    assert frames.text(b"a" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frames.text(b"a" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
    assert frames.ping(b"1") == b"\x89\x011"
    assert frames.pong(b"1") == b"\x8a\x011"
    assert frames.close(1013, "slow consumer") == b"\x88\x0f\x03\xf5slow consumer"


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1000])
def test_pongs_echo_the_ping_payload_cut_to_125_bytes(size: int) -> None:
    payload = bytes(range(256)) * 4
    (event,) = _parse(frames.pong(payload[:size]))
    assert isinstance(event, Pong)
    assert event.payload == payload[:min(size, 125)]


def test_pings_are_cut_to_125_bytes() -> None:
    (event,) = _parse(frames.ping(b"p" * 200))
    assert isinstance(event, Ping) and event.payload == b"p" * 125


def test_a_close_without_a_reason_has_only_the_code() -> None:
    assert frames.close(1000) == b"\x88\x02\x03\xe8"
    (event,) = _parse(frames.close(4999))
    assert isinstance(event, CloseConnection) and (event.code, event.reason) == (4999, "")


@pytest.mark.parametrize("reason,kept", [
    ("r" * 123, "r" * 123),  # 2 code bytes + 123: the 125 a control frame may carry
    ("r" * 124, "r" * 123),
    ("é" * 62, "é" * 61),  # 124 bytes: the cut would split the 62nd "é", which is dropped
    ("r" + "€" * 41, "r" + "€" * 40),  # 124 bytes: the cut falls inside the last "€"
    ("r" * 122 + "😀", "r" * 122),
])
def test_close_reasons_are_cut_to_123_bytes_on_a_character_boundary(reason: str,
                                                                   kept: str) -> None:
    frame = frames.close(1000, reason)
    assert frame[4:] == kept.encode()
    (event,) = _parse(frame)
    assert isinstance(event, CloseConnection) and event.reason == kept


@pytest.mark.parametrize("payload,channel", [
    (b'{"channel": "test", "payload": "hello there"}', "test"),
    (b'{"channel" : "fill_event", "payload" : {"id":18446744073709551616000001}}', "fill_event"),
    (b'{"channel": 5}', "listen"),
    (b'["channel"]', "listen"),
    (b"not json", "listen"),
    (b'{"payload": 1}', "listen"),
    (b"\xff\xfe", "listen"),
])
def test_route(payload: bytes, channel: str) -> None:
    assert envelope.route(payload, "listen") == channel


def test_write_envelope_is_compact_sorted_utf8() -> None:
    body = envelope.build("chat", {"mode": "rw", "b": {"z": 1, "a": 2}}, "WebsocketMessage",
                          'hé "x"', 1602719440.5)
    assert body == ('{"channel":"chat","claims":{"b":{"a":2,"z":1},"message_delivered_at":'
                    '1602719440.5,"mode":"rw"},"event":"WebsocketMessage",'
                    '"payload":"hé \\"x\\""}').encode()


def test_envelope_keeps_big_integer_claims_exact() -> None:
    body = envelope.build("c", {"mode": "w", "n": 2**70}, "WebsocketMessage", "p", 1.0)
    assert json.loads(body)["claims"]["n"] == 2**70
    assert b'"claims":{"message_delivered_at":1.0,"mode":"w","n":1180591620717411303424}' in body


def test_big_integer_claims_keep_non_ascii_as_utf8() -> None:
    # The standard library's path (for integers beyond 64 bits) writes what orjson writes:
    # UTF-8, not \u escapes, which would make the envelope longer (and the 8000-byte limit
    # nearer) than upstream's.
    body = envelope.build("ça", {"n": 2**64, "nom": "é"}, "WebsocketMessage", "☃ 😀", 1.5)
    assert body == ('{"channel":"ça","claims":{"message_delivered_at":1.5,"n":'
                    '18446744073709551616,"nom":"é"},"event":"WebsocketMessage",'
                    '"payload":"☃ 😀"}').encode()


def test_numbers_are_written_the_shortest_way() -> None:
    # README: shortest form (orjson writes 1e-7 where the standard library writes 1e-07).
    body = envelope.build("c", {"tiny": 1e-7, "n": 2**63 - 1}, "WebsocketMessage", "p", 0.5)
    assert body == (b'{"channel":"c","claims":{"message_delivered_at":0.5,'
                    b'"n":9223372036854775807,"tiny":1e-7},"event":"WebsocketMessage",'
                    b'"payload":"p"}')


def test_listener_reconnected_event() -> None:
    body = envelope.listener_reconnected("meta", 1700000000.25, 1700000001.5)
    assert body == (b'{"channel":"meta","claims":{"message_delivered_at":1700000001.5},'
                    b'"event":"ListenerReconnected","payload":{"since":1700000000.25,'
                    b'"until":1700000001.5}}')


def test_message_delivered_at_overwrites_a_claim_of_that_name() -> None:
    body = envelope.build("c", {"message_delivered_at": "x"}, "ConnectionOpen", "c", 2.5)
    assert json.loads(body)["claims"] == {"message_delivered_at": 2.5}


# -- routing at every size, wherever the key is ------------------------------------------------

#: Sizes around each threshold a router could have: 500 (a scan window or a "small payload"
#: fast path), the WebSocket header sizes (125/126, 65535/65536), PostgreSQL's NOTIFY limit
#: (payloads up to 7999 bytes), and beyond (the hub routes whatever the listener hands it).
ROUTING_SIZES = [160, 255, 256, 499, 500, 501, 1023, 1024, 4000, 4096, 7999, 8000, 65536,
                 100_000]
#: Where the top-level ``channel`` member sits in the object.
POSITIONS = ["start", "middle", "end"]
#: Pad characters of 1 to 4 UTF-8 bytes, so that byte and character offsets differ.
FILLERS = ["x", "é", "☃", "😀"]
#: Members that mention another channel and must never route: a nested object, an object in
#: an array, and a JSON text inside a string (quotes escaped).
DECOYS = ('"decoy":{"channel":"wrong","inner":[{"channel":"wrong"}]},'
          '"quoted":"{\\"channel\\":\\"wrong\\"}"')


def _fill(count: int, filler: str) -> str:
    """A JSON-string-safe text of exactly ``count`` UTF-8 bytes, mostly ``filler``."""
    width = len(filler.encode())
    return filler * (count // width) + "x" * (count % width)


def routed_payload(size: int, channel: str, position: str, filler: str = "x",
                   escaped: bool = False) -> bytes:
    """A JSON object of exactly ``size`` bytes whose top-level ``channel`` is ``channel``, put
    at ``position``, with :data:`DECOYS` before it (but at the start) and padding around it.
    ``escaped``: the channel name written with ``\\uXXXX`` escapes for non-ASCII."""
    key = '"channel":' + json.dumps(channel, ensure_ascii=escaped)
    template = {  # @1 and @2: where the padding goes.
        "start": "{" + key + "," + DECOYS + ',"pad":"@1"}',
        "middle": '{"pad":"@1",' + DECOYS + "," + key + ',"pad2":"@2"}',
        "end": "{" + DECOYS + ',"pad":"@1",' + key + "}",
    }[position]
    room = size - len(template.replace("@1", "").replace("@2", "").encode())
    assert room >= 0, f"{size} bytes cannot hold the {position} template"
    second = room // 2 if "@2" in template else 0
    text = template.replace("@1", _fill(room - second, filler)) \
        .replace("@2", _fill(second, filler))
    payload = text.encode()
    assert len(payload) == size, (len(payload), size)
    return payload


#: Channel names: ASCII, Latin-1, CJK and one outside the BMP (a surrogate pair when escaped).
CHANNELS = ["fill_event", "café", "频道", "ch😀"]


@pytest.mark.parametrize("size", ROUTING_SIZES)
@pytest.mark.parametrize("position", POSITIONS)
def test_route_by_the_top_level_key_at_any_size_and_place(size: int, position: str) -> None:
    for channel in CHANNELS:
        for filler in FILLERS:
            for escaped in (False, True):
                payload = routed_payload(size, channel, position, filler, escaped)
                assert envelope.route(payload, "listen") == channel, \
                    (size, position, channel, filler, escaped)


@pytest.mark.parametrize("size", ROUTING_SIZES)
def test_no_string_channel_at_the_top_level_routes_to_the_listen_channel(size: int) -> None:
    # Only nested or quoted "channel" members, or a top-level one that is not a string.
    for top in ("", '"channel":null,', '"channel":7,', '"channel":["wrong"],',
                '"channel":{"channel":"wrong"},', '"channel":true,'):
        for filler in FILLERS:
            head = "{" + top + DECOYS + ',"pad":"'
            room = size - len(head.encode()) - 2
            payload = (head + _fill(room, filler) + '"}').encode()
            assert len(payload) == size
            assert envelope.route(payload, "listen") == "listen", (size, top, filler)


@pytest.mark.parametrize("payload,channel", [
    (rb'{"\u0063hannel":"escaped-key"}', "escaped-key"),  # the key written with an escape
    (rb'{"channel":"a\"b\\c\/d\u00e9"}', 'a"b\\c/dé'),  # every kind of escape in the name
    (b' \n\t{ "channel"\n:\t"spaced" } \n', "spaced"),
    (b'{"channel":""}', ""),
    (b'{"Channel":"x","CHANNEL":"y"}', "listen"),  # member names are case-sensitive
    (b'{"channels":"x"}', "listen"),
    (b'{"channel":"x"', "listen"),  # truncated: not JSON
    (b'{"channel":"x"} trailing', "listen"),
    (b'{"channel":"x"}{"channel":"y"}', "listen"),
    (rb'"{\"channel\":\"x\"}"', "listen"),  # a JSON string, not an object
    (b'[{"channel":"x"}]', "listen"),  # an array, not an object
    (b"", "listen"),
    (b"null", "listen"),
])
def test_route_edge_cases(payload: bytes, channel: str) -> None:
    assert envelope.route(payload, "listen") == channel


def _client_pong(payload: bytes) -> bytes:
    return Connection(ConnectionType.CLIENT).send(Pong(payload))


def test_whole_client_pongs_are_counted() -> None:
    pongs = [_client_pong(b""), _client_pong(b"7"), _client_pong(b"x" * 125)]
    assert [frames.client_pongs(pong) for pong in pongs] == [1, 1, 1]
    assert frames.client_pongs(b"".join(pongs)) == 3


def test_anything_but_whole_client_pongs_is_not_pongs() -> None:
    pong = _client_pong(b"12")
    text = Connection(ConnectionType.CLIENT).send(TextMessage("hello"))
    ping = Connection(ConnectionType.CLIENT).send(Ping(b"12"))
    for data in (b"", pong[:1], pong[:-1], pong + pong[:3], pong + text, text + pong, ping,
                 frames.pong(b"12"),  # A server's pong: unmasked.
                 bytes([pong[0] | 0x40]) + pong[1:],  # RSV1 set.
                 bytes([pong[0] & 0x7F]) + pong[1:],  # Not final.
                 bytes([pong[0], 0x80 | 126, 0, 126]) + bytes(4 + 126)):  # 126 bytes.
        assert frames.client_pongs(data) == 0, data
