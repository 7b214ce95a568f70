"""The hub's routing and fan-out (upstream BroadcastSpec re-expressed), without sockets.

The subscribers here are recorders standing in for clients: the hub's contract is what it
offers to whom, which is what they record.
"""

from __future__ import annotations

import json

from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping, TextMessage

from relay import frames
from relay.hub import Hub


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
    hub.remove(gone, ["c"])
    hub.publish([b'{"channel":"c"}'])
    assert gone.offers == [] and len(stays.offers) == 1
    hub.remove(stays, ["c"])
    assert hub.client_count == 0
    assert hub._channels == {}


def test_a_client_on_a_channel_named_twice_is_removed_from_every_channel() -> None:
    # A token's "channels" may name a channel twice (kept as is, spec 3.3): removing the
    # client must still reach the channels after the repeated one.
    hub = Hub("listen")
    client = Recorder()
    hub.add(client, ["a", "a", "b"])
    hub.remove(client, ["a", "a", "b"])
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
