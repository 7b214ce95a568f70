"""End to end: permessage-deflate (RFC 7692), one compressor per stream, through the real relay.

The ``websockets`` package offers permessage-deflate by default and checks every compressed
frame with its own inflater, so every test that uses it (here and in the rest of the suite) is
a round trip through an independent decoder. Raw sockets check what a library would hide: the
negotiated parameters, RSV1 on each frame, and that the shared context is what RFC 7692 says.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.helpers import TIMEOUT, RelayProcess, eventually, notify, token

READ = token({"mode": "r"})
RW = token({"mode": "rw"})
#: What Chromium and Firefox offer.
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"
#: RFC 7692 7.2.2: what a receiver appends to a message before inflating it.
TAIL = b"\x00\x00\xff\xff"


def ws(relay: RelayProcess, path: str, **kwargs: Any):
    return connect(relay.url(path), open_timeout=10, close_timeout=5, **kwargs)


def fill(n: int, market: int = 7) -> str:
    """An Econia-like fill_event with a random maker address: ~300 bytes, partly repetitive."""
    row = {"txn_version": 154106900 + n, "event_idx": n,
           "maker_address": "0x" + os.urandom(32).hex(),
           "maker_order_id": 18446744073709551616000001 + n, "maker_side": n % 2 == 0,
           "market_id": market, "price": 12345 + n, "size": 100, "taker_address": "0xbb"}
    return '{"channel" : "fill_event", "payload" : ' + json.dumps(row) + "}"


class RawClient:
    """A WebSocket client on a bare socket that offers ``offer`` and reads frames as sent."""

    def __init__(self, port: int, path: str, offer: str | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        extension = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer is not None else ""
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           f"Sec-WebSocket-Version: 13\r\n{extension}\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, "closed during the handshake"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines[0]
        self.headers = {name.lower(): value.strip() for name, value in
                        (line.split(":", 1) for line in lines[1:])}
        #: One inflater for the connection: the server keeps its context across messages.
        self.inflater = zlib.decompressobj(-15)

    @property
    def extension(self) -> str | None:
        return self.headers.get("sec-websocket-extensions")

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame's first byte and payload, as sent."""
        first, second = self._exactly(2)
        assert not second & 0x80, "server frames are never masked"
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._exactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._exactly(8))[0]
        return first, self._exactly(size)

    def message(self) -> tuple[bool, str]:
        """(compressed?, text) of the next text frame, inflated with the connection's context."""
        first, payload = self.frame()
        assert first & 0x0F == 0x1 and first & 0x80, hex(first)  # A final text frame.
        assert not first & 0x30, "RSV2 and RSV3 are never set"
        if first & 0x40:
            return True, self.inflater.decompress(payload + TAIL).decode()
        return False, payload.decode()

    def send_frame(self, first: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        length = bytes([0x80 | size]) if size < 126 else \
            bytes([0x80 | 126]) + struct.pack("!H", size) if size < 65536 else \
            bytes([0x80 | 127]) + struct.pack("!Q", size)
        self.sock.sendall(bytes([first]) + length + mask +
                          bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self) -> None:
        self.sock.close()


def assert_each_compressed_alone(client: RawClient, listen: str, count: int) -> None:
    """Notify ``count`` fills; each arrives compressed (RSV1) and inflates with a fresh inflater:
    nothing refers to an earlier message."""
    texts = [fill(n) for n in range(count)]
    notify(listen, *texts)
    for text in texts:
        first, payload = client.frame()
        assert first == 0xC1
        assert zlib.decompressobj(-15).decompress(payload + TAIL).decode() == text


def deflated(text: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(TAIL)
    return data[:-4]


def test_websockets_negotiates_deflate_and_receives_every_message(relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    with ws(relay, f"/fill_event/{READ}") as one, ws(relay, f"/fill_event/{READ}") as two:
        assert one.response.headers["Sec-WebSocket-Extensions"] == \
            "permessage-deflate; client_no_context_takeover"
        batches = [[fill(10 * b + n) for n in range(b + 1)] for b in range(5)]
        for batch in batches:
            notify(listen, *batch)
        expected = [text for batch in batches for text in batch]
        for client in (one, two):
            assert [client.recv(timeout=10) for _ in expected] == expected


def test_the_raw_response_and_frames_follow_rfc_7692(relay: RelayProcess) -> None:
    """Offer as a browser does; the answer's parameters, RSV1 on every data frame after the
    first sync point, one inflater with context for the whole connection."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    compressed = RawClient(relay.port, f"/fill_event/{READ}", BROWSER_OFFER)
    plain = RawClient(relay.port, f"/fill_event/{READ}", None)
    try:
        assert compressed.extension == "permessage-deflate; client_no_context_takeover"
        assert plain.extension is None
        texts = [fill(n) for n in range(20)]
        notify(listen, *texts[:10])
        notify(listen, *texts[10:])
        got = [compressed.message() for _ in texts]
        assert [text for _, text in got] == texts
        # The stream was fresh when this client joined: every frame is compressed, and the
        # repeated parts of later messages cost less than the first one.
        assert all(flag for flag, _ in got)
        for text in texts:
            assert plain.frame() == (0x81, text.encode())  # Plain clients: today's bytes.
    finally:
        compressed.close()
        plain.close()


def test_a_client_joining_mid_stream_gets_plain_frames_then_the_shared_ones(
        relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    first = RawClient(relay.port, f"/fill_event/{READ}", BROWSER_OFFER)
    sent: list[str] = []
    try:
        sent.append(fill(0))
        notify(listen, sent[-1])
        assert first.message() == (True, sent[-1])
        late = RawClient(relay.port, f"/fill_event/{READ}", BROWSER_OFFER)
        with ws(relay, f"/fill_event/{READ}") as library:
            seen: list[tuple[bool, str]] = []

            def compressed_at_last() -> bool:
                sent.append(fill(len(sent)))
                notify(listen, sent[-1])
                seen.append(late.message())
                assert library.recv(timeout=10) == sent[-1]
                assert first.message() == (True, sent[-1])
                return seen[-1][0]

            eventually(compressed_at_last, what="a compressed frame after the sync point")
            for _ in range(3):
                compressed_at_last()
            assert [text for _, text in seen] == sent[1:]
            flags = [flag for flag, _ in seen]
            # Plain until the sync point, compressed from then on, never back.
            assert flags == sorted(flags)
    finally:
        first.close()
        late.close()


def test_server_no_context_takeover_gets_each_message_compressed_alone(
        relay: RelayProcess) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    client = RawClient(relay.port, f"/fill_event/{READ}",
                       "permessage-deflate; server_no_context_takeover")
    try:
        assert client.extension == \
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        assert_each_compressed_alone(client, listen, 5)
    finally:
        client.close()


@pytest.mark.parametrize(("offer", "response"), [
    ("permessage-deflate", "permessage-deflate; client_no_context_takeover"),
    # The client's own window is its business: the relay's inflater takes any up to 15 bits.
    ("permessage-deflate; client_max_window_bits=10",
     "permessage-deflate; client_no_context_takeover"),
    ("permessage-deflate; server_max_window_bits=15",
     "permessage-deflate; client_no_context_takeover; server_max_window_bits=15"),
    # The first acceptable offer wins (RFC 7692 5): a 10-bit window is declined.
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits",
     "permessage-deflate; client_no_context_takeover"),
    ('permessage-deflate; client_max_window_bits="12"',
     "permessage-deflate; client_no_context_takeover"),
])
def test_accepted_offers_get_the_rfc_7692_answer_and_decodable_frames(
        relay: RelayProcess, offer: str, response: str) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    client = RawClient(relay.port, f"/fill_event/{READ}", offer)
    try:
        assert client.extension == response
        texts = [fill(n) for n in range(3)]
        notify(listen, *texts)
        assert [client.message() for _ in texts] == [(True, text) for text in texts]
    finally:
        client.close()


@pytest.mark.parametrize("offer", [
    "permessage-deflate; server_max_window_bits=10",  # A window smaller than ours: declined.
    "permessage-deflate; unknown_parameter",
    "permessage-deflate; client_max_window_bits=16",
    "x-webkit-deflate-frame",
])
def test_an_offer_the_relay_declines_gets_plain_frames(relay: RelayProcess, offer: str) -> None:
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    client = RawClient(relay.port, f"/fill_event/{READ}", offer)
    try:
        assert client.extension is None
        text = fill(1)
        notify(listen, text)
        assert client.frame() == (0x81, text.encode())
    finally:
        client.close()


def test_compression_off_answers_no_extension(start_relay: Any) -> None:
    relay = start_relay(PGWS_COMPRESSION="false")
    with ws(relay, f"/fill_event/{READ}") as client:
        assert "Sec-WebSocket-Extensions" not in client.response.headers
        text = fill(1)
        notify(relay.env["PGWS_LISTEN_CHANNEL"], text)
        assert client.recv(timeout=10) == text


def test_beyond_the_compressor_budget_messages_are_compressed_alone(start_relay: Any) -> None:
    relay = start_relay(PGWS_COMPRESSION_STREAMS="0")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    client = RawClient(relay.port, f"/fill_event/{READ}", BROWSER_OFFER)
    try:
        assert_each_compressed_alone(client, listen, 4)
    finally:
        client.close()


def test_streams_with_filters_and_channels_each_decode_intact(relay: RelayProcess) -> None:
    """Several streams at once (filters, a multi-channel token), each with its compressor:
    every websockets client decodes exactly its own messages."""
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    both = token({"mode": "r", "channels": ["fill_event", "cancel_order_event"]})
    cancel = '{"channel" : "cancel_order_event", "payload" : {"market_id":7,"order_id":%d}}'
    with ws(relay, f"/fill_event/{READ}?filter=payload.market_id=eq.7") as seven, \
            ws(relay, f"/fill_event/{READ}?filter=payload.market_id=eq.8") as eight, \
            ws(relay, f"/{both}") as everything:
        texts = []
        for n in range(30):
            texts.append(fill(n, 7 + n % 2) if n % 3 else cancel % n)
        notify(listen, *texts[:15])
        notify(listen, *texts[15:])
        fills = [t for t in texts if "fill_event" in t]
        want_seven = [t for t in fills if json.loads(t)["payload"]["market_id"] == 7]
        want_eight = [t for t in fills if json.loads(t)["payload"]["market_id"] == 8]
        assert [seven.recv(timeout=10) for _ in want_seven] == want_seven
        assert [eight.recv(timeout=10) for _ in want_eight] == want_eight
        assert [everything.recv(timeout=10) for _ in texts] == texts


def test_compressed_client_messages_reach_the_database(relay: RelayProcess) -> None:
    """websockets compresses what it sends; the relay inflates it for the write envelope."""
    with ws(relay, f"/room/{RW}") as client:
        text = json.dumps({"note": "x" * 2000})  # Long enough for websockets to compress.
        client.send(text)
        echo = json.loads(client.recv(timeout=10))
        assert (echo["channel"], echo["payload"]) == ("room", text)


def test_a_compression_bomb_is_closed_with_1009_and_others_are_served(
        start_relay: Any) -> None:
    relay = start_relay(PGWS_MAX_MESSAGE_SIZE="65536")
    bomb = RawClient(relay.port, f"/room/{RW}", BROWSER_OFFER)
    try:
        # 64 MiB of zeros deflate to ~64 KiB: inflated whole, they would be 1000x the limit.
        payload = deflated(b"\x00" * (64 << 20))
        bomb.send_frame(0xC1, payload)
        while True:
            first, data = bomb.frame()
            if first & 0x0F == 0x8:
                break
        assert (struct.unpack("!H", data[:2])[0], data[2:]) == (1009, b"message too big")
        with ws(relay, f"/room/{RW}") as other:
            other.send("still here")
            assert json.loads(other.recv(timeout=10))["payload"] == "still here"
    finally:
        bomb.close()


def test_a_corrupt_compressed_message_is_closed_with_1007(relay: RelayProcess) -> None:
    client = RawClient(relay.port, f"/room/{RW}", BROWSER_OFFER)
    try:
        client.send_frame(0xC1, b"\xff\xff\xff\xff not deflate")
        first, data = client.frame()
        assert first & 0x0F == 0x8
        assert (struct.unpack("!H", data[:2])[0], data[2:]) == (
            1007, b"compressed data that does not inflate")
    finally:
        client.close()


def test_rsv1_without_the_extension_is_a_protocol_error(relay: RelayProcess) -> None:
    client = RawClient(relay.port, f"/room/{RW}", None)
    try:
        client.send_frame(0xC1, deflated(b"hello"))
        first, data = client.frame()
        assert first & 0x0F == 0x8
        assert struct.unpack("!H", data[:2])[0] == 1002
    finally:
        client.close()


def test_a_slow_compressed_client_is_closed_and_its_stream_goes_on(start_relay: Any) -> None:
    """A client that cannot keep up is closed (1013), never skipped: the others of its stream
    keep decoding the shared frames."""
    relay = start_relay(PGWS_MAX_QUEUE_BYTES="4096", PGWS_SEND_BUFFER="4096")
    listen = relay.env["PGWS_LISTEN_CHANNEL"]
    stalled = RawClient(relay.port, f"/fill_event/{READ}", BROWSER_OFFER)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        with ws(relay, f"/fill_event/{READ}") as healthy:
            sent: list[str] = []

            def stalled_is_closed() -> bool:
                batch = [fill(len(sent) + n) for n in range(20)]
                sent.extend(batch)
                notify(listen, *batch)
                for text in batch:
                    assert healthy.recv(timeout=10) == text
                return relay.stats()["slow_closed"] == 1

            eventually(stalled_is_closed, what="the stalled client closed as slow")
            text = fill(10_000)
            notify(listen, text)
            assert healthy.recv(timeout=10) == text
    finally:
        stalled.close()


@pytest.mark.parametrize("header", [b"Sec-WebSocket-Extensions", b"Sec-WebSocket-Protocol"])
def test_a_non_ascii_extension_header_is_a_400_not_an_internal_error(
        relay: RelayProcess, header: bytes) -> None:
    key = base64.b64encode(os.urandom(16))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /room/" + READ.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
                     b"\r\nSec-WebSocket-Version: 13\r\n" + header +
                     b": permessage-deflate; x=\xff\xfe\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    relay.wait_for_line(r"rejecting request from .*: 400 Non-ASCII")
    assert "internal error" not in relay.log
    with ws(relay, f"/fill_event/{READ}") as client:
        text = fill(1)
        notify(relay.env["PGWS_LISTEN_CHANNEL"], text)
        assert client.recv(timeout=10) == text
