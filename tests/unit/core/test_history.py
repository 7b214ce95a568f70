"""relay.core.history and relay.wire.positions without sockets: positions, bounds, "can this
resume?"."""

from __future__ import annotations

import gc
import hashlib
import json
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.history import ENTRY_OVERHEAD, WAIT, History, _name_size
from relay.wire import frames, positions
from relay.wire.positions import Position


def _payload(channel: str, n: int) -> bytes:
    return json.dumps({"channel": channel, "n": n}).encode()


def _history(messages: int = 100, max_bytes: int = 1 << 20, max_age: float = 60) -> History:
    """A history whose clock is Unix time itself (entries arrive at 0.0 unless told)."""
    return History(messages, max_bytes, max_age, wall_offset=0.0)


def _names(*channels: str) -> int:
    """What the history charges for keeping these channels' names."""
    return sum(map(_name_size, channels))


def _feed(history: History, items: list[tuple[str, int]], arrived: float = 0.0) -> list[str]:
    """Append ``items`` (channel, n); the position text of each."""
    marks = []
    for channel, n in items:
        history.append(channel, _payload(channel, n), arrived)
        marks.append(history.position)
    return marks


def _ns(history: History, position: str, channels: list[str], now: float = 0.0
        ) -> list[int] | str:
    outcome = history.resolve(positions.parse_position(position), channels,  # type: ignore[arg-type]
                              now)
    if isinstance(outcome, str):
        return outcome
    return [json.loads(entry.payload)["n"] for entry in history.after(outcome, channels)]


def test_a_delivery_is_its_position_a_line_feed_and_the_payload_unchanged() -> None:
    history = History(10, 1 << 20, 60, epoch=0xABCDEF01, wall_offset=0.0)
    payload = '{"channel":"c","price":"1.5","who":"é"}'.encode()
    entry = history.append("c", payload, 1234.5)
    position = f"abcdef01.1.{entry.digest:016x}.000004d2"
    assert entry.payload == payload
    assert entry.size == len(position) + len(payload) + ENTRY_OVERHEAD  # Before it is made.
    made = history.position_of(entry)
    assert made == position.encode() and history.position_of(entry) is made
    assert entry.size == len(made) + len(payload) + ENTRY_OVERHEAD
    assert history.position == position
    frame = b"".join(frames.TEXT_FRAMES.delivery(made, entry.payload))
    assert frame == frames.text(position.encode() + b"\n" + payload)
    assert positions.read(frames.payload_of(frame).decode()) == positions.Delivery(
        position, payload.decode())


def test_positions_parse_back_and_nothing_else_does() -> None:
    position = Position(0x0102ABCD, 0x1F4, 0xFEDCBA9876543210, 0x675A1B2C)
    assert position.text() == "0102abcd.1f4.fedcba9876543210.675a1b2c"
    assert positions.parse_position(position.text()) == position
    good = "0102abcd.1.fedcba9876543210.675a1b2c"
    assert positions.parse_position(good) is not None
    for bad in ("", "0102abcd.1f4", "0102abcd.1.fedcba9876543210",
                good.replace("abcd", "ABCD"), good.replace(".1.", ".."),
                good[1:], good.replace("3210.", "321."), good.replace(".1.", "." + "1" * 17 + "."),
                " " + good, good + "\n", good + ".0", good.replace("675a1b2c", "675a1b2")):
        assert positions.parse_position(bad) is None, bad
    assert len("ffffffff.ffffffffffffffff.ffffffffffffffff.ffffffff") == \
        positions.MAX_POSITION_LENGTH


def test_control_events_are_exact_text_and_read_back() -> None:
    p = "0102abcd.1f4.fedcba9876543210.675a1b2c"
    assert positions.position_event(p) == b'{"event":"position","position":"%s"}' % p.encode()
    assert positions.resumed_event(p, 12) == \
        b'{"event":"resumed","position":"%s","replayed":12}' % p.encode()
    assert positions.lost_event("gap", p) == \
        b'{"event":"lost","reason":"gap","position":"%s"}' % p.encode()
    assert positions.read(positions.resumed_event(p, 12).decode()) == \
        positions.Control("resumed", p, None, 12)
    assert positions.read(positions.lost_event("expired", p).decode()) == \
        positions.Control("lost", p, "expired", None)
    for bad in (positions.lost_event("later", p).decode(), '{"event":"x"}',
                "{not json", "no position\npayload", "payload without a line feed",
                '{"event":"position","position":"nope"}'):
        with pytest.raises(positions.ProtocolError):
            positions.read(bad)


def test_every_process_names_the_same_point_alike_once_it_has_seen_a_window() -> None:
    early = _history()
    late = _history()
    assert early.epoch != late.epoch
    items = [("c", n) for n in range(30)]
    first = _feed(early, items)
    second = _feed(late, items[5:])  # Started five notifications later.
    digests = [p.split(".")[2] for p in first[5:]]
    theirs = [p.split(".")[2] for p in second]
    assert [p.split(".")[3] for p in first] == ["00000000"] * 30  # Received at Unix time 0.
    # Within the first window the late process has seen less: its digests differ, and so no
    # position of the early one is mistaken for one of its own.
    assert all(a != b for a, b in zip(digests[:positions.WINDOW - 1],
                                       theirs[:positions.WINDOW - 1], strict=True))
    assert digests[positions.WINDOW:] == theirs[positions.WINDOW:]
    # A position of the other process resumes by digest, at the same point.
    assert _ns(late, first[20], ["c"]) == list(range(21, 30))


def test_a_position_of_another_process_not_seen_yet_is_waited_for_then_found() -> None:
    ahead, behind = _history(), _history()
    marks = _feed(ahead, [("c", n) for n in range(20)])
    _feed(behind, [("c", n) for n in range(15)])
    assert _ns(behind, marks[17], ["c"]) == WAIT
    _feed(behind, [("c", n) for n in range(15, 20)])
    assert _ns(behind, marks[17], ["c"]) == [18, 19]


def test_resume_replays_the_channels_asked_for_in_stream_order() -> None:
    history = _history()
    marks = _feed(history, [("a", 1), ("b", 2), ("c", 3), ("a", 4), ("b", 5), ("a", 6)])
    assert _ns(history, marks[0], ["a", "b"]) == [2, 4, 5, 6]
    assert _ns(history, marks[0], ["b"]) == [2, 5]
    assert _ns(history, marks[0], ["nothing-here"]) == []
    assert _ns(history, marks[-1], ["a", "b", "c"]) == []
    # The head position (what a client that just connected holds) resumes with nothing missed.
    assert _ns(history, history.position, ["a"]) == []


def test_a_busy_channel_pushes_out_its_own_history_and_not_a_quiet_ones() -> None:
    history = _history(3)
    marks = _feed(history, [("quiet", 0)] + [("busy", n) for n in range(1, 8)])
    assert _ns(history, marks[0], ["quiet"]) == []
    assert _ns(history, marks[0], ["busy"]) == positions.EXPIRED
    assert _ns(history, marks[0], ["quiet", "busy"]) == positions.EXPIRED
    # Exactly the last three of "busy" are kept: after the fourth-last, resume works.
    assert _ns(history, marks[4], ["busy"]) == [5, 6, 7]
    assert _ns(history, marks[3], ["busy"]) == positions.EXPIRED
    assert history.entries == 4


def test_the_byte_bound_counts_overhead_and_drops_the_oldest_of_all() -> None:
    payload_size = len(_payload("a", 10))
    entry_size = _history(1).append("a", _payload("a", 10), 0).size
    history = _history(max_bytes=5 * entry_size + _names("a", "b", "c"))
    marks = _feed(history, [("a", 10), ("b", 11), ("a", 12), ("b", 13), ("a", 14)])
    assert history.entries == 5 and history.bytes == 5 * entry_size + _names("a", "b")
    _feed(history, [("c", 15)])
    assert history.entries == 5 and history.bytes <= history.max_bytes
    assert payload_size < entry_size
    # The oldest of all (a:10) went; b is complete still.
    assert _ns(history, marks[0], ["b"]) == [11, 13]
    assert _ns(history, marks[0], ["a"]) == [12, 14]  # After a:10 itself: nothing lost.
    assert _ns(history, marks[0], ["a", "b", "c"]) == [11, 12, 13, 14, 15]
    _feed(history, [("c", 16)])
    assert _ns(history, marks[0], ["b"]) == positions.EXPIRED


def test_entries_older_than_the_age_go() -> None:
    history = _history(max_age=10)
    start = history.position
    old = _feed(history, [("a", 1), ("b", 2)], arrived=100.0)
    new = _feed(history, [("a", 3)], arrived=105.0)
    history.expire(109.0)
    assert history.entries == 3
    history.expire(111.0)
    assert history.entries == 1
    assert _ns(history, start, ["a"]) == positions.EXPIRED
    assert _ns(history, start, ["b"]) == positions.EXPIRED
    assert _ns(history, old[0], ["a"]) == [3]  # a:1 itself was seen: nothing after it lost.
    assert _ns(history, old[1], ["a"]) == [3]
    assert _ns(history, old[1], ["b"]) == []
    assert _ns(history, new[0], ["a", "b"]) == []
    # Appending also ages out what is old by then.
    _feed(history, [("b", 4)], arrived=200.0)
    assert history.entries == 1


def test_a_listen_break_makes_earlier_positions_a_gap() -> None:
    history = _history()
    before = _feed(history, [("a", 1), ("a", 2)])
    history.mark_break()
    at_break = history.position
    after = _feed(history, [("a", 3)])
    assert _ns(history, before[1], ["a"]) == positions.GAP
    assert _ns(history, at_break, ["a"]) == [3]
    assert _ns(history, after[0], ["a"]) == []
    # The break's own position names no notification: other processes cannot place it.
    other = _history()
    assert _ns(other, at_break, ["a"]) == positions.UNKNOWN


def test_positions_nobody_can_place_are_unknown() -> None:
    history = _history()
    _feed(history, [("a", 1)])
    future = Position(history.epoch, history.seq + 1, 5)
    assert history.resolve(future, ["a"]) == positions.UNKNOWN
    # The same window twice (a run of identical payloads): the digest is ambiguous.
    repeated = _history()
    same = [repeated.append("a", b"tick", 0.0) for _ in range(2 * positions.WINDOW + 2)]
    twice = same[-1].digest
    assert [e.digest for e in same].count(twice) > 1
    stranger = _history()
    for _ in range(2 * positions.WINDOW + 2):
        stranger.append("a", b"tick", 0.0)
    assert stranger.resolve(Position(history.epoch, 1, twice), ["a"], 0.0) == positions.UNKNOWN
    # Its own process still places it exactly, by seq.
    own = Position(repeated.epoch, same[-3].seq, same[-3].digest)
    assert [e.seq for e in repeated.after(repeated.resolve(own, ["a"]), ["a"])] == \
        [same[-2].seq, same[-1].seq]  # type: ignore[arg-type]


def test_the_same_payloads_again_at_another_time_are_not_the_point_a_client_saw() -> None:
    """A run of identical payloads that comes back later: its digest is the same, its time is
    not, so another process does not resume there (which would skip what came between)."""
    issuer, other = _history(), _history()
    run = [("a", 0)] * positions.WINDOW
    seen = _feed(issuer, run, arrived=100.0)[-1]
    _feed(other, run, arrived=100.0)
    _feed(other, [("b", 1)], arrived=101.0)
    other.expire(1000.0)  # Its first run is gone, and the run comes back later:
    assert other.entries == 0
    _feed(other, run, arrived=100.0 + positions.CLOCK_SKEW + 1)
    assert _ns(other, seen, ["a", "b"], now=120.0) == positions.UNKNOWN
    # Received within the skew, it is taken.
    again = _history()
    _feed(again, run, arrived=100.0 + positions.CLOCK_SKEW)
    assert _ns(again, seen, ["a"], now=120.0) == []


def test_a_position_of_another_process_older_than_any_history_is_expired() -> None:
    issuer, other = _history(max_age=60), _history(max_age=60)
    seen = _feed(issuer, [("a", 1)], arrived=1000.0)[-1]
    assert _ns(other, seen, ["a"], now=1000.0 + 60 + positions.CLOCK_SKEW) == WAIT
    assert _ns(other, seen, ["a"], now=1000.0 + 61 + positions.CLOCK_SKEW) == positions.EXPIRED


def test_an_emptied_channel_remembers_what_it_dropped() -> None:
    history = _history(max_age=10)
    marks = _feed(history, [("a", 1), ("a", 2)], arrived=0.0)
    history.expire(50.0)
    assert history.entries == 0
    assert _ns(history, marks[0], ["a"]) == positions.EXPIRED
    assert _ns(history, marks[1], ["a"]) == []
    _feed(history, [("a", 3)], arrived=50.0)  # The channel's log is made again.
    assert _ns(history, marks[0], ["a"]) == positions.EXPIRED
    assert _ns(history, marks[1], ["a"]) == [3]


def test_forgotten_channels_fold_into_a_conservative_floor(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr("relay.core.history._FORGOTTEN_CHANNELS", 2)
    history = _history(max_age=10)
    start = history.position
    _feed(history, [("x", 1), ("y", 2), ("z", 3)], arrived=0.0)
    history.expire(50.0)
    # x was forgotten: any channel without a record now needs a position after x's drop.
    assert _ns(history, start, ["never-seen"]) == positions.EXPIRED
    assert _ns(history, start, ["z"]) == positions.EXPIRED
    assert history.resolve(positions.parse_position(start), []) == 0  # type: ignore[arg-type]
    # The floor is x's drop, the oldest forgotten, no later: y and z are still remembered.
    after_x = Position(history.epoch, 1, 0)
    assert history.resolve(after_x, ["never-seen", "x"], 0.0) == 1
    assert history.resolve(after_x, ["y"], 0.0) == positions.EXPIRED
    assert history.resolve(Position(history.epoch, 2, 0), ["y"], 0.0) == 2
    assert history.resolve(Position(history.epoch, 2, 0), ["z"], 0.0) == positions.EXPIRED


def test_with_no_messages_kept_only_the_head_resumes() -> None:
    history = _history(0)
    marks = _feed(history, [("a", 1), ("a", 2)])
    assert history.entries == 0
    assert _ns(history, marks[1], ["a"]) == []
    assert _ns(history, marks[0], ["a"]) == positions.EXPIRED


def test_entry_overhead_covers_what_an_entry_really_costs() -> None:
    history = History(1_000_000, 1 << 40, 1e9)
    payloads = [_payload(f"ch{n % 50}", n) for n in range(20_000)]
    kept_bytes = 0  # The payloads exist before: what the history adds is their positions.
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for payload in payloads:
            entry = history.append(payload[13:18].decode(), payload, 0.0)
            kept_bytes += len(history.position_of(entry))  # Made, as a replay or a stream does.
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_entry = (after - before - kept_bytes) / len(payloads)
    assert 0 < per_entry <= ENTRY_OVERHEAD
    kept_bytes += sum(map(len, payloads))
    assert history.bytes == kept_bytes + len(payloads) * ENTRY_OVERHEAD \
        + _names(*{payload[13:18].decode() for payload in payloads})


_items = st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 3)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(items=_items, messages=st.integers(1, 6), entries_fit=st.integers(1, 12),
       max_age=st.floats(0.5, 3), start=st.integers(0, 60),
       channels=st.sets(st.sampled_from("abc"), min_size=1))
def test_resume_is_exact_or_says_expired_and_never_silently_loses(
        items: list[tuple[str, float]], messages: int, entries_fit: int, max_age: float,
        start: int, channels: set[str]) -> None:
    entry_size = len(b"00000000.1.0000000000000000.00000000" + _payload("a", 0)) \
        + ENTRY_OVERHEAD
    history = History(messages, entries_fit * entry_size + _names("a", "b", "c") + 64, max_age,
                      wall_offset=0.0)
    model: list[tuple[int, str, int]] = []  # (seq, channel, n) of every notification
    clock = 0.0
    marks = [history.position]
    for n, (channel, step) in enumerate(items):
        clock += step
        entry = history.append(channel, _payload(channel, n), clock)
        model.append((entry.seq, channel, n))
        marks.append(history.position)
    position = marks[min(start, len(marks) - 1)]
    seq = positions.parse_position(position).seq  # type: ignore[union-attr]
    outcome = _ns(history, position, sorted(channels))
    wanted = [n for s, channel, n in model if s > seq and channel in channels]
    if outcome == positions.EXPIRED:
        # Only when something it would need is really gone.
        kept = {json.loads(e.payload)["n"] for c in "abc" for e in history.after(0, [c])}
        assert any(n not in kept for n in wanted)
    else:
        assert outcome == wanted
    assert history.bytes <= history.max_bytes
    assert all(len(list(history.after(0, [c]))) <= messages for c in "abc")


# -- what mutation testing asked for (docs/mutation.md) ------------------------------------------

_P = "0102abcd.1f4.fedcba9876543210.675a1b2c"


def test_protocol_errors_say_what_is_wrong() -> None:
    long_delivery = "x" * 100
    not_a_control = json.dumps({"event": "nope", "position": _P, "pad": "y" * 60})
    bad_reason = positions.lost_event("later", _P).decode()
    assert len(bad_reason) > 81
    for message, text in (
            ("{not json", "a control event that is not JSON"),
            (not_a_control, f"not a control event: {not_a_control[:80]!r}"),
            (bad_reason, f"unknown reason in {bad_reason[:80]!r}"),
            (long_delivery, f"a delivery without a position: {long_delivery[:80]!r}")):
        with pytest.raises(positions.ProtocolError) as raised:
            positions.read(message)
        assert str(raised.value) == text


def test_a_delivery_splits_at_the_first_line_feed_and_replayed_must_be_a_number() -> None:
    assert positions.read(f"{_P}\nline 1\nline 2") == positions.Delivery(_P, "line 1\nline 2")
    assert positions.read(json.dumps({"event": "resumed", "position": _P, "replayed": "3"})) == \
        positions.Control("resumed", _P, None, None)


def test_a_fresh_history_is_at_a_point_that_names_no_notification() -> None:
    assert History(10, 1 << 20, 60, epoch=1, wall_offset=0.0).position == \
        "00000001.0.0000000000000000.00000000"
    before = int(time.time())
    fresh = History(10, 1 << 20, 60)
    after = int(time.time())
    assert before <= positions.parse_position(fresh.position).time <= after  # type: ignore[union-attr]
    # Another process cannot place it (digest 0), and says so without waiting.
    assert _history().resolve(positions.parse_position(fresh.position), ["a"],  # type: ignore[arg-type]
                              time.monotonic()) == positions.UNKNOWN


def test_the_digest_is_blake2b_of_the_last_window_of_payload_digests() -> None:
    """Every relay process must compute it alike, whatever its version: pinned here."""
    history = _history()
    payloads = [_payload("c", n) for n in range(positions.WINDOW + 3)]
    for payload in payloads:
        entry = history.append("c", payload, 0.0)
    window = b"".join(hashlib.blake2b(p, digest_size=8).digest()
                      for p in payloads[-positions.WINDOW:])
    assert entry.digest == int.from_bytes(hashlib.blake2b(window, digest_size=8).digest(), "big")
    assert history.position.split(".")[2] == f"{entry.digest:016x}"


def test_a_break_is_one_point_of_the_stream_at_the_time_given() -> None:
    history = History(10, 1 << 20, 60, epoch=1, wall_offset=0.0)
    history.mark_break(now=1234.9)
    assert history.position == "00000001.1.0000000000000000.000004d2"


def test_another_processes_position_is_expired_on_the_unix_clock() -> None:
    """Positions carry Unix seconds; the entries' clock is monotonic, offset to Unix time."""
    other = History(10, 1 << 20, 60, wall_offset=1_000_000.0)
    seen = Position(other.epoch ^ 1, 5, 0x1234, 1_000_000 + 1000)
    assert other.resolve(seen, ["a"], now=1000.0 + 60 + positions.CLOCK_SKEW) == WAIT
    assert other.resolve(seen, ["a"], now=1000.5 + 60 + positions.CLOCK_SKEW) == positions.EXPIRED


def test_an_entry_exactly_max_age_old_is_kept() -> None:
    history = _history(max_age=10)
    _feed(history, [("a", 1)], arrived=100.0)
    history.expire(110.0)
    assert history.entries == 1
    history.expire(110.5)
    assert history.entries == 0


def test_a_log_cut_by_the_count_still_ages_out() -> None:
    history = _history(messages=2, max_age=10)
    _feed(history, [("a", 1), ("a", 2), ("a", 3)], arrived=0.0)
    assert history.entries == 2
    history.expire(100.0)
    assert (history.entries, history.bytes) == (0, _names("a"))  # Its name is remembered.


def test_the_byte_bound_drops_the_oldest_of_all_even_several_for_one_append() -> None:
    def size(payload: bytes) -> int:
        return _history().append("x", payload, 0.0).size

    big = json.dumps({"channel": "c", "n": 4, "pad": "z" * 2000}).encode()
    small = size(_payload("a", 1))
    history = _history(max_bytes=small + size(big) + _names("a", "b", "c"))
    marks = _feed(history, [("a", 1), ("b", 2), ("a", 3)])
    history.append("c", big, 0.0)  # a:1 and b:2 go, the two oldest.
    assert history.entries == 2
    assert _ns(history, marks[0], ["a", "c"]) == [3, 4]
    assert _ns(history, marks[0], ["b"]) == positions.EXPIRED


def test_a_digest_several_entries_share_is_indexed_until_the_last_of_them_goes() -> None:
    """A run of identical payloads gives its entries after the first window one digest:
    ambiguous while two are kept, the one kept when one is, and gone with the last."""
    history = _history(max_age=5)
    run = [history.append("a", b"tick", float(t)) for t in range(2 * positions.WINDOW + 2)]
    shared = run[-1].digest
    last = len(run) - 1
    assert sum(e.digest == shared for e in run) == len(run) - positions.WINDOW + 1
    seen = Position(history.epoch ^ 1, 99, shared, last)
    history.expire(last + 4.0)  # The two last are kept.
    assert history.resolve(seen, ["a"], now=last + 4.0) == positions.UNKNOWN
    history.expire(last + 5.0)  # The last one is kept.
    assert history.entries == 1
    assert history.resolve(seen, ["a"], now=last + 5.0) == run[-1].seq
    history.expire(last + 6.0)
    assert history.entries == 0
    assert history.resolve(seen, ["a"], now=last + 6.0) == WAIT


def test_a_long_lived_log_releases_what_it_dropped() -> None:
    """Dropped entries are let go in bulk (amortised O(1)); what is kept stays exact."""
    history = _history(messages=1000, max_bytes=1 << 30, max_age=1e9)
    pad = "p" * 500
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        marks = {}
        for n in range(8_000):
            history.append("a", json.dumps({"channel": "a", "n": n, "pad": pad}).encode(), 0.0)
            if n in (6_998, 6_999, 7_998):
                marks[n] = history.position
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert history.entries == 1000
    assert held < 3 * history.bytes  # Kept, and dropped but not yet let go: at most as many.
    assert _ns(history, marks[6_999], ["a"]) == list(range(7_000, 8_000))
    assert _ns(history, marks[6_998], ["a"]) == positions.EXPIRED
    assert _ns(history, marks[7_998], ["a"]) == [7_999]


def test_the_heads_heap_stays_small_while_a_busy_channel_turns_over_under_a_quiet_one() -> None:
    history = _history(messages=1)
    marks = _feed(history, [("quiet", 0)] + [("busy", n) for n in range(1, 300)])
    assert len(history._heads) <= 2 * len(history._logs) + 65
    assert history.entries == 2
    assert _ns(history, marks[0], ["quiet"]) == []
    assert _ns(history, marks[-2], ["quiet", "busy"]) == [299]
    assert _ns(history, marks[-3], ["busy"]) == positions.EXPIRED


def test_the_byte_bound_holds_for_the_memory_of_many_busy_channels() -> None:
    """Dropped entries must let go of their frames at once: 50 channels turning over their
    logs, with the byte bound reached, hold no more than the bound counts."""
    history = History(50, 1 << 17, 1e9, wall_offset=0.0)
    pad = "x" * 250
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(10_000):
            channel = f"ch{n % 50}"
            history.append(channel, json.dumps({"channel": channel, "n": n, "pad": pad}).encode(),
                           0.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert history.bytes <= history.max_bytes
    assert history.bytes > history.max_bytes - 1024  # The bound was reached.
    # The digest window, the heads heap and the dict of logs come on top: a few KiB.
    assert held <= history.max_bytes + 16 * 1024, (held, history.bytes)


def test_forgotten_channel_names_are_charged_against_the_byte_bound() -> None:
    """Before, 10,000 emptied channels of ~8 KB names were remembered outside the bound: 78 MiB
    held for a 1 MiB bound. Now a name is charged from its first entry until it is forgotten,
    and the oldest forgotten go first when entries alone cannot make room."""
    bound = 1 << 20
    history = History(1, bound, 1.0, wall_offset=0.0)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(2_000):  # Each name made anew, as parsing a payload makes it.
            history.append(f"{n:08d}" + "x" * 8_000, b"{}", float(n))  # Ages the last out.
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert history.bytes <= bound
    assert held <= 1.25 * bound


def test_a_control_event_too_deep_or_too_long_is_a_protocol_error_and_nothing_else() -> None:
    deep = '{"event":' + "[" * (positions.MAX_CONTROL_LENGTH - 10)
    assert len(deep) <= positions.MAX_CONTROL_LENGTH
    for message in (deep, "{" + " " * positions.MAX_CONTROL_LENGTH + "}"):
        with pytest.raises(positions.ProtocolError):
            positions.read(message)


def test_a_control_event_of_exactly_the_longest_length_is_read_and_one_longer_is_not() -> None:
    event = {"event": "position", "position": _P, "pad": ""}
    event["pad"] = "x" * (positions.MAX_CONTROL_LENGTH - len(json.dumps(event)))
    longest = json.dumps(event)
    assert len(longest) == positions.MAX_CONTROL_LENGTH
    assert positions.read(longest) == positions.Control("position", _P)
    longer = longest[:-1] + " }"
    with pytest.raises(positions.ProtocolError) as raised:
        positions.read(longer)
    assert str(raised.value) == f"a control event of {positions.MAX_CONTROL_LENGTH + 1} characters"


# -- log positions ---------------------------------------------------------------------------

def _log_history(identity: int = 0xC0FFEE01, start: int = 0, messages: int = 100) -> History:
    history = History(messages, 1 << 20, 60, wall_offset=0.0)
    history.adopt_log(identity, start, now=0.0)
    return history


def _key(lsn: int, index: int = 0) -> int:
    return lsn << 32 | index


def test_log_positions_are_the_place_in_the_log_and_alike_on_every_reader() -> None:
    a, b = _log_history(), _log_history()
    for history in (a, b):
        history.append("c", _payload("c", 1), 5.0, (_key(0x16B374D848, 0), 1_700_000_000))
        history.append("c", _payload("c", 2), 5.0, (_key(0x16B374D848, 1), 1_700_000_000))
    assert a.position == b.position == "c0ffee01.16b374d848.0000000000000001.6553f100"
    entry = next(iter(a.after(0, ["c"])))
    assert a.position_of(entry) == b"c0ffee01.16b374d848.0000000000000000.6553f100"
    first = positions.parse_position(a.position_of(entry).decode())
    assert first is not None
    assert b.resolve(first, ["c"]) == _key(0x16B374D848, 0)
    assert [json.loads(e.payload)["n"] for e in b.after(b.resolve(first, ["c"]), ["c"])] == [2]


def test_a_log_position_not_read_yet_is_waited_for_and_others_are_unknown() -> None:
    history = _log_history()
    history.append("c", _payload("c", 1), 0.0, (_key(10), 1))
    ahead = Position(0xC0FFEE01, 11, 3, 1)
    assert history.resolve(ahead, ["c"]) == WAIT
    assert history.awaited(ahead) == _key(11, 3)
    assert history.resolve(Position(0xC0FFEE02, 10, 0, 1), ["c"]) == positions.UNKNOWN
    assert history.resolve(Position(0xC0FFEE01, 10, 1 << 32, 1), ["c"]) == positions.UNKNOWN
    assert history.resolve(Position(0xC0FFEE01, 10, 0, 1), ["c"]) == _key(10)


def test_a_log_history_starts_after_its_start_and_a_break_is_a_gap() -> None:
    history = _log_history(start=_key(100) - 1)
    assert history.resolve(Position(0xC0FFEE01, 99, 7, 0), ["c"]) == positions.EXPIRED
    at_start = positions.parse_position(history.position)
    assert at_start is not None and history.resolve(at_start, ["c"]) == _key(100) - 1
    history.append("c", _payload("c", 1), 0.0, (_key(100), 0))
    before = positions.parse_position(history.position)
    history.mark_break(0.0)
    assert history.resolve(before, ["c"]) == positions.GAP  # type: ignore[arg-type]
    after = positions.parse_position(history.position)
    history.append("c", _payload("c", 2), 0.0, (_key(101), 0))
    assert history.resolve(after, ["c"]) == _key(100) + 1  # type: ignore[arg-type]


def test_the_oldest_entry_kept_is_what_a_log_must_keep_for_this_history() -> None:
    history = _log_history(messages=2)
    assert history.oldest() is None
    for lsn, channel in ((10, "a"), (11, "b"), (12, "a"), (13, "a")):
        history.append(channel, _payload(channel, lsn), 0.0, (_key(lsn), 0))
    assert history.oldest() == _key(11)  # a's 10 was pushed out by 12 and 13.
    history.expire(1e9)
    assert history.oldest() is None and history.entries == 0


def test_adopting_a_log_drops_what_the_history_held() -> None:
    history = _history()
    _feed(history, [("c", 1), ("c", 2)])
    history.adopt_log(7, _key(5) - 1, now=0.0)
    assert (history.entries, history.bytes, history.epoch, history.log) == (0, 0, 7, True)
    assert history.position == "00000007.4.00000000ffffffff.00000000"


def test_a_log_entry_ages_from_its_commit_not_from_when_it_was_read_back() -> None:
    history = History(100, 1 << 20, 60, wall_offset=1_000.0)  # Unix = monotonic + 1,000.
    history.adopt_log(1, 0, now=0.0)
    history.append("c", _payload("c", 1), 500.0, (_key(1), 1_000 + 400))  # Committed at 400.
    history.append("c", _payload("c", 2), 500.0, (_key(2), 1_000 + 490))  # At 490.
    history.expire(470.0)  # 60 s: what was committed before 410 goes.
    assert [json.loads(e.payload)["n"] for e in history.after(0, ["c"])] == [2]
    assert history.oldest() == _key(2)
