"""The hub's routing and fan-out (upstream BroadcastSpec re-expressed), without sockets.

The subscribers here are recorders standing in for clients: the hub's contract is what it
offers to whom, which is what they record.
"""

from __future__ import annotations

import json
import zlib

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping, TextMessage

from relay import filters, frames
from relay import hub as hub_module
from relay.hub import Compression, Hub


class Recorder:
    def __init__(self) -> None:
        self.offers: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def offer(self, frame: bytes) -> None:
        self.offers.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def messages(self) -> list[str]:
        parser = Connection(ConnectionType.CLIENT)
        parser.receive_data(b"".join(self.offers))
        return [event.data for event in parser.events() if isinstance(event, TextMessage)]


def test_relays_a_single_message_to_one_listener_unchanged() -> None:
    hub = Hub("listen")
    listener = Recorder()
    hub.add(listener, ["test"])
    payload = b'{"channel":"test","payload":"payload"}'
    hub.publish([payload])
    assert listener.messages() == [payload.decode()]


def test_one_frame_object_is_shared_by_every_subscriber() -> None:
    hub = Hub("listen")
    subscribers = [Recorder() for _ in range(3)]
    for subscriber in subscribers:
        hub.add(subscriber, ["c"])
    hub.publish([b'{"channel":"c","n":1}', b'{"channel":"c","n":2}'])
    first = subscribers[0].offers[0]
    assert all(s.offers == [first] and s.offers[0] is first for s in subscribers)
    assert subscribers[0].messages() == ['{"channel":"c","n":1}', '{"channel":"c","n":2}']


def test_routing_by_channel_and_fallback_to_listen_channel() -> None:
    hub = Hub("listen")
    a, b, fallback = Recorder(), Recorder(), Recorder()
    hub.add(a, ["a"])
    hub.add(b, ["b"])
    hub.add(fallback, ["listen"])
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}', b"plain text", b'{"channel":"x"}'])
    assert a.messages() == ['{"channel":"a"}']
    assert b.messages() == ['{"channel":"b"}']
    assert fallback.messages() == ["plain text"]


def test_order_is_kept_per_channel_across_batches() -> None:
    hub = Hub("listen")
    both = Recorder()
    hub.add(both, ["a", "b"])
    hub.publish([b'{"channel":"a","n":1}', b'{"channel":"b","n":2}', b'{"channel":"a","n":3}'])
    hub.publish([b'{"channel":"a","n":4}'])
    only_a = [m for m in both.messages() if '"a"' in m]
    assert only_a == ['{"channel":"a","n":1}', '{"channel":"a","n":3}', '{"channel":"a","n":4}']


def test_removed_subscribers_get_nothing_and_empty_channels_are_dropped() -> None:
    hub = Hub("listen")
    gone, stays = Recorder(), Recorder()
    hub.add(gone, ["c"])
    hub.add(stays, ["c"])
    hub.remove(gone)
    hub.publish([b'{"channel":"c"}'])
    assert gone.offers == [] and len(stays.offers) == 1
    hub.remove(stays)
    assert hub.client_count == 0
    assert hub._channels == {}


def test_a_client_on_a_channel_named_twice_is_removed_from_every_channel() -> None:
    # A token's "channels" may name a channel twice (kept as is, spec 3.3): removing the
    # client must still reach the channels after the repeated one.
    hub = Hub("listen")
    client = Recorder()
    hub.add(client, ["a", "a", "b"])
    hub.remove(client)
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}'])
    assert client.offers == []
    assert hub._channels == {} and hub.client_count == 0


def test_write_only_clients_get_pings_but_no_data() -> None:
    hub = Hub("listen")
    writer = Recorder()
    hub.add(writer, [])
    hub.publish([b'{"channel":"c"}'])
    hub.ping_all()
    hub.ping_all()
    parser = Connection(ConnectionType.CLIENT)
    parser.receive_data(b"".join(writer.offers))
    assert [e.payload for e in parser.events() if isinstance(e, Ping)] == [b"1", b"2"]
    assert writer.offers[0] == frames.ping(b"1")


def test_close_all() -> None:
    hub = Hub("listen")
    clients = [Recorder(), Recorder()]
    for client in clients:
        hub.add(client, ["c"])
    hub.close_all(1001, "going away")
    assert all(client.closed == (1001, "going away") for client in clients)


def test_a_batch_of_every_size_goes_by_the_top_level_channel_only() -> None:
    # One wake-up mixing sizes around every routing threshold, keys at start, middle and end,
    # nested and quoted "channel" decoys, non-ASCII names and padding.
    from tests.test_frames_envelope import (
        CHANNELS,
        FILLERS,
        POSITIONS,
        ROUTING_SIZES,
        routed_payload,
    )

    hub = Hub("listen")
    readers = {channel: Recorder() for channel in CHANNELS}
    for channel, reader in readers.items():
        hub.add(reader, [channel])
    wrong, fallback = Recorder(), Recorder()
    hub.add(wrong, ["wrong"])
    hub.add(fallback, ["listen"])
    batch = [routed_payload(size, channel, position, filler, escaped)
             for size in ROUTING_SIZES for position in POSITIONS for channel in CHANNELS
             for filler in FILLERS[:2] for escaped in (False, True)]
    unroutable = b'{"decoy":{"channel":"wrong"},"pad":"' + b"x" * 600 + b'"}'
    hub.publish([*batch, unroutable])
    for channel, reader in readers.items():
        expected = [p.decode() for p in batch if json.loads(p)["channel"] == channel]
        assert len(expected) == len(ROUTING_SIZES) * len(POSITIONS) * 4
        assert reader.messages() == expected, channel
    assert wrong.offers == []
    assert fallback.messages() == [unroutable.decode()]


# -- streams: filters and compression -----------------------------------------------------------

TAIL = b"\x00\x00\xff\xff"


class Inflating(Recorder):
    """A recorder that decodes what it was offered as a permessage-deflate client would: one
    inflater for the connection (the server's context carries over), plain frames as is."""

    def __init__(self) -> None:
        super().__init__()
        self.inflater = zlib.decompressobj(-15)
        self.flags: list[bool] = []
        self._decoded = 0
        self._texts: list[str] = []

    def messages(self) -> list[str]:
        data = b"".join(self.offers)
        offset = self._decoded
        while offset < len(data):
            first, size = data[offset], data[offset + 1] & 0x7F
            offset += 2
            if size == 126:
                size, offset = int.from_bytes(data[offset:offset + 2], "big"), offset + 2
            elif size == 127:
                size, offset = int.from_bytes(data[offset:offset + 8], "big"), offset + 8
            payload = data[offset:offset + size]
            offset += size
            if first & 0x0F != 0x1:
                continue
            self.flags.append(bool(first & 0x40))
            if first & 0x40:
                payload = self.inflater.decompress(payload + TAIL)
            self._texts.append(payload.decode())
        self._decoded = offset
        return list(self._texts)


def fill(n: int, market: int = 7) -> bytes:
    body = {"n": n, "market_id": market, "maker": "0x" + "ab" * 30}
    return json.dumps({"channel": "fill", "payload": body}, separators=(",", ":")).encode()


def test_clients_with_the_same_channels_and_filters_share_one_stream() -> None:
    hub = Hub("listen")
    seven = filters.parse_all(["payload.market_id=eq.7"])
    for _ in range(3):
        hub.add(Recorder(), ["fill"])
        hub.add(Recorder(), ["fill"], seven)
        hub.add(Recorder(), ["fill", "cancel"])
        hub.add(Recorder(), ["cancel", "fill"])
    assert hub.stream_count == 3 and hub.client_count == 12


def test_filters_pick_each_streams_messages_in_order() -> None:
    hub = Hub("listen")
    seven, eight, everything = Recorder(), Recorder(), Recorder()
    hub.add(seven, ["fill"], filters.parse_all(["payload.market_id=eq.7"]))
    hub.add(eight, ["fill"], filters.parse_all(["payload.market_id=in.(8,9)"]))
    hub.add(everything, ["fill"])
    batch = [fill(n, 7 + n % 3) for n in range(9)]
    hub.publish(batch)
    assert seven.messages() == [p.decode() for p in batch if b'"market_id":7' in p]
    assert eight.messages() == [p.decode() for p in batch if b'"market_id":7' not in p]
    assert everything.messages() == [p.decode() for p in batch]
    assert hub.routed == 9


def test_a_notification_no_stream_wants_is_not_routed() -> None:
    hub = Hub("listen")
    seven = Recorder()
    hub.add(seven, ["fill"], filters.parse_all(["payload.market_id=eq.7"]))
    hub.publish([fill(1, 8), b"not json"])
    assert seven.offers == [] and hub.routed == 0 and hub.offered == 0


def test_one_channel_ordered_across_channels_for_a_multi_channel_stream() -> None:
    hub = Hub("listen")
    both = Recorder()
    hub.add(both, ["a", "b"])
    batch = [b'{"channel":"a","n":1}', b'{"channel":"b","n":2}', b'{"channel":"a","n":3}']
    hub.publish(batch)
    assert both.messages() == [p.decode() for p in batch]
    assert len(both.offers) == 1  # One offer per stream per batch.


def test_compressed_clients_of_a_stream_share_one_compressed_blob() -> None:
    hub = Hub("listen")
    clients = [Inflating() for _ in range(3)]
    plain = Recorder()
    for client in clients:
        hub.add(client, ["fill"], compression=Compression.SHARED)
    hub.add(plain, ["fill"])
    batches = [[fill(10 * b + n) for n in range(5)] for b in range(3)]
    for batch in batches:
        hub.publish(batch)
    expected = [p.decode() for batch in batches for p in batch]
    for client in clients:
        assert client.messages() == expected
        assert all(client.flags)  # The stream was fresh: compressed from the first message.
        assert [a is b for a, b in zip(client.offers, clients[0].offers, strict=True)] == [True] * 3
    assert plain.messages() == expected
    assert plain.offers[0] == b"".join(frames.text(p) for p in batches[0])
    compressed = sum(map(len, clients[0].offers))
    assert compressed < sum(map(len, plain.offers)) / 2
    assert hub.deflaters == 1


def test_a_joining_client_gets_plain_frames_until_the_next_sync_point(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub("listen")
    first, late = Inflating(), Inflating()
    hub.add(first, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(0)])
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 1e9)
    hub.add(late, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(1)])
    hub.publish([fill(2)])
    assert late.messages() == [fill(1).decode(), fill(2).decode()]
    assert late.flags == [False, False]
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 0.0)
    hub.publish([fill(3), fill(4)])
    # The sync point: both share the restarted compressor; the late one's new inflater decodes.
    assert late.messages()[2:] == [fill(3).decode(), fill(4).decode()]
    assert late.flags == [False, False, True, True]
    assert first.messages() == [fill(n).decode() for n in range(5)]
    assert all(first.flags)


def test_a_joiner_left_alone_with_a_used_compressor_still_gets_a_restart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 1e9)
    hub = Hub("listen")
    first, late = Inflating(), Inflating()
    hub.add(first, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(0), fill(1)])
    hub.add(late, ["fill"], compression=Compression.SHARED)
    hub.remove(first)
    hub.publish([fill(2), fill(3)])
    assert late.messages() == [fill(2).decode(), fill(3).decode()]
    assert late.flags == [True, True]


def test_server_no_context_takeover_clients_get_each_message_alone() -> None:
    hub = Hub("listen")
    alone = Recorder()
    hub.add(alone, ["fill"], compression=Compression.ALONE)
    batch = [fill(n) for n in range(3)]
    hub.publish(batch)
    blob = b"".join(alone.offers)
    texts = []
    offset = 0
    while offset < len(blob):
        assert blob[offset] == 0xC1
        size = blob[offset + 1]
        payload = blob[offset + 2:offset + 2 + size]
        texts.append(zlib.decompressobj(-15).decompress(payload + TAIL))
        offset += 2 + size
    assert texts == batch
    assert hub.deflaters == 0


def test_streams_beyond_the_budget_compress_alone_and_free_their_compressor() -> None:
    hub = Hub("listen", compression_streams=1)
    a, b = Inflating(), Inflating()
    hub.add(a, ["fill"], compression=Compression.SHARED)
    hub.add(b, ["other"], compression=Compression.SHARED)
    assert hub.deflaters == 1
    hub.publish([fill(1), b'{"channel":"other","n":1}', b'{"channel":"other","n":2}'])
    assert a.messages() == [fill(1).decode()]
    assert b.messages() == ['{"channel":"other","n":1}', '{"channel":"other","n":2}']
    assert all(b.flags)
    hub.remove(a)
    assert hub.deflaters == 0
    hub.remove(b)
    assert hub.stream_count == 0 and hub._channels == {} and hub.deflaters == 0


def test_filter_sets_are_capped_per_channel_and_existing_ones_always_fit() -> None:
    hub = Hub("listen")
    seven, eight, nine = (filters.parse_all([f"payload.market_id=eq.{n}"]) for n in (7, 8, 9))
    hub.add(Recorder(), ["fill"])
    hub.add(Recorder(), ["fill"], seven)
    hub.add(Recorder(), ["other"], eight)
    assert not hub.filter_sets_full(["fill"], eight, 2)
    hub.add(Recorder(), ["fill"], eight)
    # Two distinct sets on "fill" (no filter is not one): a third is refused, not the first two.
    assert hub.filter_sets_full(["fill"], nine, 2)
    assert hub.filter_sets_full(["other", "fill"], nine, 2)
    assert not hub.filter_sets_full(["fill"], seven, 2)
    assert not hub.filter_sets_full(["fill"], filters.NONE, 2)
    assert not hub.filter_sets_full(["other"], nine, 2)
    assert not hub.filter_sets_full(["fill"], nine, 3)
    assert not hub.filter_sets_full(["fill"], nine, 0)  # 0: no limit.
