"""Frames built once, and the JSON envelopes (spec 4a, 4b, 4c), without sockets."""

from __future__ import annotations

import json

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Ping, TextMessage

from relay import envelope, frames


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


def test_message_delivered_at_overwrites_a_claim_of_that_name() -> None:
    body = envelope.build("c", {"message_delivered_at": "x"}, "ConnectionOpen", "c", 2.5)
    assert json.loads(body)["claims"] == {"message_delivered_at": 2.5}
