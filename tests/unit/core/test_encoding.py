"""The hub's encodings: what a transport's bytes are is the stream's encoding's business.

``Lines`` stands in for a second transport (each message a line, as an event stream would have
it); streams of both encodings share a channel, the history and the filters, and each client
receives its own encoding's bytes, made once per batch.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from relay.core.encoding import Encoding
from relay.core.history import History
from relay.core.hub import Compression, Hub
from relay.wire import deflate, frames, positions
from relay.wire.frames import TEXT_FRAMES


class Lines:
    """An encoding of another transport: ``M <text>`` lines, ``D <position> <payload>`` for a
    positioned delivery, ``E <name> <position> <json>`` for an event, ``P <n>`` for a ping; it
    counts the messages it is asked to make."""

    def __init__(self) -> None:
        self.made = 0

    def message(self, text: bytes) -> bytes:
        self.made += 1
        return b"M " + text + b"\n"

    def event(self, name: str, position: str, text: bytes) -> bytes:
        return b"E %s %s " % (name.encode(), position.encode()) + text + b"\n"

    def delivery(self, position: bytes, payload: bytes) -> Sequence[bytes]:
        self.made += 1
        return (b"D ", position, b" ", payload, b"\n")

    def delivery_text(self, position: bytes, payload: bytes) -> bytes:
        return position + b" " + payload

    def compressed(self, deflated: bytes) -> bytes:
        raise NotImplementedError("lines are never compressed")

    def ping(self, counter: int) -> bytes:
        return b"P %d\n" % counter


class Recorder:
    def __init__(self) -> None:
        self.offers: list[bytes] = []
        self.replays: list[list[bytes]] = []

    def offer(self, data: bytes) -> bool:
        self.offers.append(data)
        return False

    def replay(self, parts: list[bytes]) -> None:
        self.replays.append(parts)
        self.offers.append(b"".join(parts))

    def track(self, pending: object) -> None:
        raise AssertionError("nothing was queued")

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not closed here")

    def lines(self) -> list[bytes]:
        return b"".join(self.offers).splitlines()


def _p(n: int, channel: str = "c") -> bytes:
    return json.dumps({"channel": channel, "n": n}).encode()


def _hub(history: bool = False) -> Hub:
    kept = History(100, 1 << 24, 3600) if history else None
    return Hub("listen", history=kept, encoding=TEXT_FRAMES)


def test_a_stream_gets_its_encodings_bytes_made_once_per_batch_whatever_its_clients() -> None:
    hub, lines = _hub(), Lines()
    framed = [Recorder() for _ in range(2)]
    lined = [Recorder() for _ in range(3)]
    for client in framed:
        hub.add(client, ["c"])
    for client in lined:
        hub.add(client, ["c"], encoding=lines)
    assert hub.stream_count == 2  # Same channel and filters, another encoding: another stream.
    hub.publish([_p(1), _p(2, "other")])
    hub.publish([_p(3), _p(4)])
    assert lines.made == 3  # One per message delivered, not one per client.
    assert all(c.lines() == [b"M " + _p(1), b"M " + _p(3), b"M " + _p(4)] for c in lined)
    assert all(c.offers[1] is lined[0].offers[1] for c in lined)  # The same object for all.
    assert framed[0].offers == [frames.text(_p(1)), frames.text(_p(3)) + frames.text(_p(4))]
    assert framed[1].offers == framed[0].offers


def test_pings_and_control_events_come_in_each_clients_encoding() -> None:
    hub, lines = _hub(history=True), Lines()
    writer, reader, framed = Recorder(), Recorder(), Recorder()
    hub.add(writer, [], encoding=lines)  # Write-only: pings only.
    hub.add(reader, ["c"], positioned=True, encoding=lines)
    hub.add(framed, ["c"], positioned=True)
    hub.publish([_p(1)])
    hub.checkpoint()
    hub.listening()
    hub.ping_all()
    assert writer.lines() == [b"P 1"]
    told = reader.lines()
    assert [line[:2] for line in told] == [b"E ", b"D ", b"E ", b"E ", b"P "]
    named = [line.split(b" ", 3) for line in told if line.startswith(b"E ")]
    events = [json.loads(text) for _, _, _, text in named]
    assert [e["event"] for e in events] == ["position", "position", "lost"]
    assert [name.decode() for _, name, _, _ in named] == ["position", "position", "lost"]
    assert all(position.decode() == e["position"] for (_, _, position, _), e
               in zip(named, events, strict=True))
    assert events[-1]["reason"] == positions.GAP
    assert told[1].split(b" ", 2)[1].decode() == events[1]["position"]  # Its delivery's.
    assert told[-1] == b"P 1"
    assert framed.offers[-1] == frames.ping(b"1")
    assert framed.offers[-2] == frames.text(named[2][3])  # The same event, framed.


def test_a_replay_shares_the_historys_payloads_and_positions_in_every_encoding() -> None:
    hub, lines = _hub(history=True), Lines()
    watcher = Recorder()
    hub.add(watcher, ["c"], positioned=True)
    hub.publish([_p(1)])
    start = positions.read(frames.payload_of(watcher.offers[-1]).decode()).position
    hub.publish([_p(2), _p(3)])
    assert hub.history is not None
    entries = list(hub.history.after(0, ["c"]))[1:]
    for encoding in (TEXT_FRAMES, lines):
        back = Recorder()
        hub.add(back, ["c"], positioned=True, resume=positions.parse_position(start),
                encoding=encoding)
        [parts] = back.replays
        for entry in entries:
            assert any(part is entry.payload for part in parts)
            assert any(part is entry.position for part in parts)
    assert back.lines()[-2:] == [b"D " + entries[0].position + b" " + _p(2),  # type: ignore[operator]
                                 b"D " + entries[1].position + b" " + _p(3)]  # type: ignore[operator]


def test_removed_write_only_and_parked_clients_get_no_more_pings() -> None:
    hub, lines = _hub(history=True), Lines()
    writer, parked = Recorder(), Recorder()
    hub.add(writer, [], encoding=lines)
    stranger = positions.Position(0x12345678, 1, 0xFEDCBA9876543210, 0x7FFFFFFF)
    assert hub.add(parked, ["c"], positioned=True, resume=stranger, encoding=lines) is True
    hub.ping_all()
    assert writer.lines() == parked.lines() == [b"P 1"]
    hub.remove(writer)
    hub.remove(parked)
    hub.ping_all()
    assert writer.lines() == parked.lines() == [b"P 1"]
    assert hub.client_count == 0


def test_a_parked_client_given_up_on_is_told_unknown_in_its_encoding() -> None:
    hub, lines = _hub(history=True), Lines()
    parked = Recorder()
    stranger = positions.Position(0x12345678, 1, 0xFEDCBA9876543210, 0x7FFFFFFF)
    assert hub.add(parked, ["c"], positioned=True, resume=stranger, encoding=lines) is True
    hub.give_up(parked)
    hub.publish([_p(1)])
    [event, delivery] = parked.lines()
    assert event.startswith(b"E lost ")
    assert json.loads(event.split(b" ", 3)[3])["reason"] == positions.UNKNOWN
    assert delivery.startswith(b"D ") and delivery.endswith(b" " + _p(1))


_texts = st.text(max_size=300).map(str.encode)


@given(position=st.text("0123456789abcdef.", min_size=1, max_size=80).map(str.encode),
       payload=_texts | st.sampled_from([124, 125, 126, 65_535, 65_536]).map(b"a".__mul__))
def test_text_frames_keep_the_encoding_contract(position: bytes, payload: bytes) -> None:
    encoding: Encoding = TEXT_FRAMES
    parts = encoding.delivery(position, payload)
    assert b"".join(parts) == encoding.message(encoding.delivery_text(position, payload)) \
        == frames.text(positions.delivery(position, payload))
    assert parts[1] is position and parts[-1] is payload
    assert encoding.message(payload) == frames.text(payload)
    assert encoding.compressed(deflate.alone(payload)) == \
        frames.compressed_text(deflate.alone(payload))
    assert encoding.ping(12) == frames.ping(b"12")


def test_compressed_clients_of_another_encoding_get_its_compressed_bytes() -> None:
    class Squeezed(Lines):
        def compressed(self, deflated: bytes) -> bytes:
            return b"Z " + deflated.hex().encode() + b"\n"

    hub, squeezed = _hub(), Squeezed()
    shared, alone = Recorder(), Recorder()
    hub.add(shared, ["c"], compression=Compression.SHARED, encoding=squeezed)
    hub.add(alone, ["c"], compression=Compression.ALONE, encoding=squeezed)
    hub.publish([_p(1)])
    hub.publish([_p(2)])
    assert alone.lines() == [b"Z " + deflate.alone(_p(n)).hex().encode() for n in (1, 2)]
    # The shared client joined a fresh compressor at once: one context for its messages.
    inflater = zlib.decompressobj(-15)
    assert [inflater.decompress(bytes.fromhex(line[2:].decode()) + b"\x00\x00\xff\xff")
            for line in shared.lines()] == [_p(1), _p(2)]
