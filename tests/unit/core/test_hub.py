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

from relay.core import filters
from relay.core import hub as hub_module
from relay.core.hub import Compression, Hub
from relay.wire import frames
from relay.wire.frames import TEXT_FRAMES


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
    hub = Hub("listen", encoding=TEXT_FRAMES)
    listener = Recorder()
    hub.add(listener, ["test"])
    payload = b'{"channel":"test","payload":"payload"}'
    hub.publish([payload])
    assert listener.messages() == [payload.decode()]


def test_one_frame_object_is_shared_by_every_subscriber() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    subscribers = [Recorder() for _ in range(3)]
    for subscriber in subscribers:
        hub.add(subscriber, ["c"])
    hub.publish([b'{"channel":"c","n":1}', b'{"channel":"c","n":2}'])
    first = subscribers[0].offers[0]
    assert all(s.offers == [first] and s.offers[0] is first for s in subscribers)
    assert subscribers[0].messages() == ['{"channel":"c","n":1}', '{"channel":"c","n":2}']


def test_routing_by_channel_and_fallback_to_listen_channel() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    a, b, fallback = Recorder(), Recorder(), Recorder()
    hub.add(a, ["a"])
    hub.add(b, ["b"])
    hub.add(fallback, ["listen"])
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}', b"plain text", b'{"channel":"x"}'])
    assert a.messages() == ['{"channel":"a"}']
    assert b.messages() == ['{"channel":"b"}']
    assert fallback.messages() == ["plain text"]


def test_order_is_kept_per_channel_across_batches() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    both = Recorder()
    hub.add(both, ["a", "b"])
    hub.publish([b'{"channel":"a","n":1}', b'{"channel":"b","n":2}', b'{"channel":"a","n":3}'])
    hub.publish([b'{"channel":"a","n":4}'])
    only_a = [m for m in both.messages() if '"a"' in m]
    assert only_a == ['{"channel":"a","n":1}', '{"channel":"a","n":3}', '{"channel":"a","n":4}']


def test_removed_subscribers_get_nothing_and_empty_channels_are_dropped() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    # A token's "channels" may name a channel twice (kept as is, as upstream): removing the
    # client must still reach the channels after the repeated one.
    hub = Hub("listen", encoding=TEXT_FRAMES)
    client = Recorder()
    hub.add(client, ["a", "a", "b"])
    hub.remove(client)
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}'])
    assert client.offers == []
    assert hub._channels == {} and hub.client_count == 0


def test_write_only_clients_get_pings_but_no_data() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", encoding=TEXT_FRAMES)
    clients = [Recorder(), Recorder()]
    for client in clients:
        hub.add(client, ["c"])
    hub.close_all(1001, "going away")
    assert all(client.closed == (1001, "going away") for client in clients)


def test_a_batch_of_every_size_goes_by_the_top_level_channel_only() -> None:
    # One wake-up mixing sizes around every routing threshold, keys at start, middle and end,
    # nested and quoted "channel" decoys, non-ASCII names and padding.
    from tests.unit.wire.test_frames_envelope import (
        CHANNELS,
        FILLERS,
        POSITIONS,
        ROUTING_SIZES,
        routed_payload,
    )

    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", encoding=TEXT_FRAMES)
    seven = filters.parse_all(["payload.market_id=eq.7"])
    for _ in range(3):
        hub.add(Recorder(), ["fill"])
        hub.add(Recorder(), ["fill"], seven)
        hub.add(Recorder(), ["fill", "cancel"])
        hub.add(Recorder(), ["cancel", "fill"])
    assert hub.stream_count == 3 and hub.client_count == 12


def test_filters_pick_each_streams_messages_in_order() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", encoding=TEXT_FRAMES)
    seven = Recorder()
    hub.add(seven, ["fill"], filters.parse_all(["payload.market_id=eq.7"]))
    hub.publish([fill(1, 8), b"not json"])
    assert seven.offers == [] and hub.routed == 0 and hub.offered == 0


def test_one_channel_ordered_across_channels_for_a_multi_channel_stream() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    both = Recorder()
    hub.add(both, ["a", "b"])
    batch = [b'{"channel":"a","n":1}', b'{"channel":"b","n":2}', b'{"channel":"a","n":3}']
    hub.publish(batch)
    assert both.messages() == [p.decode() for p in batch]
    assert len(both.offers) == 1  # One offer per stream per batch.


def test_compressed_clients_of_a_stream_share_one_compressed_blob() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", encoding=TEXT_FRAMES)
    first, late = Inflating(), Inflating()
    hub.add(first, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(0), fill(1)])
    hub.add(late, ["fill"], compression=Compression.SHARED)
    hub.remove(first)
    hub.publish([fill(2), fill(3)])
    assert late.messages() == [fill(2).decode(), fill(3).decode()]
    assert late.flags == [True, True]


def test_server_no_context_takeover_clients_get_each_message_alone() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
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
    hub = Hub("listen", compression_streams=1, encoding=TEXT_FRAMES)
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


# -- streams: membership, counters, sync points and delivery times -------------------------------


class Clock:
    """Stands in for the hub's ``time`` module: the clock reads what the test set."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


class Queuing(Inflating):
    """A client whose every offer is queued, to be written when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: list[hub_module.Pending] = []

    def offer(self, frame: bytes) -> bool:
        super().offer(frame)
        return True

    def track(self, pending: hub_module.Pending) -> None:
        self.tracked.append(pending)


KINDS = [Compression.OFF, Compression.SHARED, Compression.ALONE]


@pytest.mark.parametrize("second", KINDS)
@pytest.mark.parametrize("first", KINDS)
def test_a_client_leaving_its_stream_leaves_the_others_receiving(
        first: Compression, second: Compression) -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    a, b, leaving = Inflating(), Inflating(), Inflating()
    hub.add(a, ["fill"], compression=first)
    hub.add(b, ["fill"], compression=second)
    hub.publish([fill(0)])  # A SHARED client joins here.
    hub.add(leaving, ["fill"])
    hub.remove(leaving)
    hub.publish([fill(1)])
    assert hub.stream_count == 1 and hub.client_count == 2
    for client in (a, b):
        assert client.messages() == [fill(0).decode(), fill(1).decode()]
    assert leaving.offers == []


def test_a_filtered_and_an_unfiltered_stream_on_one_channel() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    seven, everything = Recorder(), Recorder()
    hub.add(seven, ["fill"], filters.parse_all(["payload.market_id=eq.7"]))
    hub.add(everything, ["fill"])
    hub.publish([fill(1, 7), fill(2, 8)])
    assert seven.messages() == [fill(1, 7).decode()]
    assert everything.messages() == [fill(1, 7).decode(), fill(2, 8).decode()]


def test_filters_compare_fractions_exactly_as_the_payload_wrote_them() -> None:
    # orjson reads both prices as the float 0.1; the filter reads the payload's text again.
    hub = Hub("listen", encoding=TEXT_FRAMES)
    above = Recorder()
    hub.add(above, ["fill"], filters.parse_all(["payload.price=gt.0.1"]))
    batch = [b'{"channel":"fill","payload":{"price":0.1}}',
             b'{"channel":"fill","payload":{"price":0.10000000000000001}}']
    hub.publish(batch)
    assert above.messages() == [batch[1].decode()]


def test_an_unroutable_notification_does_not_stop_the_batch() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    a = Recorder()
    hub.add(a, ["a"])
    hub.publish([b'{"channel":"x"}', b'{"channel":"a","n":1}', b"{", b'{"channel":"a","n":2}'])
    assert a.messages() == ['{"channel":"a","n":1}', '{"channel":"a","n":2}']
    assert hub.routed == 2


def test_removing_a_write_only_or_unknown_client_is_harmless() -> None:
    hub = Hub("listen", encoding=TEXT_FRAMES)
    writer, reader = Recorder(), Recorder()
    hub.add(writer, [])
    hub.add(reader, ["c"])
    hub.remove(writer)
    hub.remove(writer)
    hub.remove(Recorder())
    assert hub.client_count == 1 and hub.stream_count == 1
    hub.publish([b'{"channel":"c"}'])
    assert reader.messages() == ['{"channel":"c"}'] and writer.offers == []


def test_the_default_compressor_budget_is_the_settings_default() -> None:
    from relay.config import SETTINGS

    (setting,) = (s for s in SETTINGS if s.field == "compression_streams")
    budget = setting.parse(setting.default)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    for n in range(budget + 1):
        hub.add(Recorder(), [f"c{n}"], compression=Compression.SHARED)
    assert hub.deflaters == budget


def test_a_compressor_lives_while_a_compressed_client_of_its_stream_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub("listen", compression_streams=3, encoding=TEXT_FRAMES)
    s1, s2, other, plain = Inflating(), Inflating(), Inflating(), Inflating()
    hub.add(s1, ["fill"], compression=Compression.SHARED)
    hub.add(s2, ["fill"], compression=Compression.SHARED)
    hub.add(other, ["other"], compression=Compression.SHARED)
    hub.add(plain, ["fill"])
    assert hub.deflaters == 2
    hub.publish([fill(0)])  # s1 and s2 join the fresh compressor.
    hub.remove(s1)  # s2 still shares it.
    assert hub.deflaters == 2
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 1e9)
    late = Inflating()
    hub.add(late, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(1)])  # late waits: s2 depends on the history.
    hub.remove(s2)  # late, joining, still needs it.
    assert hub.deflaters == 2
    hub.publish([fill(2)])  # No shared client left: late joins, with a restart.
    hub.remove(late)  # The last compressed client of "fill": the compressor goes.
    assert hub.deflaters == 1
    again = Inflating()
    hub.add(again, ["fill"], compression=Compression.SHARED)
    assert hub.deflaters == 2
    hub.publish([fill(3), fill(4)])
    assert again.messages() == [fill(3).decode(), fill(4).decode()]
    assert again.flags == [True, True]  # A new compressor, so no wait.
    assert late.messages() == [fill(1).decode(), fill(2).decode()]
    assert late.flags == [False, True]
    assert plain.messages() == [fill(n).decode() for n in range(5)]
    assert (hub.joins, hub.restarts) == (4, 1)


def test_sync_points_are_spaced_while_shared_clients_depend_on_the_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(100.0)
    monkeypatch.setattr(hub_module, "time", clock)
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 2.0)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    first, second, third = Inflating(), Inflating(), Inflating()
    hub.add(first, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(0)])  # A fresh compressor: a sync point at once, without a restart.
    assert (hub.joins, hub.restarts) == (1, 0)
    hub.add(second, ["fill"], compression=Compression.SHARED)
    clock.now = 101.0
    hub.publish([fill(1)])  # 1 s after the last sync point: too early.
    clock.now = 102.0
    hub.publish([fill(2)])  # 2 s after it: a sync point.
    assert (hub.joins, hub.restarts) == (2, 1)
    hub.add(third, ["fill"], compression=Compression.SHARED)
    clock.now = 103.5
    hub.publish([fill(3)])
    clock.now = 104.0
    hub.publish([fill(4)])
    assert (hub.joins, hub.restarts) == (3, 2)
    assert first.messages() == [fill(n).decode() for n in range(5)]
    assert second.messages() == [fill(n).decode() for n in range(1, 5)]
    assert third.messages() == [fill(3).decode(), fill(4).decode()]
    assert first.flags == [True] * 5
    assert second.flags == [False, True, True, True]
    assert third.flags == [False, True]


def test_offered_counts_every_message_and_byte_offered_to_every_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "_SYNC_SPACING", 1e9)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    clients = [Inflating() for _ in range(8)]
    for client, kind in zip(clients, KINDS * 2, strict=False):
        hub.add(client, ["fill"], compression=kind)
    hub.publish([fill(0), fill(1)])
    joining = clients[6:]
    for client in joining:  # They receive plain frames until the next sync point.
        hub.add(client, ["fill"], compression=Compression.SHARED)
    hub.publish([fill(2), fill(3), b'{"channel":"x"}'])
    hub.publish([fill(4)])
    assert hub.routed == 5
    assert hub.offered == 6 * 5 + 2 * 3
    assert hub.offered_bytes == sum(len(b"".join(client.offers)) for client in clients)
    for client in joining:
        assert client.messages() == [fill(n).decode() for n in range(2, 5)]
        assert client.flags == [False] * 3


def test_a_batch_written_at_once_counts_from_its_arrival_to_the_end_of_the_pass(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(10.25)
    monkeypatch.setattr(hub_module, "time", clock)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    hub.add(Recorder(), ["a"])
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}', b'{"channel":"a"}'], 10.0)
    assert (hub.delivery_times.count, hub.delivery_times.sum) == (2, 0.5)
    hub.publish([b'{"channel":"a"}'])  # Arrived now, by default.
    assert (hub.delivery_times.count, hub.delivery_times.sum) == (3, 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_queued_batch_counts_from_its_arrival_to_its_write(
        monkeypatch: pytest.MonkeyPatch, kind: Compression) -> None:
    clock = Clock(10.25)
    monkeypatch.setattr(hub_module, "time", clock)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    queued = Queuing()
    hub.add(queued, ["a"], compression=kind)
    hub.publish([b'{"channel":"a","n":1}', b'{"channel":"a","n":2}'], 10.0)
    (pending,) = queued.tracked
    assert pending.waiting == 1 and hub.delivery_times.count == 0
    clock.now = 11.0
    pending.done()
    assert (hub.delivery_times.count, hub.delivery_times.sum) == (2, 2.0)
    assert queued.messages() == ['{"channel":"a","n":1}', '{"channel":"a","n":2}']


def test_every_queued_copy_of_a_batch_waits_on_one_pending(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(10.5)
    monkeypatch.setattr(hub_module, "time", clock)
    hub = Hub("listen", encoding=TEXT_FRAMES)
    queued = [Queuing() for _ in range(4)]
    at_once = Recorder()
    hub.add(at_once, ["a"])
    for client, kind in zip(queued, KINDS, strict=False):
        hub.add(client, ["a"], compression=kind)
    hub.add(queued[3], ["b", "a"])  # A second stream, after the first on "a".
    hub.publish([b'{"channel":"a"}', b'{"channel":"b"}', b'{"channel":"z"}'], 10.0)
    (pending,) = {id(p): p for client in queued for p in client.tracked}.values()
    assert all(client.tracked == [pending] for client in queued)
    assert pending.waiting == 4
    for client in queued[:3]:
        client.tracked[0].done()
        assert hub.delivery_times.count == 0
    clock.now = 12.0
    queued[3].tracked[0].done()
    assert (hub.delivery_times.count, hub.delivery_times.sum) == (2, 4.0)
    queued[3].tracked[0].done()  # One call too many changes nothing.
    assert hub.delivery_times.count == 2
    assert hub.offered == 4 + 2  # Four clients in "a"'s stream, two messages for "b"'s.


def test_writes_done_during_the_pass_are_observed_when_it_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(11.0)
    monkeypatch.setattr(hub_module, "time", clock)
    histogram = hub_module.LatencyHistogram()
    pending = hub_module.Pending(10.0, histogram)
    pending.waiting = 1
    pending.done()
    assert histogram.count == 0  # The pass has not said how many notifications it routed.
    pending.arm(3)
    assert (histogram.count, histogram.sum) == (3, 3.0)
    other = hub_module.Pending(10.0, histogram)
    other.waiting = 1
    other.arm(2)
    assert histogram.count == 3
    other.done()
    assert (histogram.count, histogram.sum) == (5, 5.0)


def test_a_message_is_compressed_alone_once_for_every_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    alone = hub_module.deflate.alone

    def counting(payload: bytes) -> bytes:
        calls.append(payload)
        return alone(payload)

    monkeypatch.setattr(hub_module.deflate, "alone", counting)
    # Every SHARED client compresses alone too.
    hub = Hub("listen", compression_streams=0, encoding=TEXT_FRAMES)
    a, b, c = Inflating(), Inflating(), Inflating()
    hub.add(a, ["fill"], compression=Compression.ALONE)
    hub.add(b, ["fill", "other"], compression=Compression.ALONE)
    hub.add(c, ["other", "fill"], compression=Compression.ALONE)
    shared = Inflating()
    hub.add(shared, ["fill"], filters.parse_all(["payload.n=gte.0"]),
            compression=Compression.SHARED)
    hub.publish([fill(0)])
    assert calls == [fill(0)]
    assert a.offers[0] is b.offers[0] is shared.offers[0]
    hub.publish([fill(1), fill(2)])
    assert calls == [fill(0), fill(1), fill(2)]
    for client in (a, b, shared):
        assert client.messages() == [fill(n).decode() for n in range(3)]
        assert client.flags == [True] * 3
    assert c.offers == b.offers  # Same channels as b: c is in b's stream.
