"""The hub with history: positioned streams, resume and its seam, parked clients, breaks.

Recorders stand in for clients, as in test_hub.py; they record what is offered and replayed,
in order, which is the hub's contract.
"""

from __future__ import annotations

import json
import time
import zlib

from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from relay.core import filters
from relay.core import hub as hub_module
from relay.core.history import History
from relay.core.hub import Compression, Hub
from relay.wire import positions
from relay.wire.frames import TEXT_FRAMES
from relay.wire.positions import Control, Delivery


class Recorder:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replayed = 0

    def offer(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return False

    def replay(self, parts: list[bytes]) -> None:
        self.sent.extend(parts)
        self.replayed += len(_texts(b"".join(parts)))

    def track(self, pending: object) -> None:
        raise AssertionError("nothing was queued")

    def close(self, code: int, reason: str) -> None:
        raise AssertionError("not closed here")

    def texts(self) -> list[str]:
        return _texts(b"".join(self.sent))

    def read(self) -> list[Delivery | Control]:
        return [positions.read(text) for text in self.texts()]

    def ns(self) -> list[int]:
        return [json.loads(m.payload)["n"] for m in self.read() if isinstance(m, Delivery)]

    def last_position(self) -> str:
        return self.read()[-1].position


def _texts(data: bytes) -> list[str]:
    """The text messages in ``data``, read as a WebSocket client reads them."""
    parser = Connection(ConnectionType.CLIENT)
    parser.receive_data(data)
    return [event.data for event in parser.events() if isinstance(event, TextMessage)]


def _hub(messages: int = 100) -> Hub:
    return Hub("listen", history=History(messages, 1 << 24, 3600), encoding=TEXT_FRAMES)


def _p(n: int, channel: str = "c", **fields: object) -> bytes:
    return json.dumps({"channel": channel, "n": n, **fields}).encode()


def _resume(position: str) -> positions.Position:
    parsed = positions.parse_position(position)
    assert parsed is not None
    return parsed


def test_clients_that_do_not_ask_for_positions_get_todays_bytes() -> None:
    with_history, without = _hub(), Hub("listen", encoding=TEXT_FRAMES)
    a, b = Recorder(), Recorder()
    with_history.add(a, ["c"])
    without.add(b, ["c"])
    for hub in (with_history, without):
        hub.publish([_p(1), b"not json"])
        hub.publish([_p(2)])
    assert a.sent == b.sent
    assert a.texts() == [_p(1).decode(), _p(2).decode()]


def test_positioned_clients_get_their_position_then_shared_positioned_frames() -> None:
    hub = _hub()
    hub.publish([_p(0)])
    first, second = Recorder(), Recorder()
    hub.add(first, ["c"], positioned=True)
    hub.add(second, ["c"], positioned=True)
    assert first.read() == [Control("position", hub.history.position)]  # type: ignore[union-attr]
    hub.publish([_p(1)])
    assert first.sent[-1] is second.sent[-1]
    delivery = first.read()[-1]
    assert isinstance(delivery, Delivery) and delivery.payload == _p(1).decode()
    assert delivery.position == hub.history.position  # type: ignore[union-attr]


def test_a_returning_client_gets_what_it_missed_once_then_live_in_one_step() -> None:
    hub = _hub()
    gone = Recorder()
    hub.add(gone, ["c", "d"], positioned=True)
    hub.publish([_p(1), _p(2, "d")])
    position = gone.last_position()
    hub.remove(gone)
    hub.publish([_p(3), _p(4, "other"), _p(5, "d")])
    hub.publish([_p(6)])
    back = Recorder()
    assert hub.add(back, ["c", "d"], positioned=True, resume=_resume(position)) is False
    hub.publish([_p(7, "d")])
    events = back.read()
    assert events[0] == Control("resumed", position, None, 3)
    assert back.ns() == [3, 5, 6, 7]
    assert back.replayed == 3
    assert hub.resumes["resumed"] == 1 and hub.replayed == 3


def test_filters_apply_to_the_replay_as_to_live_traffic() -> None:
    hub = _hub()
    only_two = filters.parse_all(["market=eq.2"])
    watcher = Recorder()
    hub.add(watcher, ["c"], only_two, positioned=True)
    position = watcher.last_position()
    hub.remove(watcher)
    hub.publish([_p(n, market=n % 3) for n in range(1, 10)])
    back = Recorder()
    hub.add(back, ["c"], only_two, positioned=True, resume=_resume(position))
    hub.publish([_p(11, market=2), _p(12, market=0)])
    assert back.ns() == [2, 5, 8, 11]
    assert back.read()[0] == Control("resumed", position, None, 3)


def test_a_position_out_of_the_history_is_lost_expired_and_the_stream_goes_on() -> None:
    hub = _hub(messages=2)
    watcher = Recorder()
    hub.add(watcher, ["c"], positioned=True)
    position = watcher.last_position()
    hub.remove(watcher)
    hub.publish([_p(n) for n in range(1, 5)])
    back = Recorder()
    hub.add(back, ["c"], positioned=True, resume=_resume(position))
    hub.publish([_p(5)])
    lost = back.read()[0]
    assert (lost.event, lost.reason) == ("lost", "expired")  # type: ignore[union-attr]
    assert positions.parse_position(lost.position).seq == 4  # type: ignore[union-attr]
    assert back.ns() == [5]
    assert hub.resumes["expired"] == 1


def test_another_processes_position_parks_the_client_until_it_arrives() -> None:
    ahead, hub = _hub(), _hub()
    batch = [_p(n) for n in range(1, 20)]
    ahead.publish(batch)
    early = Recorder()
    ahead.add(early, ["c"], positioned=True)
    seen = early.last_position()  # After n=19 on the process that is ahead.
    hub.publish(batch[:10])
    parked = Recorder()
    assert hub.add(parked, ["c"], positioned=True, resume=_resume(seen)) is True
    hub.publish(batch[10:15])
    assert parked.sent == []
    hub.publish([*batch[15:], _p(20), _p(21)])  # n=19 arrives mid-batch.
    assert parked.read()[0] == Control("resumed", seen, None, 2)
    assert parked.ns() == [20, 21]
    hub.publish([_p(22)])
    assert parked.ns() == [20, 21, 22]
    hub.give_up(parked)  # Too late to matter: it is in.
    assert parked.ns() == [20, 21, 22]


def test_a_parked_client_given_up_on_hears_unknown_and_gets_live_traffic() -> None:
    hub = _hub()
    hub.publish([_p(1)])
    stranger = positions.Position(hub.history.epoch ^ 1, 7, 0x1234,  # type: ignore[union-attr]
                                 int(time.time()))
    parked, leaving = Recorder(), Recorder()
    assert hub.add(parked, ["c"], positioned=True, resume=stranger) is True
    assert hub.add(leaving, ["c"], positioned=True, resume=stranger) is True
    hub.remove(leaving)
    hub.give_up(leaving)
    assert leaving.sent == []
    hub.give_up(parked)
    assert parked.read() == [Control("lost", hub.history.position, "unknown")]  # type: ignore[union-attr]
    hub.publish([_p(2)])
    assert parked.ns() == [2]
    assert hub.client_count == 1


def test_each_listen_break_tells_positioned_clients_of_the_gap_and_no_one_else() -> None:
    hub = _hub()
    positioned, plain = Recorder(), Recorder()
    hub.add(positioned, ["c"], positioned=True)
    hub.add(plain, ["c"])
    hub.publish([_p(1)])
    before = positioned.last_position()
    hub.listening()
    gap = positioned.read()[-1]
    assert gap == Control("lost", hub.history.position, "gap")  # type: ignore[union-attr]
    assert plain.texts() == [_p(1).decode()]
    back = Recorder()
    hub.add(back, ["c"], positioned=True, resume=_resume(before))
    assert back.read()[0].reason == "gap"
    again = Recorder()
    hub.add(again, ["c"], positioned=True, resume=_resume(gap.position))
    assert again.read()[0] == Control("resumed", gap.position, None, 0)


def test_checkpoints_go_to_positioned_clients_when_the_stream_moved() -> None:
    hub = _hub()
    positioned, plain = Recorder(), Recorder()
    hub.add(positioned, ["c"], filters.parse_all(["n=eq.99"]), positioned=True)
    hub.add(plain, ["c"])
    hub.checkpoint(0.0)
    hub.publish([_p(1), _p(2)])
    hub.checkpoint(0.0)
    hub.checkpoint(0.0)
    events = positioned.read()
    assert [type(e) for e in events] == [Control, Control]
    assert events[-1] == Control("position", hub.history.position)  # type: ignore[union-attr]
    assert len(plain.texts()) == 2


def test_meta_events_made_here_reach_positioned_clients_without_a_position_of_their_own() -> None:
    hub = _hub()
    positioned = Recorder()
    hub.add(positioned, ["meta"], positioned=True)
    head = hub.history.position  # type: ignore[union-attr]
    hub.publish([_p(1, "meta")], local=True)
    delivery = positioned.read()[-1]
    assert delivery == Delivery(head, _p(1, "meta").decode())
    assert hub.history.position == head and hub.history.entries == 0  # type: ignore[union-attr]


def test_compressed_positioned_clients_inflate_to_the_positioned_text() -> None:
    hub = _hub()
    shared, alone = Recorder(), Recorder()
    hub.add(shared, ["c"], compression=Compression.SHARED, positioned=True)
    hub.add(alone, ["c"], compression=Compression.ALONE, positioned=True)
    hub.publish([_p(1)])  # The joiner's sync point: from here on it shares the compressor.
    hub.publish([_p(2), _p(3)])
    for recorder in (shared, alone):
        parser = Connection(ConnectionType.CLIENT, extensions=[_Inflate()])
        parser.receive_data(b"".join(recorder.sent))
        texts = [e.data for e in parser.events() if isinstance(e, TextMessage)]
        delivered = [positions.read(t) for t in texts]
        assert [json.loads(d.payload)["n"] for d in delivered if isinstance(d, Delivery)] \
            == [1, 2, 3]
        assert all(d.position.startswith(f"{hub.history.epoch:08x}.")  # type: ignore[union-attr]
                   for d in delivered)


class _Inflate:
    """A minimal permessage-deflate decoder for wsproto's client parser."""

    name = "permessage-deflate"

    def __init__(self) -> None:
        self._inflater = zlib.decompressobj(-15)
        self._compressed = False

    def enabled(self) -> bool:
        return True

    def frame_inbound_header(self, proto, opcode, rsv, payload_length):  # type: ignore[no-untyped-def]
        from wsproto.frame_protocol import RsvBits
        if opcode.iscontrol():
            return RsvBits(False, False, False)
        self._compressed = rsv.rsv1
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(self, proto, data):  # type: ignore[no-untyped-def]
        return self._inflater.decompress(bytes(data)) if self._compressed else data

    def frame_inbound_complete(self, proto, fin):  # type: ignore[no-untyped-def]
        if self._compressed and fin:
            return self._inflater.decompress(b"\x00\x00\xff\xff")
        return None

    def frame_outbound(self, proto, opcode, rsv, data, fin):  # type: ignore[no-untyped-def]
        return rsv, data


# -- what mutation testing asked for (docs/mutation.md) ------------------------------------------

def test_only_a_parked_client_makes_add_return_true() -> None:
    hub = _hub()
    assert hub.add(Recorder(), []) is False  # Write-only.
    assert hub.add(Recorder(), ["c"]) is False
    assert hub.add(Recorder(), ["c"], positioned=True) is False


def test_outcomes_and_replayed_deliveries_add_up() -> None:
    hub = _hub(messages=2)
    head = hub.history.position  # type: ignore[union-attr]
    hub.publish([_p(1), _p(2)])
    middle = hub.history.position  # type: ignore[union-attr]
    hub.publish([_p(3), _p(4)])
    for position in (head, head, middle, middle):
        hub.add(Recorder(), ["c"], positioned=True, resume=_resume(position))
    assert hub.resumes == {"resumed": 2, "expired": 2, "gap": 0, "unknown": 0}
    assert hub.replayed == 4


def test_the_replay_filters_fractions_as_the_payload_wrote_them() -> None:
    """orjson reads both prices as the float 0.1; the filter reads the payload's text again."""
    hub = _hub()
    head = hub.history.position  # type: ignore[union-attr]
    batch = [b'{"channel":"c","payload":{"price":0.1}}',
             b'{"channel":"c","payload":{"price":0.10000000000000001}}']
    hub.publish(batch)
    back = Recorder()
    hub.add(back, ["c"], filters.parse_all(["payload.price=gt.0.1"]), positioned=True,
            resume=_resume(head))
    assert [m.payload for m in back.read() if isinstance(m, Delivery)] == [batch[1].decode()]


def _ahead(batch: list[bytes]) -> str:
    """The position a client of another process holds after ``batch``."""
    ahead = _hub()
    ahead.publish(batch)
    early = Recorder()
    ahead.add(early, ["c"], positioned=True)
    return early.last_position()


def test_parked_clients_whose_positions_arrive_in_one_batch_all_get_in_once() -> None:
    batch = [_p(n) for n in range(1, 20)]
    first, second = _ahead(batch[:12]), _ahead(batch[:15])
    hub = _hub()
    hub.publish(batch[:5])
    a, b = Recorder(), Recorder()
    assert hub.add(a, ["c"], positioned=True, resume=_resume(first)) is True
    assert hub.add(b, ["c"], positioned=True, resume=_resume(second)) is True
    hub.publish(batch[5:])
    assert a.read()[0] == Control("resumed", first, None, 7)
    assert b.read()[0] == Control("resumed", second, None, 4)
    assert a.ns() == list(range(13, 20)) and b.ns() == list(range(16, 20))
    sent = len(a.sent)
    hub.give_up(a)  # It is in: there is nothing to give up on.
    assert len(a.sent) == sent
    assert hub.resumes["resumed"] == 2 and hub.resumes["unknown"] == 0


def test_a_parked_client_is_resolved_against_its_own_channels() -> None:
    """Its position is a point of another channel; its own channel dropped a delivery after it
    in the same batch: that is expired, not a resume that skips it."""
    seen = _ahead([_p(n) for n in range(1, 19)] + [_p(19, "x")])
    hub = Hub("listen", history=History(2, 1 << 24, 3600), encoding=TEXT_FRAMES)
    hub.publish([_p(n) for n in range(1, 10)])
    parked = Recorder()
    assert hub.add(parked, ["c"], positioned=True, resume=_resume(seen)) is True
    hub.publish([_p(n) for n in range(10, 19)] + [_p(19, "x"), _p(20), _p(21), _p(22)])
    lost = parked.read()[0]
    assert (lost.event, lost.reason) == ("lost", "expired")  # type: ignore[union-attr]
    assert parked.ns() == []


def test_a_parked_clients_position_that_leaves_the_history_at_once_is_unknown() -> None:
    """It arrived and was pushed out in the same batch: no longer found by its digest."""
    batch = [_p(n) for n in range(1, 20)]
    seen = _ahead(batch[:15])
    hub = Hub("listen", history=History(1, 1 << 24, 3600), encoding=TEXT_FRAMES)
    hub.publish(batch[:5])
    parked = Recorder()
    assert hub.add(parked, ["c"], positioned=True, resume=_resume(seen)) is True
    hub.publish(batch[5:])
    lost = parked.read()[0]
    assert (lost.event, lost.reason) == ("lost", "unknown")  # type: ignore[union-attr]
    assert hub.resumes["unknown"] == 1


def test_a_checkpoint_ages_the_history_on_the_clock_given_or_now() -> None:
    hub = Hub("listen", history=History(100, 1 << 24, 10), encoding=TEXT_FRAMES)
    arrived = time.monotonic() - 100
    hub.publish([_p(1)], arrived=arrived)
    hub.checkpoint(arrived + 10)
    assert hub.history.entries == 1  # type: ignore[union-attr]
    hub.checkpoint()
    assert hub.history.entries == 0  # type: ignore[union-attr]


def test_a_digest_twice_in_one_batch_admits_its_client_once_and_the_others_after_it() -> None:
    tick = b'{"channel":"c","tick":1}'
    run = [tick] * (positions.WINDOW + 2)  # Its last three points have one digest.
    ambiguous, after_it = _ahead(run[:-1]), _ahead([*run, _p(1)])
    hub = _hub()
    a, b = Recorder(), Recorder()
    assert hub.add(a, ["c"], positioned=True, resume=_resume(ambiguous)) is True
    assert hub.add(b, ["c"], positioned=True, resume=_resume(after_it)) is True
    hub.publish([*run, _p(1)])
    assert [m for m in a.read() if isinstance(m, Control)] == \
        [Control("lost", hub.history.position, "unknown")]  # type: ignore[union-attr]
    assert b.read() == [Control("resumed", after_it, None, 0)]
    hub.publish([_p(2)])
    assert a.ns() == b.ns() == [2]


def test_a_filtered_resume_does_at_most_its_work_bound_and_no_more() -> None:
    """Beyond it the replay would hold the relay too long in one step: expired instead. The
    work counts each entry's parse and its whole filter set (and the first build of a matched
    entry's frame), so a costly set replays less."""
    never = filters.parse_all(["n=eq.7"])  # Matches nothing: no frame is built.
    per_entry = filters.cost(next(iter(never))) + hub_module._parse_units(_p(1))
    fits = hub_module.REPLAY_WORK // per_entry
    hub = _hub(messages=2 * fits)
    head = hub.history.position  # type: ignore[union-attr]
    hub.publish([_p(n % 2) for n in range(fits)])
    within = Recorder()
    hub.add(within, ["c"], never, positioned=True, resume=_resume(head))
    assert within.read() == [Control("resumed", head, None, 0)]
    hub.publish([_p(0)])
    beyond, unfiltered = Recorder(), Recorder()
    hub.add(beyond, ["c"], never, positioned=True, resume=_resume(head))
    assert beyond.read() == [Control("lost", hub.history.position, "expired")]  # type: ignore[union-attr]
    hub.add(unfiltered, ["c"], positioned=True, resume=_resume(head))
    assert unfiltered.read()[0] == Control("resumed", head, None, fits + 1)
    assert hub.resumes == {"resumed": 2, "expired": 1, "gap": 0, "unknown": 0}
    deep = filters.parse_all([f"a.b.c.d.e.f.g.h.{j}=neq.x" for j in range(32)])
    costly = Recorder()
    hub.add(costly, ["c"], deep, positioned=True, resume=_resume(head))
    assert costly.read() == [Control("lost", hub.history.position, "expired")]  # type: ignore[union-attr]


# -- log positions and catching up -----------------------------------------------------------

def _log_hub() -> Hub:
    history = History(100, 1 << 24, 3600)
    history.adopt_log(0xABCD, (1 << 32) - 1)
    return Hub("listen", history=history, encoding=TEXT_FRAMES)


def _at(lsn: int, count: int = 1) -> list[tuple[int, int]]:
    return [(lsn << 32 | index, 1_700_000_000) for index in range(count)]


def test_clients_wait_while_the_source_catches_up_then_enter_with_what_they_missed() -> None:
    hub = _log_hub()
    hub.publish([_p(1)], places=_at(1))
    position = hub.history.position  # type: ignore[union-attr]
    hub.catching_up = True
    back, fresh, plain, writer = Recorder(), Recorder(), Recorder(), Recorder()
    assert hub.add(back, ["c"], positioned=True, resume=_resume(position)) is True
    assert hub.add(fresh, ["c"], positioned=True) is True
    assert hub.add(plain, ["c"]) is True
    assert hub.add(writer, []) is False  # Writes only: nothing to wait for.
    hub.publish([_p(2), _p(3)], places=_at(2, 2))  # Read again: kept, delivered to no one.
    assert back.sent == fresh.sent == plain.sent == []
    hub.caught_up()
    assert back.read()[0] == Control("resumed", position, None, 2) and back.ns() == [2, 3]
    assert isinstance(fresh.read()[0], Control) and fresh.ns() == []
    hub.publish([_p(4)], places=_at(3))
    assert back.ns() == [2, 3, 4] and fresh.ns() == [4]
    assert json.loads(plain.texts()[-1])["n"] == 4 and len(plain.texts()) == 1


def test_a_log_position_ahead_of_this_reader_waits_until_it_is_read() -> None:
    hub = _log_hub()
    ahead = positions.Position(0xABCD, 5, 0, 1_700_000_000)
    parked = Recorder()
    assert hub.add(parked, ["c"], positioned=True, resume=ahead) is True
    hub.publish([_p(1)], places=_at(4))
    assert parked.sent == []
    hub.publish([_p(2), _p(3)], places=_at(5, 2))  # Its point, and one after it.
    assert parked.read()[0] == Control("resumed", hub.history.text(ahead), None, 1)  # type: ignore[union-attr]
    assert parked.ns() == [3]


class Closable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_a_client_given_up_on_while_catching_up_is_closed_and_later_an_unread_position_is_unknown(
        ) -> None:
    hub = _log_hub()
    hub.catching_up = True
    waiting, back = Closable(), Closable()
    assert hub.add(waiting, ["c"]) is True
    hub.give_up(waiting)  # Let in now, it would get what is read back as live.
    assert waiting.closed == (1013, "catching up") and waiting.sent == []
    hub.publish([_p(1)], places=_at(2))
    assert waiting.sent == []
    assert hub.caught_up() is False
    assert hub.add(back, ["c"], positioned=True,
                   resume=positions.Position(0xABCD, 9, 0, 1_700_000_000)) is True
    hub.give_up(back)  # Not read here yet, after waiting: unknown.
    assert back.read()[0].reason == positions.UNKNOWN  # type: ignore[union-attr]
    hub.publish([_p(2)], places=_at(3))
    assert back.ns() == [2] and back.closed is None


def test_caught_up_lets_waiting_clients_in_a_few_at_a_time_in_order() -> None:
    hub = _log_hub()
    hub.catching_up = True
    clients = [Recorder() for _ in range(5)]
    for client in clients:
        assert hub.add(client, ["c"], positioned=True) is True
    assert hub.caught_up(2) is True and not hub.catching_up
    assert [bool(c.sent) for c in clients] == [True, True, False, False, False]
    late = Recorder()
    assert hub.add(late, ["c"], positioned=True) is False  # Not catching up any more.
    hub.publish([_p(1)], places=_at(2))
    assert clients[0].ns() == [1] and clients[2].sent == []
    assert hub.caught_up(2) is True and hub.caught_up(2) is False
    hub.publish([_p(2)], places=_at(3))
    assert [c.ns() for c in clients] == [[1, 2], [1, 2], [2], [2], [2]]


def _stream_hub(messages: int = 3) -> tuple[Hub, list[tuple[object, int, int]]]:
    history = History(messages, 1 << 24, 3600)
    history.adopt_log(0xABCD, 0)
    hub = Hub("listen", history=history, encoding=TEXT_FRAMES)
    asked: list[tuple[object, int, int]] = []
    hub.backfill = lambda client, after, until: asked.append((client, after, until))
    return hub, asked


def test_a_resume_older_than_the_history_is_read_again_from_the_source() -> None:
    hub, asked = _stream_hub()
    watcher = Recorder()
    hub.add(watcher, ["c"], positioned=True)
    for n in range(1, 9):  # Channel c keeps 3: 6, 7, 8.
        hub.publish([_p(n), _p(100 + n, "d")], places=_at(n, 2))
    position = watcher.read()[2].position  # After delivery 2.
    back = Recorder()
    assert hub.add(back, ["c"], filters.parse_all(["n=neq.4"]), positioned=True,
                   resume=_resume(position)) is True
    [(client, after, until)] = asked
    assert client is back and after == 2 << 32 and until == 5 << 32
    source = [(n << 32 | i, 1_700_000_000, _p(n) if i == 0 else _p(100 + n, "d"))
              for n in range(3, 6) for i in range(2)]
    hub.backfilled(back, source, until)
    assert back.read()[0] == Control("resumed", position, None, 5)
    assert back.ns() == [3, 5, 6, 7, 8]  # 4 filtered out, d's not its channel.
    hub.publish([_p(9)], places=_at(9))
    assert back.ns() == [3, 5, 6, 7, 8, 9]
    delivered = [event for event in back.read() if isinstance(event, positions.Delivery)]
    assert len({event.position for event in delivered}) == 6  # Each its own position.


def test_a_resume_the_source_cannot_read_again_is_expired_and_a_late_answer_is_ignored(
        ) -> None:
    hub, asked = _stream_hub()
    for n in range(1, 9):
        hub.publish([_p(n)], places=_at(n))
    old = positions.Position(0xABCD, 1, 0, 1_700_000_000)
    refused = Recorder()
    assert hub.add(refused, ["c"], positioned=True, resume=old) is True
    hub.backfilled(refused, None, asked[0][2])  # Aged out of the source meanwhile.
    assert refused.read()[0].reason == positions.EXPIRED  # type: ignore[union-attr]
    too_many = [(n << 32, 1, _p(n)) for n in range(2, 3 + hub_module.BACKFILL_MESSAGES)]
    again = Recorder()
    assert hub.add(again, ["c"], positioned=True, resume=old) is True
    hub.backfilled(again, too_many, asked[1][2])
    assert again.read()[0].reason == positions.EXPIRED  # type: ignore[union-attr]


def test_a_resume_the_source_cannot_read_now_is_asked_to_come_back_and_told_nothing_lost(
        ) -> None:
    hub, asked = _stream_hub()
    for n in range(1, 9):
        hub.publish([_p(n)], places=_at(n))
    old = positions.Position(0xABCD, 1, 0, 1_700_000_000)
    away, slow = Closable(), Closable()
    assert hub.add(away, ["c"], positioned=True, resume=old) is True
    assert hub.add(slow, ["c"], positioned=True, resume=old) is True
    hub.backfill_unavailable(away)  # The source tried again and could not.
    assert away.closed == (1013, "stream unavailable") and away.read() == []
    hub.give_up(slow)  # Waited for a first step too long: the same, not "lost".
    assert slow.closed == (1013, "stream unavailable") and slow.read() == []
    assert hub.backfilled(slow, [], asked[1][2]) is None  # A late answer is dropped.
    hub.backfill_unavailable(slow)
    assert slow.read() == []


class Queueing(Recorder):
    """A client whose socket takes nothing at once: what it is offered waits to be written."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: list[object] = []

    def offer(self, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def track(self, pending: object) -> None:
        self.tracked.append(pending)

    def write(self) -> None:
        for pending in self.tracked:
            pending.done()  # type: ignore[attr-defined]
        self.tracked = []


def _source(first: int, last: int) -> list[tuple[int, int, bytes]]:
    """What a stream holds from sequence ``first`` to ``last``: one message of c each."""
    return [(n << 32, 1_700_000_000, _p(n)) for n in range(first, last + 1)]


def test_a_resume_read_again_in_steps_reads_each_after_the_last_was_written_then_joins(
        ) -> None:
    hub, asked = _stream_hub()
    watcher = Recorder()
    hub.add(watcher, ["c"], positioned=True)
    for n in range(1, 11):  # Channel c keeps 3: 8, 9, 10.
        hub.publish([_p(n)], places=_at(n))
    position = watcher.read()[0].position  # Before delivery 1.
    back = Queueing()
    assert hub.add(back, ["c"], positioned=True, resume=_resume(position)) is True
    [(_, after, until)] = asked
    assert after == 0 and until == 7 << 32
    written: list[int] = []
    # A first step, short of what is missing: resumed (count not known yet), then the step.
    assert hub.backfilled(back, _source(1, 4), 4 << 32, lambda: written.append(1)) == 7 << 32
    assert back.read()[0] == Control("resumed", position, None, None)
    assert back.ns() == [1, 2, 3, 4]
    assert written == [] and len(back.tracked) == 1
    hub.give_up(back)  # Waiting for the source in steps: not given up on.
    assert back.ns() == [1, 2, 3, 4]
    hub.publish([_p(11)], places=_at(11))  # Not joined yet: nothing live in between.
    assert back.ns() == [1, 2, 3, 4]
    back.write()
    assert written == [1]
    # The history moved on meanwhile (it keeps 9, 10, 11): the next step reads up to 8.
    assert hub.backfilled(back, _source(5, 7), 7 << 32) == 8 << 32
    assert hub.backfilled(back, _source(8, 8), 8 << 32) is None
    assert back.ns() == list(range(1, 12))
    hub.publish([_p(12)], places=_at(12))
    assert back.ns() == list(range(1, 13))
    assert sum(isinstance(m, Control) for m in back.read()) == 1
    assert len({m.position for m in back.read()}) == 13
    assert hub.backfilled(back, _source(9, 9), 9 << 32) is None  # Late: ignored.
    assert back.ns() == list(range(1, 13))


def test_a_step_that_cannot_be_read_after_resumed_is_told_lost_expired_and_the_client_goes_on(
        ) -> None:
    hub, asked = _stream_hub()
    for n in range(1, 11):
        hub.publish([_p(n)], places=_at(n))
    back = Recorder()
    old = positions.Position(0xABCD, 0, 0, 1_700_000_000)
    assert hub.add(back, ["c"], positioned=True, resume=old) is True
    assert hub.backfilled(back, _source(1, 2), 2 << 32) == asked[0][2]
    assert hub.backfilled(back, None, asked[0][2]) is None
    events = back.read()
    assert [type(e).__name__ for e in events] == ["Control", "Delivery", "Delivery", "Control"]
    assert events[0].event == "resumed" and events[-1].reason == positions.EXPIRED  # type: ignore[union-attr]
    hub.publish([_p(11)], places=_at(11))
    assert back.ns() == [1, 2, 11]
