"""The rate and address limits (relay/core/limits.py), without sockets or clocks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core import filters
from relay.core.limits import (
    ADDRESS,
    COST,
    SETS,
    AddressCount,
    AddressRate,
    FilterBudget,
    InboundBudget,
    TokenBucket,
    WriteBucket,
    network_of,
    within_queue_bound,
)


def _takes(bucket: TokenBucket, now: float, amount: float = 1.0) -> int:
    """How many times ``amount`` can be taken at ``now`` (up to 10,000: a bucket that never
    runs dry fails the test instead of hanging it)."""
    count = 0
    while count < 10_000 and bucket.take(now, amount):
        count += 1
    return count


def test_a_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=25, now=100.0)
    assert _takes(bucket, 100.0) == 25
    assert _takes(bucket, 100.5) == 5
    assert _takes(bucket, 200.0) == 25  # Never more than the burst, however long it rested.


def test_a_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=10, now=0.0)
    assert not bucket.take(0.0, 11)
    assert bucket.take(0.0, 10)


def test_frame_budget_is_one_second_of_frames() -> None:
    budget = InboundBudget(frames_per_second=200, bytes_per_second=0, max_message_size=8000,
                           now=0.0)
    assert sum(budget.take_frame(0.0) for _ in range(300)) == 200
    assert sum(budget.take_frame(0.5) for _ in range(300)) == 100


def test_byte_budget_holds_at_least_two_of_the_largest_messages() -> None:
    small = InboundBudget(frames_per_second=0, bytes_per_second=1000, max_message_size=8000,
                          now=0.0)
    assert small.take_bytes(0.0, 16000)
    assert not small.take_bytes(0.0, 1)
    assert small.take_bytes(1.0, 1000)
    large = InboundBudget(frames_per_second=0, bytes_per_second=65536, max_message_size=8000,
                          now=0.0)
    assert large.take_bytes(0.0, 65536)
    assert not large.take_bytes(0.0, 1)


def test_zero_means_no_limit() -> None:
    budget = InboundBudget(frames_per_second=0, bytes_per_second=0, max_message_size=1, now=0.0)
    assert all(budget.take_frame(0.0) for _ in range(100_000))
    assert budget.take_bytes(0.0, 1 << 40)


@given(st.floats(0.5, 10_000), st.lists(st.tuples(st.floats(0, 2), st.floats(0.1, 100)),
                                         max_size=50))
def test_a_bucket_never_gives_more_than_its_burst_plus_its_rate(
        rate: float, steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate, rate, 0.0)
    now, given_out = 0.0, 0.0
    for gap, amount in steps:
        now += gap
        if bucket.take(now, amount):
            given_out += amount
    assert given_out <= rate + rate * now + 1e-6


@pytest.mark.parametrize("host,network", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),
])
def test_addresses_count_per_ipv4_address_and_per_ipv6_64(host: str, network: str) -> None:
    assert network_of(host) == network


def test_an_address_gets_its_cap_and_its_places_back() -> None:
    counts = AddressCount(2)
    assert [counts.enter("a"), counts.enter("a"), counts.enter("a"), counts.enter("b")] == [
        True, True, False, True]
    counts.leave("a")
    assert counts.enter("a") and not counts.enter("a")


def test_a_cap_of_zero_is_no_cap() -> None:
    counts = AddressCount(0)
    assert all(counts.enter("a") for _ in range(1000))
    counts.leave("a")  # Nothing was counted: nothing to forget, and no error.


def test_a_write_bucket_holds_one_second_and_at_least_one_message() -> None:
    assert _takes(WriteBucket(5, 0.0), 0.0) == 5
    assert _takes(WriteBucket(0.5, 0.0), 0.0) == 1


@pytest.mark.parametrize("queued,adding,within", [
    (0, 65536, True), (0, 65537, False),  # exactly the bound is allowed, one byte more is not
    (65000, 536, True), (65000, 537, False),
    (65536, 0, True), (65537, 0, False),  # a half-written frame's rest alone
    (0, 0, True),
])
def test_the_queue_bound_is_inclusive_and_counts_what_is_queued_plus_the_frame(
        queued: int, adding: int, within: bool) -> None:
    assert within_queue_bound(queued, adding, 65536) is within
    assert within_queue_bound(queued, adding, 0) is (queued + adding == 0)


# -- filter sets: how many, and what they cost per notification -----------------------------------

def _set(*texts: str) -> filters.Filters:
    return filters.parse_all(texts)


def test_filter_sets_are_capped_per_channel_and_those_held_always_fit() -> None:
    budget = FilterBudget(max_sets=2, max_cost=0, max_sets_per_address=0)
    seven, eight, nine = (_set(f"payload.market_id=eq.{n}") for n in (7, 8, 9))
    assert budget.hold(["fill"], filters.NONE, False, "a") is None  # Free, never held.
    assert budget.hold(["fill"], seven, False, "a") is None
    assert budget.hold(["other"], eight, False, "a") is None
    assert budget.hold(["fill"], eight, False, "a") is None
    # Two distinct sets on "fill": a third is refused, not a second client of the first two.
    assert budget.hold(["fill"], nine, False, "a") == SETS
    assert budget.hold(["other", "fill"], nine, False, "a") == SETS
    assert budget.hold(["other"], nine, False, "a") is None  # Refusals held nothing there.
    assert budget.hold(["fill"], seven, False, "b") is None
    budget.release(["fill"], seven, False, "a")
    assert budget.hold(["fill"], nine, False, "a") == SETS  # "b" still holds seven.
    budget.release(["fill"], seven, False, "b")
    assert budget.hold(["fill"], nine, False, "a") is None
    assert FilterBudget(0, 0, 0).hold(["fill"], nine, False, "a") is None  # 0: no limit.


def test_claim_sets_have_room_of_their_own_that_url_sets_cannot_use_up() -> None:
    budget = FilterBudget(max_sets=1, max_cost=0, max_sets_per_address=0)
    assert budget.hold(["fill"], _set("payload.user=eq.mallory"), False, "a") is None
    assert budget.hold(["fill"], _set("payload.user=eq.eve"), False, "b") == SETS
    assert budget.hold(["fill"], _set("payload.user=eq.alice"), True, "b") is None
    assert budget.hold(["fill"], _set("payload.user=eq.bob"), True, "c") == SETS


def test_one_address_holds_a_bounded_number_of_distinct_url_sets() -> None:
    budget = FilterBudget(max_sets=0, max_cost=0, max_sets_per_address=2)
    one, two, three = (_set(f"payload.n=eq.{n}") for n in (1, 2, 3))
    assert budget.hold(["c"], one, False, "10.0.0.1") is None
    assert budget.hold(["d"], two, False, "10.0.0.1") is None
    assert budget.hold(["c"], three, False, "10.0.0.1") == ADDRESS
    assert budget.hold(["e"], one, False, "10.0.0.1") is None  # The same set again.
    assert budget.hold(["c"], three, False, "10.0.0.2") is None
    assert budget.hold(["c"], three, True, "10.0.0.1") is None  # Claims are not counted.
    budget.release(["d"], two, False, "10.0.0.1")
    assert budget.hold(["c"], three, False, "10.0.0.1") is None


def test_the_cost_counts_filters_and_segments_and_an_indexed_eq_filter_once_per_path() -> None:
    budget = FilterBudget(max_sets=0, max_cost=0, max_sets_per_address=0)
    four = filters.COST_FIXED
    deep = _set("payload.a.b.c=gt.1")  # 4 + 4 segments
    assert budget.hold(["c"], deep, False, "a") is None
    assert budget.cost("c", False) == four + 4
    # An eq filter is answered by the index: its set costs the other filters, and its path
    # one lookup for all the sets that share it.
    assert budget.hold(["c"], _set("payload.m=eq.1", "payload.x=lt.2"), False, "a") is None
    assert budget.cost("c", False) == (four + 4) + (four + 2) + (four + 2)
    assert budget.hold(["c"], _set("payload.m=eq.2", "payload.x=lt.2"), False, "a") is None
    assert budget.cost("c", False) == (four + 4) + (four + 2) + 2 * (four + 2)
    assert budget.cost("c", True) == budget.cost("other", False) == 0
    budget.release(["c"], _set("payload.m=eq.1", "payload.x=lt.2"), False, "a")
    budget.release(["c"], _set("payload.m=eq.2", "payload.x=lt.2"), False, "a")
    assert budget.cost("c", False) == four + 4
    budget.release(["c"], deep, False, "a")
    assert budget.cost("c", False) == 0


def test_a_set_that_would_pass_the_cost_cap_is_refused_and_one_that_fits_exactly_is_not() -> None:
    one = filters.COST_FIXED + 2  # "payload.x=gt.N"
    budget = FilterBudget(max_sets=0, max_cost=3 * one, max_sets_per_address=0)
    assert budget.hold(["c"], _set("payload.x=gt.1", "payload.y=gt.1"), False, "a") is None
    assert budget.hold(["c"], _set("payload.x=gt.2", "payload.y=gt.2"), False, "a") == COST
    assert budget.hold(["c"], _set("payload.x=gt.3"), False, "a") is None  # Exactly the cap.
    assert budget.cost("c", False) == 3 * one
    # Sets already held cost nothing more, whoever holds them again.
    assert budget.hold(["c"], _set("payload.x=gt.3"), False, "b") is None


def test_the_worst_url_filter_set_fits_the_default_cost_a_few_times_only() -> None:
    """At the defaults (10,000 units) one read-token holder's deepest 32-filter sets fill the
    URL pool after a handful: what 1,000 of them cost before (35–158 ms per notification) is
    now bounded at ~3 ms (docs/filters.md)."""
    worst = _set(*(".".join(["payload", *(f"k{k}" for k in range(14)), f"p{j}"]) + "=neq.0"
                   for j in range(32)))
    assert filters.set_cost(worst) == 32 * (filters.COST_FIXED + 16)
    budget = FilterBudget(max_sets=1000, max_cost=10_000, max_sets_per_address=0)
    held = 0
    while budget.hold(["c"], worst | _set(f"payload.n=neq.{held}"), False, "a") is None:
        held += 1
    assert held == 15


def test_each_address_has_its_own_resume_rate_and_bursts() -> None:
    rate = AddressRate(rate=2, burst=4)
    assert [rate.take("a", 10.0) for _ in range(5)] == [True] * 4 + [False]
    assert rate.take("b", 10.0)  # Another address is not held back by the first.
    assert rate.take("a", 10.5) and not rate.take("a", 10.5)  # Refilled at 2 per second.
    assert all(AddressRate(0, 0).take("a", 0.0) for _ in range(1000))  # 0: no limit.


def test_resume_rates_forget_the_least_recently_seen_address_first(monkeypatch) -> None:
    from relay.core import limits

    monkeypatch.setattr(limits, "_RATE_ADDRESSES", 2)
    rate = AddressRate(rate=1, burst=1)
    assert rate.take("a", 0.0) and rate.take("b", 0.0)
    assert not rate.take("a", 0.0)  # "a" is the most recently seen now.
    assert rate.take("c", 0.0)  # "b" is forgotten, not "a".
    assert not rate.take("a", 0.0)
    assert rate.take("b", 0.0)  # Forgotten: a full bucket again.


def test_an_address_holding_one_set_twice_holds_it_until_both_are_released() -> None:
    budget = FilterBudget(max_sets=0, max_cost=0, max_sets_per_address=1)
    one, two = _set("payload.n=eq.1"), _set("payload.n=eq.2")
    assert budget.hold(["c"], one, False, "a") is None
    assert budget.hold(["c"], one, False, "a") is None  # A second client, the same set.
    budget.release(["c"], one, False, "a")
    assert budget.hold(["c"], two, False, "a") == ADDRESS  # The second client still holds it.
    budget.release(["c"], one, False, "a")
    assert budget.hold(["c"], two, False, "a") is None
